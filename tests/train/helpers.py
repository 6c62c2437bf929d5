"""Shared set-up for trainer tests: a toy letter task at test size, and clean subprocess environments.

The task (the embedded demo's until it became the coverage task): prompts and responses over 8 letters, a
gold reward that is the mean of +1 per "good" letter (a–d) and −1 per "bad" one (e–h), offline pairs whose
responses use only a, b, e, f, the preferred one with the higher reward.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from hypo_fast.examples.toy import char_tokenizer

ALPHABET = "abcdefgh"
GOOD = set("abcd")
COVERED = "abef"  # the letters the offline responses use


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Mean over response letters of +1 (a–d) / −1 (e–h); 0 for an empty response (``eval.reward``)."""
    return [sum(1.0 if ch in GOOD else -1.0 for ch in r) / len(r) if r else 0.0 for r in responses]


def write_task(folder: Path, n_prompts: int = 96, pairs_per_prompt: int = 4, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n_prompts):
        prompt = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 5)))
        for _ in range(pairs_per_prompt):
            while True:
                a, b = ("".join(rng.choice(COVERED) for _ in range(rng.randint(4, 6))) for _ in range(2))
                ra, rb = gold_reward([prompt] * 2, [a, b])
                if ra != rb:
                    break
            chosen, rejected = (a, b) if ra > rb else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def demo_config(out: Path, data: Path, tokenizer: Path, kl_coef: float, steps: int) -> dict:
    return {
        "model": {"config": {"model_type": "llama", "vocab_size": 12, "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 64, "tie_word_embeddings": False},
                  "tokenizer": str(tokenizer), "init_seed": 0},
        "data": {"train_file": str(data), "eval_fraction": 0.125, "max_prompt_length": 8, "max_length": 24},
        "algorithm": {"beta": 0.1, "kl_coef": kl_coef, "num_samples": 4},
        "sampling": {"prompts_per_step": 4, "max_new_tokens": 8},
        "optim": {"lr": 1e-3, "max_steps": steps, "pairs_per_micro_batch": 8, "warmup_steps": 5,
                  "scheduler": "constant_with_warmup", "seed": 0},
        "eval": {"every": max(1, steps // 6), "kl_prompts": 32, "kl_samples": 4, "reward": "tests.train.helpers:gold_reward"},
        "output": {"dir": str(out), "save_every": 0, "keep_last": 1, "resume": "never", "overwrite": True,
                   "report_to": []},
    }

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def toy_config(tmp_path: Path, name: str, *, kl_coef: float = 0.0, steps: int = 4, **sections) -> dict:
    tokenizer = tmp_path / "tokenizer"
    if not tokenizer.exists():
        char_tokenizer(ALPHABET).save_pretrained(tokenizer)
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_task(tmp_path, n_prompts=24, pairs_per_prompt=2)
    cfg = demo_config(tmp_path / name, data, tokenizer, kl_coef, steps)
    cfg["eval"].update(every=0, kl_prompts=4, kl_samples=2)
    cfg["sampling"].update(prompts_per_step=2, max_new_tokens=6)
    cfg["optim"].update(pairs_per_micro_batch=4, lr=1e-3)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def subprocess_env() -> dict:
    """The parent's environment without the process-group variables an in-process run may have set."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), env.get("PYTHONPATH")]))
    return env


PYTHON = sys.executable
