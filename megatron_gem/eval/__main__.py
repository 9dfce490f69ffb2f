"""``python -m megatron_gem.eval``: the evaluation CLI (``megatron_gem.eval.cli``)."""

from megatron_gem.eval.cli import main

raise SystemExit(main())
