"""What a user gets wrong at the command line ends in one line naming the key, file or row, exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml

from hypo_fast.cli import main
from tests.faults.helpers import config


def _setup(tmp_path, case):
    """Returns (extra overrides, expected message) and prepares what the case needs on disk."""
    if case == "missing model folder":
        return ["model.config=null", f"model.path={tmp_path}/nope", "model.tokenizer=null"], "model.path: .*nope is not a local folder"
    if case == "empty model folder":
        (tmp_path / "empty").mkdir()
        return ["model.config=null", f"model.path={tmp_path}/empty", "model.tokenizer=null"], "model.path: .*empty holds no"
    if case == "missing tokenizer folder":
        return [f"model.tokenizer={tmp_path}/nope"], "model.tokenizer: .*nope is not a local folder"
    if case == "unknown model_type":
        return ["model.config={model_type: nonsense}"], "model.config: .*nonsense"
    if case == "plain folder as train_file":
        (tmp_path / "folder").mkdir()
        return [f"data.train_file={tmp_path}/folder"], "folder: a folder, but not a dataset saved"
    if case == "missing deepspeed config file":
        return [f"deepspeed.config_file={tmp_path}/ds.json"], "deepspeed.config_file: .*ds.json: no such file"
    if case == "bad eval.reward":
        return ["eval.reward=hypo_fast.demo:no_such_function"], "eval.reward: cannot import"
    if case == "unwritable output dir":
        (tmp_path / "a_file").write_text("")
        return [f"output.dir={tmp_path}/a_file/run"], "output.dir: cannot write to"
    if case == "fp16 on CPU":
        return ["model.dtype=float16"], "model.dtype: float16 needs a CUDA GPU"
    if case == "corrupt parquet":
        (tmp_path / "pairs.parquet").write_bytes(b"PAR1 garbage")
        return [f"data.train_file={tmp_path}/pairs.parquet"], "pairs.parquet: cannot be read as a dataset"
    if case == "bad row":
        (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "ab", "chosen": "c"}) + "\n")
        return [f"data.train_file={tmp_path}/bad.jsonl"], "bad.jsonl: line 1: missing field 'rejected'"
    if case == "unknown key":
        return ["optim.lrr=1"], "unknown key optim.lrr"
    if case == "nan beta":
        return ["algorithm.beta=.nan"], "algorithm.beta: must be a positive finite number"
    raise AssertionError(case)


CASES = ["missing model folder", "empty model folder", "missing tokenizer folder", "unknown model_type",
         "plain folder as train_file", "missing deepspeed config file", "bad eval.reward", "unwritable output dir",
         "fp16 on CPU", "corrupt parquet", "bad row", "unknown key", "nan beta"]


@pytest.mark.parametrize("case", CASES)
def test_one_line_error_and_exit_code_2(tmp_path, capsys, case):
    if case == "fp16 on CPU":
        import torch

        if torch.cuda.is_available():
            pytest.skip("fp16 is allowed on a GPU")
    cfg = config(tmp_path, steps=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    overrides, message = _setup(tmp_path, case)
    code = main(["train", str(path), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hypo-fast: error: ")
    import re

    assert re.search(message, err), err[-2000:]
