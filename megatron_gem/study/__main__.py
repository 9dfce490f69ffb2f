"""``python -m megatron_gem.study``: the study driver's CLI (``megatron_gem.study.driver``)."""

from megatron_gem.study.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
