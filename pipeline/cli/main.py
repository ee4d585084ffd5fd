"""The `dra-pipe` command line: one module per command group, registered here. Every command reads
pipeline.yaml; its flags override the file's keys."""
from __future__ import annotations

import sys

import typer

from pipeline.cli import bench, data, eval, extract, generate, models, run, select, sweep, train
from stores.errors import IntegrityError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="dra-pipe: diffusion models as data source and as frozen teacher for adversarial training.\n\n"
                       "Stage 1 writes images and diffusion features once into sharded stores; stage 2 streams them.")
for group in (data, models, generate, extract, select, train, eval, run, sweep, bench):
    group.register(app)


def main() -> None:
    """Entry point: bad input -> one line and exit 2; damaged data -> one line and exit 1."""
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except IntegrityError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: finished shards and checkpoints are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        from pipeline.shards.runner import ShardFailed, WorkerStartError
        if isinstance(exc, (ShardFailed, WorkerStartError)):
            print(f"error: {exc}; finished shards are kept, rerun the same command to resume", file=sys.stderr)
            sys.exit(1)
        raise

if __name__ == "__main__":
    main()
