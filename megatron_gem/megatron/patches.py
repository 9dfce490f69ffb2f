"""Every patch megatron-gem applies to Megatron (and, for CPU mode, to torch), in one registry.

A patch replaces module attributes; each has a name, the megatron-core version it was written
against and its reason (``KNOWN``), is applied only by the code path that needs it, and is
reversible (``revert``). ``applied()`` lists what is in force in this process, ``describe()``
every patch the package can apply.

    >>> from megatron_gem.megatron import patches
    >>> patches.applied()        # e.g. ['cpu-mode', 'dataset-helpers'] in a CPU training run
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

__all__ = [
    "KNOWN",
    "Patch",
    "applied",
    "describe",
    "is_applied",
    "patched_attributes",
    "revert",
    "set_attr",
    "prebuilt_dataset_helpers",
    "negative_loss_logging",
    "device_arch",
]

MEGATRON_VERSION = "0.19.2"


@dataclasses.dataclass(frozen=True)
class Patch:
    name: str
    reason: str
    megatron: str = MEGATRON_VERSION


KNOWN = {
    p.name: p
    for p in (
        Patch(
            "cpu-mode",
            "megatron.core / megatron.training assume CUDA in ~64 places; "
            "megatron_gem.megatron.cpu stands in for torch.cuda and maps device='cuda' to the CPU "
            "(only with the entry's --cpu, never when CUDA is available)",
        ),
        Patch(
            "dataset-helpers",
            "initialize_megatron always runs `make -C megatron/core/datasets`; "
            "the PyPI wheel ships the compiled helpers_cpp but no Makefile, so start-up fails: "
            "skip the make when the prebuilt helper imports (GPU hosts too)",
        ),
        Patch(
            "negative-loss-logging",
            "training_log prints a loss only if its average is >= 0; the "
            "GEM loss E_q[z] - z_y is negative once the model fits: append the negative averages "
            "to the same iteration line (tensorboard/wandb get every value anyway); on those "
            "log iterations, before the line, raise the GEM op's deferred errors (an "
            "out-of-vocabulary label: megatron_gem.ops.raise_deferred_errors), where the host "
            "waits for the device anyway",
        ),
        Patch(
            "device-arch",
            "validate_args asks the GPU's architecture for its TP/CP checks: without "
            "CUDA (the launch dry run, conversion workers) answer the cluster's, only while "
            "arguments are validated",
        ),
    )
}

_LOCK = threading.RLock()
_MISSING = object()
# patch name -> {(owner, attribute): original value}, in the order they were set
_ORIGINALS: dict[str, dict[tuple[object, str], object]] = {}


def set_attr(patch: str, owner, attribute: str, value) -> None:
    """Set ``owner.attribute = value`` as part of the known patch ``patch`` (the first original
    is kept for ``revert``)."""
    if patch not in KNOWN:
        raise ValueError(f"patch={patch!r}: not one of the known patches {sorted(KNOWN)}")
    with _LOCK:
        originals = _ORIGINALS.setdefault(patch, {})
        originals.setdefault((owner, attribute), getattr(owner, attribute, _MISSING))
        setattr(owner, attribute, value)


def revert(patch: str) -> None:
    """Undo every attribute ``patch`` set (a no-op when it is not applied)."""
    with _LOCK:
        for (owner, attribute), value in reversed(list(_ORIGINALS.pop(patch, {}).items())):
            if value is _MISSING:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, value)


def is_applied(patch: str) -> bool:
    return bool(_ORIGINALS.get(patch))


def applied() -> list[str]:
    """Names of the patches in force in this process."""
    return sorted(name for name, originals in _ORIGINALS.items() if originals)


def patched_attributes(patch: str | None = None) -> list[str]:
    """``module.attribute`` names replaced by ``patch`` (or by any patch)."""
    names = [patch] if patch else list(_ORIGINALS)
    return sorted(
        f"{getattr(o, '__name__', type(o).__name__)}.{a}"
        for n in names
        for o, a in _ORIGINALS.get(n, {})
    )


def describe() -> list[Patch]:
    """Every patch the package can apply, with its Megatron version and reason."""
    return list(KNOWN.values())


# --------------------------------------------------------------------------- the patches
def prebuilt_dataset_helpers() -> bool:
    """Apply ``dataset-helpers`` when the prebuilt ``helpers_cpp`` imports (a wheel install);
    a source checkout without it keeps Megatron's ``make``. Returns whether it is applied."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return False
    import megatron.core.datasets.utils as dataset_utils

    set_attr("dataset-helpers", dataset_utils, "compile_helpers", lambda: None)
    return True


def negative_loss_logging() -> None:
    """Apply ``negative-loss-logging`` (for ``--loss gem``): the same running averages over the
    same iterations as Megatron's, the negative ones appended to its iteration line; a bad
    label seen by the sync-free GEM op since the last log line raises before the next one."""
    import megatron.training.training as mtraining

    from megatron_gem.ops import raise_deferred_errors

    if is_applied("negative-loss-logging"):
        return
    original = mtraining.training_log
    sums: dict = {}  # key -> running sum (a tensor: no host sync until a log line)
    state = {"count": 0}

    def training_log(
        loss_dict,
        total_loss_dict,
        learning_rate,
        iteration,
        loss_scale,
        report_memory_flag,
        skipped_iter,
        *args,
        **kwargs,
    ):
        from megatron.training import get_args

        if not skipped_iter:
            state["count"] += 1
            for key, value in loss_dict.items():
                value = value.detach().float() if hasattr(value, "detach") else float(value)
                sums[key] = sums.get(key, 0.0) + value
        first = kwargs.get("is_first_iteration", False)
        extra = ""
        if iteration % get_args().log_interval == 0 or first:
            raise_deferred_errors()
            for key, total in sums.items():
                avg = float(total) / max(1, state["count"])
                if avg < 0.0:
                    extra += f" {key}: {avg:.6E} |"
            if not first:
                sums.clear()
                state["count"] = 0
        call = (
            loss_dict,
            total_loss_dict,
            learning_rate,
            iteration,
            loss_scale,
            report_memory_flag,
            skipped_iter,
            *args,
        )
        if not extra:
            return original(*call, **kwargs)
        print_rank_last = mtraining.print_rank_last

        def print_with_extra(message):
            if " iteration " in message and " consumed samples: " in message:
                at = message.find(" loss scale:")  # right after the losses Megatron printed
                message = message[:at] + extra + message[at:] if at >= 0 else message + extra
            print_rank_last(message)

        mtraining.print_rank_last = print_with_extra  # only for this call, restored below
        try:
            return original(*call, **kwargs)
        finally:
            mtraining.print_rank_last = print_rank_last

    set_attr("negative-loss-logging", mtraining, "training_log", training_log)


@contextlib.contextmanager
def device_arch(major: int):
    """``device-arch`` for the duration of the block: without CUDA, Megatron's
    ``get_device_arch_version`` answers ``major`` (9 = Hopper, 10 = Blackwell)."""
    import megatron.training.arguments as margs
    import torch

    if (
        torch.cuda.is_available()
        or not hasattr(margs, "get_device_arch_version")
        or is_applied("device-arch")
    ):
        yield
        return
    set_attr("device-arch", margs, "get_device_arch_version", lambda: major)
    try:
        yield
    finally:
        revert("device-arch")
