"""report_to: every logged row reaches TensorBoard, W&B (offline mode) and MLflow (a local file store)."""

from __future__ import annotations

import json

import pytest

from hypo_fast.train.config import config_from_dict
from hypo_fast.train.trainer import Trainer
from tests.train.helpers import toy_config


def test_wandb_and_mlflow_receive_every_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = toy_config(tmp_path, "run", steps=3)
    cfg["output"]["report_to"] = ["tensorboard", "wandb", "mlflow"]
    cfg["output"]["run_name"] = "named-run"  # TRL's run_name
    Trainer(config_from_dict(cfg)).train()
    out = tmp_path / "run"
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    from hypo_fast.train.metrics_log import local_mlflow_uri

    client = mlflow.tracking.MlflowClient(local_mlflow_uri(out))
    run_id = (out / "mlflow_run_id").read_text()
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert client.get_run(run_id).data.params["algorithm.beta"] == "0.1"
    assert client.get_run(run_id).info.run_name == "named-run"

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert (out / "wandb_run_id").read_text() in runs[0].name


def test_a_missing_reporter_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from hypo_fast.train.errors import UserError

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.delitem(__import__("sys").modules, "wandb", raising=False)
    cfg = toy_config(tmp_path, "run", steps=1)
    cfg["output"]["report_to"] = ["wandb"]
    with pytest.raises(UserError, match="output.report_to: wandb needs the wandb package"):
        Trainer(config_from_dict(cfg)).train()
