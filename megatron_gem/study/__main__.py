"""``python -m megatron_gem.study``: the study's CLI (``megatron_gem.study.cli``)."""

from megatron_gem.study.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
