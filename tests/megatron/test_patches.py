"""megatron_gem.megatron.patches: one registry of every Megatron patch, each reversible."""

import subprocess

import pytest

from megatron_gem.megatron import patches


def test_every_patch_names_its_megatron_version_and_reason():
    known = patches.describe()
    assert {p.name for p in known} == {
        "cpu-mode",
        "dataset-helpers",
        "negative-loss-logging",
        "device-arch",
    }
    from importlib.metadata import version

    for p in known:  # written against the installed megatron-core
        assert p.megatron == version("megatron-core") and len(p.reason) > 40
    with pytest.raises(ValueError, match="patch='typo'"):
        patches.set_attr("typo", patches, "x", 1)


def test_dataset_helper_make_skipped_when_prebuilt_helper_imports(monkeypatch):
    """Megatron runs `make` at start-up and exits on failure; the PyPI wheel has no Makefile."""
    import megatron.core.datasets.utils as dataset_utils

    original = dataset_utils.compile_helpers
    ran = []
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: ran.append(a) or subprocess.CompletedProcess(a, 2)
    )
    with pytest.raises(SystemExit):  # unpatched: the wheel's missing Makefile ends the run
        dataset_utils.compile_helpers()
    assert ran and "dataset-helpers" not in patches.applied()
    ran.clear()
    try:
        assert patches.prebuilt_dataset_helpers() is True
        assert patches.prebuilt_dataset_helpers() is True  # idempotent: the original is kept once
        assert dataset_utils.compile_helpers() is None and ran == []
        assert "dataset-helpers" in patches.applied()
        assert patches.patched_attributes("dataset-helpers") == [
            "megatron.core.datasets.utils.compile_helpers"
        ]
    finally:
        patches.revert("dataset-helpers")
    assert dataset_utils.compile_helpers is original and "dataset-helpers" not in patches.applied()


def test_negative_loss_logging_and_device_arch_are_reversible():
    import megatron.training.arguments as margs
    import megatron.training.training as mtraining

    original_log, original_arch = mtraining.training_log, margs.get_device_arch_version
    try:
        patches.negative_loss_logging()
        patches.negative_loss_logging()  # applied once
        assert mtraining.training_log is not original_log
        assert patches.patched_attributes() == ["megatron.training.training.training_log"]
    finally:
        patches.revert("negative-loss-logging")
    assert mtraining.training_log is original_log and patches.applied() == []
    with patches.device_arch(10):
        assert margs.get_device_arch_version() == 10 and patches.applied() == ["device-arch"]
    assert margs.get_device_arch_version is original_arch and patches.applied() == []
