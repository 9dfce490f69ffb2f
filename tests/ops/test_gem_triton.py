"""megatron_gem.ops.gem_triton (Triton kernels; under the interpreter on CPU, see conftest) against
float64 references written from the formulas, and against the torch op they replace.

Sizes are tiny and odd (7 rows x 1000 columns, blocks of 256: three full blocks and a ragged
tail) because the interpreter is slow. Low-precision inputs are compared with a reference of
their own (exactly representable) values, so the sums must be as exact as for fp32; only the
gradient's one cast to bf16/fp16 adds its half-ulp rounding.
"""

import importlib
import os
import subprocess
import sys
import zlib

import pytest
import torch

from conftest import REPO
from megatron_gem import gem_loss
from megatron_gem.ops import gem_triton

# the torch op's module (the package re-exports its function under the same name)
TORCH_OP = importlib.import_module("megatron_gem.ops.gem_loss")
N, V, BLOCK = 7, 1000, 256
# the interpreter runs on CPU tensors; compiled kernels (a CUDA machine) on CUDA ones
DEVICE = "cpu" if gem_triton._INTERPRETED else "cuda"
NEG_INF = float("-inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
pytestmark = pytest.mark.skipif(
    not gem_triton.available(), reason="needs triton with CUDA or its interpreter"
)


def make_logits(dtype, seed, scale=3.0):
    """[N, V] logits in `dtype` with -inf columns: row 1 all -inf, row 2 a padded tail and -inf
    across a block boundary, row 3 a first block all -inf (the online max starts at -inf)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=gen, dtype=torch.float64) * scale
    z[1] = NEG_INF
    z[2, V - 37 :] = NEG_INF
    z[2, BLOCK - 2 : BLOCK + 3] = NEG_INF
    z[3, : BLOCK + 45] = NEG_INF
    return z.to(dtype)


def global_max_and_zy(z, seed):
    """A global row max above this shard's (other shards hold larger logits on some rows) and a
    global target logit (on this shard for some rows, from another shard for the others), as
    the op hands them to logsigmoid."""
    gen = torch.Generator().manual_seed(seed + 1)
    z64 = z.double()
    shard_max = torch.where(z64.isfinite(), z64, -1e300).amax(-1)
    m = shard_max + torch.tensor([0.0, 0.0, 0.5, 0.0, 1.25, 0.0, 0.3], dtype=torch.float64)
    m[1] = 1.3  # all -inf here: the max is elsewhere
    zy = torch.rand(N, generator=gen, dtype=torch.float64) * 4 - 2
    zy[[0, 4]] = z64[[0, 4], [11, 600]]
    return m.float(), zy.float()


def reference_sums(z, beta, logsigmoid, shift=None, zy=None):
    """float64 [S, A, U, S1, U1 / beta] and the shift (given, or the row max), from the
    definitions: x = (z - shift) / beta, e = exp(x), p = exp(z - shift), w = 1 or
    sigmoid(0.01 (z - z_y)); S = sum e, A = sum e w, U = sum e w x, S1 = sum p,
    U1 / beta = sum p x (a term with e = 0 is 0)."""
    z = z.double()
    shift = z.amax(-1) if shift is None else shift.double()
    if logsigmoid:
        w = torch.sigmoid(0.01 * (z - zy.double().unsqueeze(-1)))
    else:
        w = torch.ones_like(z)
    x = (z - torch.where(shift > NEG_INF, shift, 0.0).unsqueeze(-1)) / beta
    e, p = torch.exp(x), torch.exp(beta * x)
    ew = e * w

    def sum_times_x(weights):
        return torch.where(weights > 0, weights * x, 0.0).sum(-1)

    sums = [e.sum(-1), ew.sum(-1), sum_times_x(ew), p.sum(-1), sum_times_x(p)]
    return torch.stack(sums), shift


def reference_grad(z, local_target, row_scale, sum_ew, beta, logsigmoid, m, zy):
    """float64 (e w - sum_ew onehot(local_target)) * row_scale, e = exp((z - m) / beta); a row
    max of -inf (the row is all -inf) shifts by 0."""
    z, m = z.double(), m.double()
    e = torch.exp((z - torch.where(m > NEG_INF, m, 0.0).unsqueeze(-1)) / beta)
    if logsigmoid:
        e = e * torch.sigmoid(0.01 * (z - zy.double().unsqueeze(-1)))
    onehot = torch.arange(z.shape[1]) == local_target.unsqueeze(-1)
    return (e - sum_ew.double().unsqueeze(-1) * onehot) * row_scale.double().unsqueeze(-1)


def _on(device, kwargs):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def row_sums(z, **kwargs):
    """local_row_sums on DEVICE, results back on the CPU."""
    sums, shift = gem_triton.local_row_sums(z.to(DEVICE), **_on(DEVICE, kwargs))
    return sums.cpu(), shift.cpu()


def grad_of(z, *rows, **kwargs):
    """gem_grad on DEVICE, the gradient back on the CPU."""
    rows = [r.to(DEVICE) for r in rows]
    return gem_triton.gem_grad(z.to(DEVICE), *rows, **_on(DEVICE, kwargs)).cpu()


def sums_args(z, h, seed, shift="today"):
    """shift / zy arguments: "today" as the torch op passes them (linear: the shard max found in
    the pass; logsigmoid: the global max given), "online" or "given" for either h."""
    m, zy = global_max_and_zy(z, seed)
    args = {"zy": zy} if h == "logsigmoid" else {}
    if shift == "given" or (shift == "today" and h == "logsigmoid"):
        args["shift"] = m
    return args


@pytest.mark.parametrize("shift", ["online", "given"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [1.0, 0.7, 0.31])
@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_row_sums_match_float64_reference(h, beta, dtype, shift):
    seed = zlib.crc32(repr((h, beta, str(dtype), shift)).encode())
    z = make_logits(dtype, seed)
    logsigmoid = h == "logsigmoid"
    args = sums_args(z, h, seed, shift)
    sums, row_shift = row_sums(
        z, beta=beta, logsigmoid=logsigmoid, with_stats=True, block_v=BLOCK, **args
    )
    ref, ref_shift = reference_sums(z, beta, logsigmoid, **args)
    assert sums.dtype == torch.float32 and sums.shape == (5, N)
    torch.testing.assert_close(row_shift.double(), ref_shift, rtol=0, atol=0)
    torch.testing.assert_close(sums.double(), ref, rtol=1e-6, atol=0)
    assert torch.all(sums[:, 1] == 0), "a row all -inf on this shard has no mass here"
    assert shift == "given" or row_shift[1] == NEG_INF
    if not logsigmoid:
        assert torch.equal(sums[1], sums[0]), "linear: A = S"
    if beta == 1.0:  # p = q: the torch op copies these, so they must agree exactly
        assert torch.equal(sums[3], sums[0])
        if not logsigmoid:
            assert torch.equal(sums[4], sums[2])
    plain, _ = row_sums(
        z, beta=beta, logsigmoid=logsigmoid, with_stats=False, block_v=BLOCK, **args
    )
    assert plain.shape == (3, N) and torch.equal(plain, sums[:3])


def grad_case(z, h, seed):
    """Per-row inputs of the backward: targets on this shard (first block, a block boundary,
    the ragged tail), off it (below, at V_local), ignored rows (row_scale 0, one with its
    target here)."""
    gen = torch.Generator().manual_seed(seed + 2)
    local_target = torch.tensor([5, 17, -3, V, BLOCK, V - 1, -100])
    row_scale = torch.rand(N, generator=gen) + 0.25
    row_scale[[5, 6]] = 0.0
    sum_ew = torch.rand(N, generator=gen) * 2 + 0.1
    m, zy = global_max_and_zy(z, seed)
    m[1] = NEG_INF  # row 1 all -inf everywhere
    return local_target, row_scale, sum_ew, m, (zy if h == "logsigmoid" else None)


# half an ulp of each dtype, relative: the one rounding of the fp32 gradient
_CAST_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8 * 1.01, torch.float16: 2**-11 * 1.01}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [1.0, 0.7, 0.31])
@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_grad_matches_float64_reference(h, beta, dtype):
    seed = zlib.crc32(repr(("grad", h, beta, str(dtype))).encode())
    z = make_logits(dtype, seed)
    logsigmoid = h == "logsigmoid"
    t, row_scale, sum_ew, m, zy = grad_case(z, h, seed)
    z[5, 123], z[6, 7] = float("nan"), float("inf")  # ignored rows: never read
    kwargs = {"beta": beta, "logsigmoid": logsigmoid, "m": m, "zy": zy, "block_v": BLOCK}
    grad = grad_of(z, t, row_scale, sum_ew, **kwargs)
    ref = reference_grad(z, t, row_scale, sum_ew, beta, logsigmoid, m, zy)
    ref[row_scale == 0] = 0.0
    assert grad.dtype == dtype and grad.shape == z.shape
    assert torch.all(grad[5:] == 0), "ignored rows give zeros"
    assert torch.all(grad[1, torch.arange(V) != 17] == 0), "-inf logits give 0, not NaN"
    assert grad[1, 17] < 0 and grad[0, 5] < 0 and grad[4, BLOCK] < 0, "target term missed"
    torch.testing.assert_close(
        grad.double(), ref, rtol=_CAST_RTOL[dtype], atol=1e-6 * ref.abs().max().item()
    )
    if dtype != torch.float32:  # fp32 throughout, then ONE cast: bit-exact to fp32 then cast
        from_fp32 = grad_of(z.float(), t, row_scale, sum_ew, **kwargs)
        assert torch.equal(grad, from_fp32.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_grad_in_place_equals_fresh(h, dtype):
    z = make_logits(dtype, seed=3)
    t, row_scale, sum_ew, m, zy = grad_case(z, h, seed=3)
    kwargs = {"beta": 0.7, "logsigmoid": h == "logsigmoid", "m": m, "zy": zy, "block_v": BLOCK}
    fresh = grad_of(z, t, row_scale, sum_ew, **kwargs)
    logits = z.to(DEVICE, copy=True)
    rows = [r.to(DEVICE) for r in (t, row_scale, sum_ew)]
    out = gem_triton.gem_grad(logits, *rows, out=logits, **_on(DEVICE, kwargs))
    assert out.data_ptr() == logits.data_ptr()
    assert torch.equal(out.cpu(), fresh) and not torch.equal(out.cpu(), z)


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_nan_logit_poisons_its_row_sum(h):
    z = make_logits(torch.float32, seed=5)
    args = sums_args(z, h, seed=5)
    kwargs = {"beta": 0.7, "logsigmoid": h == "logsigmoid", "with_stats": True, "block_v": BLOCK}
    clean, _ = row_sums(z, **kwargs, **args)
    z[4, 300] = float("nan")
    sums, _ = row_sums(z, **kwargs, **args)
    assert torch.isnan(sums[0, 4])
    others = torch.arange(N) != 4
    assert torch.equal(sums[:, others], clean[:, others])


def _torch_op_sums(z, beta, logsigmoid, shift, zy):
    """The torch op's sums for one chunk, completed as its forward completes them."""
    shift = torch.empty(N) if shift is None else shift.clone()
    sums, (x, e) = torch.empty(5, N), torch.empty(2, N, V)
    TORCH_OP._chunk_sums(z, shift, zy, 1 / beta, beta, logsigmoid, True, x, e, sums)
    if beta == 1.0:
        sums[3] = sums[0]
        if not logsigmoid:
            sums[4] = sums[2]
    if not logsigmoid:
        sums[1] = sums[0]
    return sums, shift


@pytest.mark.parametrize("beta", [1.0, 0.7])
@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_row_sums_agree_with_torch_op_chunk_sums(h, beta):
    z = make_logits(torch.float32, seed=11)
    args = sums_args(z, h, seed=11)
    logsigmoid = h == "logsigmoid"
    sums, shift = row_sums(
        z, beta=beta, logsigmoid=logsigmoid, with_stats=True, block_v=BLOCK, **args
    )
    torch_sums, torch_shift = _torch_op_sums(z, beta, logsigmoid, args.get("shift"), args.get("zy"))
    assert torch.equal(shift, torch_shift)
    torch.testing.assert_close(sums, torch_sums, rtol=1e-6, atol=0)
    assert gem_triton.LOGSIGMOID_SCALE == TORCH_OP.LOGSIGMOID_SCALE


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_online_shift_rescaled_by_torch_op_equals_global_shift(h):
    """Sums taken against the shard max in the pass, rescaled to the global max by the torch
    op's _rescale_to_max, equal sums taken against the global max: logsigmoid, too, can read its
    logits once (it needs only zy before the pass, not the max)."""
    z = make_logits(torch.float32, seed=17)
    online, shard_max = row_sums(
        z,
        beta=0.7,
        logsigmoid=h == "logsigmoid",
        with_stats=True,
        block_v=BLOCK,
        **sums_args(z, h, seed=17, shift="online"),
    )
    given = sums_args(z, h, seed=17, shift="given")
    at_global, _ = row_sums(
        z, beta=0.7, logsigmoid=h == "logsigmoid", with_stats=True, block_v=BLOCK, **given
    )
    TORCH_OP._rescale_to_max(online, shard_max, given["shift"], 0.7)
    torch.testing.assert_close(online, at_global, rtol=1e-6, atol=0)


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_kernels_compose_to_the_torch_ops_loss_and_gradient(h):
    """One device: the op's forward arithmetic on local_row_sums and its backward through
    gem_grad give gem_loss's loss and autograd gradient (what impl="triton" will wire)."""
    beta, logsigmoid = 0.7, h == "logsigmoid"
    z = make_logits(torch.float32, seed=13)
    target = torch.tensor([5, 17, 900, 500, BLOCK, -100, 999])
    valid = target != -100
    grad_out = torch.rand(N, generator=torch.Generator().manual_seed(13)) + 0.5
    zy_own = z.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if logsigmoid:
        m = z.amax(-1)
        m = torch.where(m.isfinite(), m, 0.0)
        zy = torch.where(valid, zy_own, m)
        sums, _ = row_sums(
            z, beta=beta, logsigmoid=True, with_stats=False, shift=m, zy=zy, block_v=BLOCK
        )
    else:  # one shard: its max is the global max, nothing to rescale
        sums, shift = row_sums(z, beta=beta, logsigmoid=False, with_stats=False, block_v=BLOCK)
        m = torch.where(shift.isfinite(), shift, 0.0)
        zy = torch.where(valid, zy_own, m)
    s, a, u = sums
    s_safe = torch.where(valid, s, 1.0)
    loss = torch.where(valid, (beta * u + (m - zy) * a) / s_safe, 0.0)
    row_scale = torch.where(valid, grad_out / s_safe, 0.0)
    sum_ew = torch.where(valid, a, 0.0)
    grad = grad_of(
        z, target, row_scale, sum_ew, beta=beta, logsigmoid=logsigmoid, m=m, zy=zy, block_v=BLOCK
    )
    logits = z.clone().requires_grad_()
    torch_loss = gem_loss(logits, target, beta=beta, h=h)
    (torch_loss * grad_out).sum().backward()
    # row 1 (all -inf) is excluded from the loss: its target logit is -inf, the loss NaN
    rows = torch.arange(N) != 1
    torch.testing.assert_close(loss[rows], torch_loss[rows].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        grad[rows], logits.grad[rows], rtol=1e-6, atol=1e-6 * grad[rows].abs().max().item()
    )


_Z = torch.zeros(3, 40, device=DEVICE)
_ROW = torch.zeros(3, device=DEVICE)
_T = torch.zeros(3, dtype=torch.long, device=DEVICE)


@pytest.mark.parametrize(
    "call,name",
    [
        (
            lambda: gem_triton.local_row_sums(_Z.long(), beta=0.7, logsigmoid=False, with_stats=0),
            "z",
        ),
        (lambda: gem_triton.local_row_sums(_Z.t(), beta=0.7, logsigmoid=False, with_stats=0), "z"),
        (lambda: gem_triton.local_row_sums(_Z, beta=0.0, logsigmoid=False, with_stats=0), "beta"),
        (
            lambda: gem_triton.local_row_sums(
                _Z, beta=0.7, logsigmoid=False, with_stats=0, zy=_ROW
            ),
            "zy",
        ),
        (lambda: gem_triton.local_row_sums(_Z, beta=0.7, logsigmoid=True, with_stats=0), "zy"),
        (
            lambda: gem_triton.local_row_sums(
                _Z, beta=0.7, logsigmoid=True, with_stats=0, shift=_ROW[:2], zy=_ROW
            ),
            "shift",
        ),
        (
            lambda: gem_triton.local_row_sums(
                _Z, beta=0.7, logsigmoid=False, with_stats=0, block_v=96
            ),
            "block_v",
        ),
        (
            lambda: gem_triton.gem_grad(
                _Z, _ROW, _ROW, _ROW, beta=0.7, logsigmoid=False, m=_ROW, zy=None
            ),
            "local_target",
        ),
        (
            lambda: gem_triton.gem_grad(
                _Z, _T, _ROW.double(), _ROW, beta=0.7, logsigmoid=False, m=_ROW, zy=None
            ),
            "row_scale",
        ),
        (
            lambda: gem_triton.gem_grad(
                _Z, _T, _ROW, _ROW, beta=0.7, logsigmoid=True, m=_ROW, zy=None
            ),
            "zy",
        ),
        (
            lambda: gem_triton.gem_grad(
                _Z, _T, _ROW, _ROW, beta=0.7, logsigmoid=False, m=_ROW, zy=None, out=_Z.half()
            ),
            "out",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


def test_module_imports_without_triton_and_says_unavailable():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from megatron_gem.ops import gem_triton\n"
        "assert not gem_triton.available()\n"
        "try:\n"
        "    gem_triton.local_row_sums(torch.zeros(2, 8), beta=1.0, logsigmoid=False, "
        "with_stats=False)\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("ValueError:") and "triton" in out


_COMPILE_FOR_SM90 = """
import itertools, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_gem.ops import gem_triton as gt

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
common = {"z_row_stride": "i64", "v_local": "i32", "inv_beta": "fp32", "w_scale": "fp32"}
rows = {"shift_ptr": "*fp32", "zy_ptr": "*fp32", "sums_ptr": "*fp32", "n": "i32", "beta": "fp32"}
grad = {"out_row_stride": "i64", "target_ptr": "*i64", "row_scale_ptr": "*fp32",
        "sum_ew_ptr": "*fp32", "m_ptr": "*fp32", "zy_ptr": "*fp32"}
variants = []
for dt, ls, online, stats in itertools.product(["bf16", "fp32"], *[[False, True]] * 3):
    for p_is_e in [False, True] if stats else [False]:
        consts = dict(LOGSIGMOID=ls, ONLINE_SHIFT=online, WITH_STATS=stats, P_IS_E=p_is_e)
        variants.append((gt._row_sums_kernel, dict(rows, z_ptr="*" + dt), consts))
for dt, ls in itertools.product(["bf16", "fp16", "fp32"], [False, True]):
    types = dict(grad, z_ptr="*" + dt, out_ptr="*" + dt)
    variants.append((gt._grad_kernel, types, dict(LOGSIGMOID=ls, BF16_BY_HAND=False)))
for kernel, types, consts in variants:
    consts["BLOCK_V"] = gt.MAX_BLOCK_V
    types = {**common, **types}
    sig = {a: "constexpr" if a in consts else types[a] for a in kernel.arg_names}
    k = triton.compile(
        ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True)
    assert " LOCAL:0 " in usage.stdout and " STACK:0 " in usage.stdout, (consts, usage.stdout)
    if kernel is gt._grad_kernel and types["out_ptr"] == "*bf16":
        assert "cvt.rn.bf16.f32" in k.asm["ptx"], "the GPU's cast rounds to nearest even"
print("compiled", len(variants))
"""


def test_kernels_compile_for_sm90_without_spilling(tmp_path):
    """The interpreter forgives what the compiler rejects (loop-carried types, names bound in
    one constexpr branch only): every variant the wrappers launch compiles for an H100/H200,
    with no register spills, and the bf16 gradient's cast rounds to nearest. No GPU needed."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "compiled 30"
