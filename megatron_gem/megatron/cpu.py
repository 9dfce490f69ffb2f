"""CPU mode: run Megatron's real training loop (``megatron.training.pretrain``) on CPUs with gloo.

Every CUDA assumption of megatron-core / megatron.training that blocks a CPU run is worked
around HERE and nowhere else, and only when CUDA is absent: ``enable_cpu_mode()`` does nothing
when ``torch.cuda.is_available()`` is true. What it patches (all reversible, see
``disable_cpu_mode``):

* ``torch.cuda`` stand-ins: ``current_device()`` is the CPU device, ``device_count()`` is 1
  (``initialize.py`` only builds the model-parallel groups and seeds the RNG tracker when it is
  > 0), no-op ``set_device``/``synchronize``/``empty_cache``, dummy ``Stream``/``Event``, zero
  memory statistics, fake device properties. ``is_available()`` stays False.
* The "CUDA" random generator IS the CPU default generator (``torch.cuda.get/set_rng_state``,
  ``manual_seed``), and Megatron's ``tensor_parallel.random._set_cuda_rng_state`` (which defers
  through ``torch.cuda._lazy_call`` and so silently never runs without CUDA) sets it at once.
  Without this the RNG tracker's ``fork()`` does nothing: tensor-parallel shards are drawn from
  one stream and checkpoints store no usable RNG state, so resume is not exact.
* Literal ``device="cuda"`` in tensor factories (``torch.tensor(..., device="cuda")`` in the
  loop, schedules, optimizer, clip_grads) and ``.to("cuda")``/``.cuda()`` map to the CPU,
  through a ``TorchFunctionMode`` so new call sites are covered without listing them.
* DataLoader iterators leave the default generator as they found it (their seed draw would
  otherwise shift the dropout stream of a resumed run).
* ``Tensor.type()`` reports ``torch.cuda.*Tensor`` names for CPU tensors (the optimizers and
  ``clip_grads`` assert on those strings).
* ``megatron.training.training.initialize_megatron`` gets ``allow_no_cuda=True``.
* ``torch._dynamo`` is disabled: Megatron's ``@jit_fuser`` helpers would otherwise spend ~15 s
  per process compiling inductor kernels for a CPU smoke run.
* Sequence parallelism with torch norms (the local spec's ``WrappedTorchNorm``, which asserts
  "sequence parallel not supported by torch LayerNorm" without Apex/TE): the norm is built as
  without sequence parallelism and its parameters get ``sequence_parallel = True``, as Apex's
  ``FusedLayerNorm`` marks them. That attribute is all sequence parallelism needs from a norm:
  each TP rank normalises its own sequence shard (a norm is per token) and Megatron's
  ``finalize_model_grads`` sums the marked parameters' gradients over the TP group.

Not here on purpose: the dataset-helper ``make`` at start-up is not CPU-specific (it breaks the
PyPI wheel on GPU hosts too); ``megatron_gem.train`` handles it. Choosing the local (non-TE)
transformer implementation is an argument default, also set by ``megatron_gem.train``.

Known CPU limits: fp32 is the tested precision; ``--bf16`` runs (the entry adds
``--no-masked-softmax-fusion``: the fused softmax is a CUDA extension) but is slow and not
bit-compatible with GPU runs; Transformer Engine, fused kernels and CUDA graphs are
unavailable.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import threading
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode

from megatron_gem.megatron import patches

__all__ = ["enable_cpu_mode", "disable_cpu_mode", "is_cpu_mode_enabled", "patched_names"]

_LOCK = threading.Lock()
_MODE: TorchFunctionMode | None = None
_LOG_FILTER: logging.Filter | None = None
_RNG_LOGGER = "megatron.core.tensor_parallel.random"


def _patch(owner, name: str, value) -> None:
    patches.set_attr("cpu-mode", owner, name, value)


_ENV_SET: list[str] = []


def _patch_env(name: str, value: str) -> None:
    os.environ[name] = value
    _ENV_SET.append(name)


def is_cpu_mode_enabled() -> bool:
    return patches.is_applied("cpu-mode")


def patched_names() -> list[str]:
    """``module.attribute`` names currently replaced by CPU mode (empty when inactive)."""
    return patches.patched_attributes("cpu-mode")


# --------------------------------------------------------------------------- torch.cuda stand-ins
class _DummyEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _DummyStream:
    def __init__(self, *args, **kwargs):
        self.device = torch.device("cpu")

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _DummyEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_STREAM = _DummyStream()


def _noop(*args, **kwargs):
    return None


def _zero(*args, **kwargs):
    return 0


def _cpu_device(*args, **kwargs):
    return torch.device("cpu")


def _stream_ctx(*args, **kwargs):
    return contextlib.nullcontext()


def _device_properties(*args, **kwargs):
    return SimpleNamespace(
        name="cpu (megatron_gem.megatron.cpu)",
        major=0,
        minor=0,
        total_memory=0,
        multi_processor_count=1,
    )


def _get_rng_state(device="cuda"):
    return torch.default_generator.get_state()


def _set_rng_state(new_state, device="cuda"):
    torch.default_generator.set_state(new_state)


def _manual_seed(seed):
    # not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. this function
    torch.default_generator.manual_seed(int(seed))


def _megatron_get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.default_generator.get_state()
    return state.clone() if clone else state


def _megatron_set_cuda_rng_state(new_state, device=-1, graph_safe=False):
    torch.default_generator.set_state(new_state)


# --------------------------------------------------------------------------- "cuda" -> cpu devices
def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _to_cpu(device):
    return torch.device("cpu") if _is_cuda(device) else device


_TO_FUNCS = {torch.Tensor.to, torch.Tensor.cuda}


class _CudaToCpuMode(TorchFunctionMode):
    """Maps ``device="cuda"`` (and ``.to("cuda")``) to the CPU in every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _is_cuda(device):
                kwargs = dict(kwargs, device=torch.device("cpu"))
        if func in _TO_FUNCS:
            if func is torch.Tensor.cuda:
                return args[0]
            args = tuple(_to_cpu(a) for a in args)
        return func(*args, **(kwargs or {}))


