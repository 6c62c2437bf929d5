"""``hypo-fast train CONFIG.yaml [key=value ...]``

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
import logging
import sys

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hypo-fast", description="HyPO / DPO preference fine-tuning")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # `deepspeed` puts it first
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train per a YAML config, with dotted key=value overrides")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="e.g. algorithm.kl_coef=0.05 optim.lr=1e-6")
    args = parser.parse_args(argv)

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
    except OSError as err:  # a disk that fills (or turns read-only) outside the training loop, e.g. at start-up
        if err.errno not in DISK_FULL:
            raise
        print(f"hypo-fast: error: cannot write {err.filename or ''} ({err.strerror}); checkpoints already saved are "
              "whole: free space and run the same command again", file=sys.stderr)
        return 2
    except CollectiveTimeout as err:  # a frozen or dead peer
        print(f"hypo-fast: error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
