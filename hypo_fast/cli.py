"""``hypo-fast train CONFIG.yaml [key=value ...]``, or as TRL's CLI takes it:
``hypo-fast train --config dpo.yaml --learning_rate 1e-6 --use_peft --lora_target_modules q_proj v_proj``

Multi-GPU and multi-node runs use DeepSpeed's own launcher:
``deepspeed --num_gpus 8 --module hypo_fast.cli train run.yaml`` (add ``--hostfile hosts`` for several nodes;
on CPU-only machines ``deepspeed --num_accelerators 2 --module ...`` or ``torchrun`` start gloo ranks).
To stop such a run cleanly, send SIGTERM to the launcher's process group (``kill -TERM -- -PGID``, as Ctrl-C
and schedulers do): on one node the ``deepspeed`` command does not forward a signal sent to it alone
(docs/faults.md).
"""

from __future__ import annotations

import argparse
import errno
import re
import logging
import sys

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)
NO_PERMISSION = (errno.EACCES, errno.EPERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hypo-fast", description="HyPO / DPO preference fine-tuning")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # `deepspeed` puts it first
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train per a YAML config, with dotted key=value overrides")
    train.add_argument("config", nargs="?", help="YAML config file (or --config FILE, as in TRL)")
    train.add_argument("overrides", nargs="*", help="e.g. algorithm.kl_coef=0.05 learning_rate=1e-6 "
                       "(or TRL's --learning_rate 1e-6)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(trl_arguments(argv))
    if args.command == "train" and args.config is None:
        parser.error("train: give a config file (hypo-fast train run.yaml, or --config run.yaml)")

    from hypo_fast.train.config import load_config
    from hypo_fast.train.distributed import CollectiveTimeout
    from hypo_fast.train.errors import UserError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    try:
        cfg = load_config(args.config, args.overrides)
        from hypo_fast.train.trainer import run

        run(cfg)
    except UserError as err:  # bad config, data, run folder or checkpoint: one line naming it
        print(f"hypo-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: the first one asks for a clean stop after the step
        print("hypo-fast: interrupted; the last saved checkpoint is intact", file=sys.stderr)
        return 130
    except OSError as err:  # a disk that fills, turns read-only or refuses this user, e.g. at start-up
        if err.errno in DISK_FULL:
            print(f"hypo-fast: error: cannot write {err.filename or ''} ({err.strerror}); checkpoints already saved "
                  "are whole: free space and run the same command again", file=sys.stderr)
            return 2
        if err.errno in NO_PERMISSION:
            print(f"hypo-fast: error: cannot access {err.filename or ''} ({err.strerror}); checkpoints already "
                  "saved are whole: give this user access (or choose another output.dir) and run the same command "
                  "again", file=sys.stderr)
            return 2
        raise
    except CollectiveTimeout as err:  # a frozen or dead peer
        print(f"hypo-fast: error: {err}", file=sys.stderr)
        return 3
    return 0


def trl_arguments(argv: list[str]) -> list[str]:
    """TRL's ``--name value`` (``--name=value``; ``--flag`` alone for true, ``--no_flag`` for false; several
    values for a list) → ``name=value`` overrides; ``--config FILE`` → the config argument."""
    out, config, i = [], None, 0
    while i < len(argv):
        item = argv[i]
        if not item.startswith("--") or item == "--local_rank" or item.startswith("--local_rank="):
            out.append(item)
            if item == "--local_rank" and i + 1 < len(argv):
                out.append(argv[i + 1])
                i += 1
            i += 1
            continue
        name, _, inline = item[2:].partition("=")
        values = [inline] if inline else []
        while not inline and i + 1 < len(argv) and not argv[i + 1].startswith("--") \
                and not re.match(r"[\w.]+=", argv[i + 1]):  # a key=value override after a flag
            values.append(argv[i + 1])
            i += 1
        i += 1
        if name == "config":
            config = values[0] if values else None
        elif not values:
            out.append(f"{name[3:]}=false" if name.startswith("no_") and not _is_name(name) else f"{name}=true")
        else:
            out.append(f"{name}={values[0] if len(values) == 1 else '[' + ', '.join(values) + ']'}")
    if config is not None:
        at = out.index("train") + 1 if "train" in out else len(out)
        out.insert(at, config)
    return out


def _is_name(name: str) -> bool:
    from hypo_fast.train import trl_names

    return name in trl_names.NAMES or name in trl_names.trl_fields()


if __name__ == "__main__":
    sys.exit(main())