def _tensor_cuda(self, *args, **kwargs):
    return self


def _module_cuda(self, *args, **kwargs):
    return self


_ORIG_TENSOR_TYPE = torch.Tensor.type


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None:
        name = _ORIG_TENSOR_TYPE(self)
        if (
            self.device.type == "cpu"
            and name.startswith("torch.")
            and not name.startswith("torch.cuda.")
        ):
            return "torch.cuda." + name[len("torch.") :]
        return name
    if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
        dtype = "torch." + dtype[len("torch.cuda.") :]
    return _ORIG_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _keep_default_rng(init):
    """DataLoader iterators draw their base seed from the default generator. On CPU that is
    also the "CUDA" generator dropout uses, and the draw happens after a checkpoint's RNG state
    was restored, so a resumed run would drop out differently. Keep the stream untouched, as on
    GPU where the draw does not touch the dropout generator."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        state = torch.default_generator.get_state()
        try:
            init(self, *args, **kwargs)
        finally:
            torch.default_generator.set_state(state)

    return __init__


class _DropRngWarning(logging.Filter):
    # With one generator for "CPU" and "CUDA", every fork() changes the CPU state by design.
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _distinct(value):
    """A fresh function object per patched name (torch._dynamo keys its rules by identity)."""
    if isinstance(value, type) or not callable(value):
        return value
    return functools.wraps(value)(lambda *args, **kwargs: value(*args, **kwargs))


class _WithoutSequenceParallel:
    """A read-only view of a TransformerConfig with ``sequence_parallel=False``."""

    sequence_parallel = False

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name):
        return getattr(self._config, name)


def _sequence_parallel_torch_norm(original_new):
    """``WrappedTorchNorm.__new__`` that builds the torch norm under sequence parallelism and
    marks its parameters for Megatron's TP gradient sum (see the module docstring)."""

    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not getattr(config, "sequence_parallel", False):
            return original_new(cls, config, hidden_size, *args, **kwargs)
        norm = original_new(cls, _WithoutSequenceParallel(config), hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return __new__


# --------------------------------------------------------------------------- enable / disable
def enable_cpu_mode() -> bool:
    """Apply the CPU workarounds when CUDA is absent. Idempotent.

    Returns True when CPU mode is (now) active, False when CUDA is available (nothing is
    touched then). Call before ``megatron.training.pretrain`` and before building models.
    """
    global _MODE, _LOG_FILTER
    with _LOCK:
        if torch.cuda.is_available():
            return False
        if is_cpu_mode_enabled():
            return True
        # Import what we patch first: torch._dynamo builds an identity map of torch functions
        # on import and rejects one stand-in function registered under two names.
        dynamo_config = importlib.import_module("torch._dynamo.config")
        importlib.import_module("torch._dynamo").trace_rules.get_torch_obj_rule_map()
        import megatron.core.tensor_parallel.random as mrandom
        import megatron.training.training as mtraining
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        cuda = torch.cuda
        for name, value in {
            "current_device": _cpu_device,
            "device_count": lambda: 1,
            "set_device": _noop,
            "synchronize": _noop,
            "empty_cache": _noop,
            "ipc_collect": _noop,
            "reset_peak_memory_stats": _noop,
            "reset_max_memory_allocated": _noop,
            "memory_allocated": _zero,
            "max_memory_allocated": _zero,
            "memory_reserved": _zero,
            "max_memory_reserved": _zero,
            "memory_stats": lambda *a, **k: {},
            "mem_get_info": lambda *a, **k: (0, 0),
            "get_device_properties": _device_properties,
            "get_device_name": lambda *a, **k: "cpu (megatron_gem.megatron.cpu)",
            "get_device_capability": lambda *a, **k: (0, 0),
            "is_current_stream_capturing": lambda: False,
            "Stream": _DummyStream,
            "Event": _DummyEvent,
            "current_stream": lambda *a, **k: _STREAM,
            "default_stream": lambda *a, **k: _STREAM,
            "set_stream": _noop,
            "stream": _stream_ctx,
            "get_rng_state": _get_rng_state,
            "set_rng_state": _set_rng_state,
            "manual_seed": _manual_seed,
            "manual_seed_all": _manual_seed,
        }.items():
            _patch(cuda, name, _distinct(value))
        for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all"):
            _patch(torch.cuda.random, name, getattr(cuda, name))
        _patch(torch.Tensor, "cuda", _tensor_cuda)
        _patch(torch.Tensor, "type", _tensor_type)
        _patch(torch.nn.Module, "cuda", _module_cuda)
        iter_base = torch.utils.data.dataloader._BaseDataLoaderIter
        _patch(iter_base, "__init__", _keep_default_rng(iter_base.__init__))

        _patch(dynamo_config, "disable", True)
        # every spec module holds the class itself (``from ... import``): patch the class
        _patch(WrappedTorchNorm, "__new__", _sequence_parallel_torch_norm(WrappedTorchNorm.__new__))
        _patch(mrandom, "_get_cuda_rng_state", _megatron_get_cuda_rng_state)
        _patch(mrandom, "_set_cuda_rng_state", _megatron_set_cuda_rng_state)
        _patch(
            mtraining,
            "initialize_megatron",
            functools.partial(mtraining.initialize_megatron, allow_no_cuda=True),
        )
        # Megatron asserts this for TP/CP (a CUDA stream-ordering knob); meaningless on CPU.
        if "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ:
            _patch_env("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        _LOG_FILTER = _DropRngWarning()
        logging.getLogger(_RNG_LOGGER).addFilter(_LOG_FILTER)

        _MODE = _CudaToCpuMode()
        _MODE.__enter__()
        print(
            "> megatron_gem: CUDA not available, CPU mode on (gloo backend, local transformer)",
            file=sys.stderr,
            flush=True,
        )
        return True


def disable_cpu_mode() -> None:
    """Undo ``enable_cpu_mode`` (for tests). Safe to call when inactive."""
    global _MODE, _LOG_FILTER
    with _LOCK:
        if _MODE is not None:
            _MODE.__exit__(None, None, None)
            _MODE = None
        if _LOG_FILTER is not None:
            logging.getLogger(_RNG_LOGGER).removeFilter(_LOG_FILTER)
            _LOG_FILTER = None
        patches.revert("cpu-mode")
        for name in _ENV_SET:
            os.environ.pop(name, None)
        _ENV_SET.clear()
