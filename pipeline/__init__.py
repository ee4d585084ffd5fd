"""The top floor: the pipeline that runs both stages. Configuration (`config`), the command line (`cli`), the
benchmarks (`bench`), plans and dry runs (`plans`), the Ray shard runner (`shards`). The only package that
imports both `stages` and `trainer`."""

__version__ = "0.1.0"
