"""``python -m megatron_gem.train``: the training entry (``megatron_gem.train.entry``)."""

from megatron_gem.train.entry import main

if __name__ == "__main__":  # not when a worker re-imports this module as __mp_main__
    raise SystemExit(main())
