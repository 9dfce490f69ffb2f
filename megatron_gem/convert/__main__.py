"""``python -m megatron_gem.convert``: the conversion CLI (`megatron_gem.convert.cli`)."""

from megatron_gem.convert.cli import main

raise SystemExit(main())
