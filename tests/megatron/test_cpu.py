"""megatron_gem.megatron.cpu: inert with CUDA, and what it does without (in-process, undone
after)."""

from __future__ import annotations

import pytest
import torch

from megatron_gem.megatron import cpu as cpu_mode


@pytest.fixture
def cpu_mode_on():
    if torch.cuda.is_available():
        pytest.skip("CPU mode only applies without CUDA")
    try:
        assert cpu_mode.enable_cpu_mode() is True
        yield
    finally:
        cpu_mode.disable_cpu_mode()


def test_inert_when_cuda_is_present(monkeypatch):
    cpu_mode.disable_cpu_mode()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = {
        name: getattr(torch.cuda, name)
        for name in ("current_device", "device_count", "get_rng_state", "Stream")
    }
    tensor_type, tensor_cuda = torch.Tensor.type, torch.Tensor.cuda
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    norm_new = WrappedTorchNorm.__new__
    assert cpu_mode.enable_cpu_mode() is False
    assert WrappedTorchNorm.__new__ is norm_new
    assert cpu_mode.patched_names() == [] and not cpu_mode.is_cpu_mode_enabled()
    for name, value in before.items():
        assert getattr(torch.cuda, name) is value
    assert torch.Tensor.type is tensor_type and torch.Tensor.cuda is tensor_cuda
    assert torch.tensor([1.0]).to("cpu").device.type == "cpu" and cpu_mode._MODE is None
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.training.training as mtraining

    assert mrandom._set_cuda_rng_state.__module__ == "megatron.core.tensor_parallel.random"
    assert mtraining.initialize_megatron.__module__ == "megatron.training.initialize"


def test_cuda_calls_map_to_cpu_and_are_undone(cpu_mode_on):
    from megatron_gem.megatron import patches

    names = cpu_mode.patched_names()
    assert "cpu-mode" in patches.applied() and patches.patched_attributes("cpu-mode") == names
    assert "torch.cuda.current_device" in names  # torch.cuda's stand-ins, through the one registry
    assert cpu_mode.enable_cpu_mode() is True and cpu_mode.patched_names() == names  # idempotent
    assert torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    x = torch.ones(3)
    assert x.cuda() is x and x.to("cuda").device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor" and x.double().type() == "torch.cuda.DoubleTensor"
    assert torch.cuda.current_device() == torch.device("cpu") and torch.cuda.device_count() == 1
    assert not torch.cuda.is_available()  # never claims a GPU
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.current_stream().synchronize()
    cpu_mode.disable_cpu_mode()
    assert cpu_mode.patched_names() == [] and x.type() == "torch.FloatTensor"
    assert "cpu-mode" not in patches.applied()
    with pytest.raises((RuntimeError, AssertionError)):
        torch.tensor([1.0], device="cuda")


def test_megatron_rng_tracker_forks_on_the_cpu_generator(cpu_mode_on):
    """The tracker must really switch streams: fork('tp') draws from its own seed and leaves the
    default stream where it was (without CPU mode, _set_cuda_rng_state never runs)."""
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    torch.manual_seed(11)
    tracker.add("tp", 99)
    default_state = torch.get_rng_state()
    with tracker.fork("tp"):
        a = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), default_state)
    with tracker.fork("tp"):
        b = torch.rand(5)  # continues the tracked stream
    expected = torch.Generator().manual_seed(99)
    assert torch.equal(a, torch.rand(5, generator=expected)) and torch.equal(
        b, torch.rand(5, generator=expected)
    )
    # default stream unaffected by the forks
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(11)))
    # checkpoint round trip of the "CUDA" state is the CPU generator's
    state = torch.cuda.get_rng_state()
    c = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), c)


def _norm_config(sequence_parallel, normalization="RMSNorm"):
    from types import SimpleNamespace

    return SimpleNamespace(
        layernorm_zero_centered_gamma=False,
        persist_layer_norm=False,
        sequence_parallel=sequence_parallel,
        memory_efficient_layer_norm=False,
        normalization=normalization,
    )


def test_torch_norms_under_sequence_parallel_are_marked_for_the_tp_sum(cpu_mode_on):
    """Megatron's torch-norm wrapper asserts under sequence parallelism without Apex/TE; CPU
    mode builds the same torch norm and marks its parameters ``sequence_parallel`` (what
    finalize_model_grads sums over TP; the sums are checked in tests/megatron/
    test_linear_fusion.py::test_cpu_sequence_parallel_norm_standin_gives_the_dense_gradients)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = _norm_config(True)
    rms = WrappedTorchNorm(config=config, hidden_size=6, eps=1e-6)
    assert type(rms) is torch.nn.RMSNorm and rms.eps == 1e-6 and rms.weight.shape == (6,)
    assert rms.weight.sequence_parallel is True and config.sequence_parallel is True
    ln = WrappedTorchNorm(_norm_config(True, "LayerNorm"), 4)
    assert type(ln) is torch.nn.LayerNorm
    assert ln.weight.sequence_parallel is True and ln.bias.sequence_parallel is True
    plain = WrappedTorchNorm(config=_norm_config(False), hidden_size=6)
    assert not hasattr(plain.weight, "sequence_parallel")
    cpu_mode.disable_cpu_mode()
    with pytest.raises(AssertionError, match="sequence parallel not supported"):
        WrappedTorchNorm(config=config, hidden_size=6)
    assert type(WrappedTorchNorm(config=_norm_config(False), hidden_size=6)) is torch.nn.RMSNorm
