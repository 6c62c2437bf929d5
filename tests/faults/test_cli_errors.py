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
        return ["model.config={model_type: nonsense}"], "model.config.model_type: 'nonsense' is not a model type"
    if case == "truncated model.safetensors in model.path":
        folder = _saved_model(tmp_path)
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        return ["model.config=null", f"model.path={folder}", "model.tokenizer=null"], \
            "model.path: cannot load a causal LM from .*SafetensorError"
    if case == "unknown model_type in model.path":
        folder = _saved_model(tmp_path)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "nonsense"}))
        return ["model.config=null", f"model.path={folder}", "model.tokenizer=null"], "model.path: cannot load"
    if case == "empty data file":
        (tmp_path / "empty.jsonl").write_text("")
        return [f"data.train_file={tmp_path}/empty.jsonl"], "empty.jsonl: no rows"
    if case == "data.split on a file":
        return ["data.split=test"], "data.split: 'test', but .*pairs.jsonl holds a single split"
    if case == "data.split on a saved Dataset":
        _saved_dataset(tmp_path, dict_=False)
        return [f"data.train_file={tmp_path}/saved", "data.split=test"], "data.split: 'test', but .*saved holds a single"
    if case == "missing data.eval_split":
        _saved_dataset(tmp_path, dict_=True)
        return [f"data.train_file={tmp_path}/saved", "data.split=train", "data.eval_split=validation",
                "data.eval_fraction=0"], "data.eval_split: 'validation', but .*a DatasetDict with splits"
    if case == "chosen equals rejected":
        row = json.dumps({"prompt": "ab", "chosen": "cd", "rejected": "cd"})
        (tmp_path / "same.jsonl").write_text(row + "\n" + row + "\n")
        return [f"data.train_file={tmp_path}/same.jsonl"], \
            "same.jsonl: line 1: chosen and rejected are the same \\(and 1 more bad rows, the next: .*line 2"
    if case == "missing resume checkpoint":
        return [f"output.resume={tmp_path}/run/checkpoint-9"], "output.resume: .*checkpoint-9: no such checkpoint folder"
    if case == "resume and overwrite":
        (tmp_path / "ckpt").mkdir()
        return [f"output.resume={tmp_path}/ckpt", "output.overwrite=true"], "output.resume=.* and output.overwrite=true: give one"
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


def _saved_model(tmp_path):
    """A tiny model saved in Hugging Face format, with the toy tokenizer beside it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, AutoTokenizer

    folder = tmp_path / "model"
    config = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tmp_path / "tokenizer").save_pretrained(folder)
    return folder


def _saved_dataset(tmp_path, dict_: bool):
    import datasets

    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    table = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({"train": table}) if dict_ else table).save_to_disk(str(tmp_path / "saved"))


CASES = ["missing model folder", "empty model folder", "missing tokenizer folder", "unknown model_type",
         "truncated model.safetensors in model.path", "unknown model_type in model.path", "empty data file",
         "data.split on a file", "data.split on a saved Dataset", "missing data.eval_split", "chosen equals rejected",
         "missing resume checkpoint", "resume and overwrite",
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
    assert len(last) < 600, len(last)  # one readable line, not a list of every model type
    import re

    assert re.search(message, err), err[-2000:]


def test_an_error_line_from_a_library_is_cut_short():
    from hypo_fast.models.loading import short_reason

    listing = ValueError("Unrecognized model identifier: x. Should contain one of " + ", ".join(["llama"] * 2000))
    assert len(short_reason(listing)) <= 302 and short_reason(ValueError("a\nb")) == "a"
