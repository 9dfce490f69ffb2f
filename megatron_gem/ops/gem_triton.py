"""Fused Triton kernels for the two per-element passes of the GEM loss (drop-in for the torch op's).

Both kernels run one program per row of this rank's ``[n, V_local]`` logits and loop over the
vocabulary in blocks (masked tail, padding loads as -inf); every load is converted to fp32 at
once and all arithmetic is fp32 (Triton's CPU interpreter miscomputes on bf16 values).

``local_row_sums`` (forward; replaces the chunk loop around ``gem_loss._chunk_sums`` and the
copies after it) reads each logit once (2 bytes per element for bf16) and writes only ``[k, n]``
fp32 sums, ``k = 5`` with statistics, 3 without: ``S = sum e``, ``A = sum e w``,
``U = sum e w x``, ``S1 = sum p``, ``U1 / beta = sum p x``, with ``x = (z - shift) / beta``,
``e = exp(x)``, ``p = exp(z - shift)``, ``w = 1`` (linear) or ``sigmoid(0.01 (z - z_y))``
(logsigmoid). Without a given shift, the shift is each row's max over this shard, found in the
same pass by an online rescale: when a block raises the running max from ``m`` to ``m'``, the
sums so far are re-expressed with ``d = (m - m') / beta`` and ``c = exp(d)``: ``S <- c S``,
``A <- c A``, ``U <- c (U + d A)`` (``S1``, ``U1`` likewise with ``exp(beta d)`` and ``S1`` for
``A``); the caller rescales to the global max after its MAX reduction, as today. The
weights depend on ``z_y``, not on the shift, so logsigmoid can take this path too (today it
reads the logits once more for the global max first; passing ``shift`` still does that). The
statistics (cross-entropy and entropy of ``p``) come from the same pass because
``p = exp(beta x)`` is formed from the ``x`` already in registers (``p = e`` at ``beta = 1``):
they cost arithmetic, not bandwidth, where a separate pass would read the logits again.

``gem_grad`` (backward) reads each logit once more and writes the gradient once (2 + 2 bytes per
element for bf16): ``grad = (e w - sum_ew onehot(y)) * row_scale``, ``e`` recomputed from the
saved logits, in fp32 until ``row_scale`` (``grad_output / S``) is applied, then one cast
(rounded to nearest even; under the interpreter, whose own bf16 cast truncates, by hand).
Forward and backward together move the 6 bytes per element of the physical limit (read, read,
write) against ~118 for the eager torch op with statistics. Rows with ``row_scale == 0``
(ignored) do not read their logits (their loads are masked off) and get zeros. The gradient
may be written over the logits (``out=z``), as Megatron's cross-entropy does: each program
reads a block before it writes that block, and no other program touches its row.

Kernels are defined when this module is imported, so ``TRITON_INTERPRET=1`` (CPU tensors) must
be set before that; the module imports without triton or CUDA, and ``available()`` tells.
Block size, warps: untuned (no GPU measurement yet).
"""

from __future__ import annotations

import contextlib

import torch

from megatron_gem.ops.config import check_beta

__all__ = ["available", "local_row_sums", "gem_grad"]

# the authors' weight sigmoid(0.01 * (z_v - z_y)); gem_loss's own, not imported from it (gem_loss
# will import this module); a test checks they agree
LOGSIGMOID_SCALE = 0.01
# Largest vocabulary block per loop iteration on a GPU: 4096 fp32 values per tensor are 16 per
# thread at 8 warps, which stays in registers. Smaller shards use one block of the next power of 2.
MAX_BLOCK_V = 4096
_NUM_WARPS = 8
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch op needs no triton; available() says False
    triton = None


# Triton decides when a kernel is defined (below, at import) whether it is interpreted.
_INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)


def available() -> bool:
    """True when the kernels can run here: triton imports, and CUDA or the interpreter is on."""
    return triton is not None and (_INTERPRETED or torch.cuda.is_available())


if triton is not None:

    @triton.jit
    def _row_sums_kernel(
        z_ptr,
        z_row_stride,
        shift_ptr,  # [n] fp32: written (ONLINE_SHIFT: the shard's row max) or read
        zy_ptr,  # [n] fp32 global target logit (logsigmoid only)
        sums_ptr,  # [K, n] fp32
        n,
        v_local,
        inv_beta,
        beta,
        w_scale,  # LOGSIGMOID_SCALE
        LOGSIGMOID: tl.constexpr,
        ONLINE_SHIFT: tl.constexpr,
        WITH_STATS: tl.constexpr,
        P_IS_E: tl.constexpr,  # beta == 1: p = e, one exp fewer
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * z_row_stride
        cols = tl.arange(0, BLOCK_V)
        zero = tl.zeros([], tl.float32)
        s = zero
        a = zero
        u = zero
        s1 = zero
        u1 = zero
        if ONLINE_SHIFT:
            m = zero - float("inf")
        else:
            m = tl.load(shift_ptr + row).to(tl.float32)
        if LOGSIGMOID:
            zy = tl.load(zy_ptr + row).to(tl.float32)
        for start in range(0, v_local, BLOCK_V):
            mask = start + cols < v_local
            z = tl.load(z_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if ONLINE_SHIFT:
                # online rescale to the new running max; while the row has been all -inf its
                # sums are 0 and d is 0 (-inf - -inf must not make NaN)
                m_new = tl.maximum(m, tl.max(z, 0))
                d = tl.where(m > float("-inf"), (m - m_new) * inv_beta, 0.0)
                c = tl.exp(d)
                if LOGSIGMOID:
                    u = (u + d * a) * c
                    a = a * c
                else:
                    u = (u + d * s) * c
                s = s * c
                if WITH_STATS:
                    c1 = tl.exp(d * beta)
                    u1 = (u1 + d * s1) * c1
                    s1 = s1 * c1
                m = m_new
            # a shift of -inf (all -inf so far) shifts by 0: x = -inf, e = 0, no NaN
            x = (z - tl.where(m > float("-inf"), m, 0.0)) * inv_beta
            e = tl.exp(x)
            # e x with e = 0 is 0 even where x = -inf; a NaN e (NaN logit) is dropped here as
            # nansum drops it, and poisons S below
            has_e = e > 0.0
            s += tl.sum(e, 0)
            if WITH_STATS:
                if P_IS_E:
                    p = e
                else:
                    p = tl.exp(x * beta)
                s1 += tl.sum(p, 0)
                u1 += tl.sum(tl.where(p > 0.0, p * x, 0.0), 0)
            if LOGSIGMOID:
                ew = e * tl.sigmoid(w_scale * (z - zy))
                a += tl.sum(ew, 0)
                u += tl.sum(tl.where(has_e, ew * x, 0.0), 0)
            else:
                u += tl.sum(tl.where(has_e, e * x, 0.0), 0)
        if not LOGSIGMOID:
            a = s
        if ONLINE_SHIFT:
            tl.store(shift_ptr + row, m)
        tl.store(sums_ptr + row, s)
        tl.store(sums_ptr + n + row, a)
        tl.store(sums_ptr + 2 * n + row, u)
        if WITH_STATS:
            tl.store(sums_ptr + 3 * n + row, s1)
            tl.store(sums_ptr + 4 * n + row, u1)

    @triton.jit
    def _to_bf16_rtne(x):
        """fp32 -> bf16 rounded to nearest even on the bits, as the GPU's cvt.rn does (Triton
        3.7's interpreter truncates, ignoring fp_downcast_rounding); NaN stays NaN."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x != x, 0x7FC00000, bits)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _grad_kernel(
        z_ptr,
        z_row_stride,
        out_ptr,
        out_row_stride,
        target_ptr,  # [n] int: target id minus this shard's start
        row_scale_ptr,  # [n] fp32: grad_output / S, 0 on ignored rows
        sum_ew_ptr,  # [n] fp32: A = sum e w over the whole vocabulary
        m_ptr,  # [n] fp32: global row max
        zy_ptr,  # [n] fp32: global target logit (logsigmoid only)
        v_local,
        inv_beta,
        w_scale,  # LOGSIGMOID_SCALE
        LOGSIGMOID: tl.constexpr,
        BF16_BY_HAND: tl.constexpr,  # the interpreter's own fp32 -> bf16 cast truncates
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * z_row_stride
        out_row = out_ptr + row * out_row_stride
        cols = tl.arange(0, BLOCK_V)
        target = tl.load(target_ptr + row)
        row_scale = tl.load(row_scale_ptr + row).to(tl.float32)
        sum_ew = tl.load(sum_ew_ptr + row).to(tl.float32)
        m = tl.load(m_ptr + row).to(tl.float32)
        m = tl.where(m > float("-inf"), m, 0.0)  # a row all -inf: e = 0, as in the forward
        if LOGSIGMOID:
            zy = tl.load(zy_ptr + row).to(tl.float32)
        # ignored rows read nothing: their e = exp(-inf) = 0 and their gradient 0, even where
        # their logits hold NaN or inf
        read_limit = tl.where(row_scale != 0.0, v_local, 0)
        for start in range(0, v_local, BLOCK_V):
            col = start + cols
            mask = col < v_local
            z = tl.load(z_row + col, mask=col < read_limit, other=float("-inf")).to(tl.float32)
            ew = tl.exp((z - m) * inv_beta)
            if LOGSIGMOID:
                ew = ew * tl.sigmoid(w_scale * (z - zy))
            g = tl.where(col == target, ew - sum_ew, ew) * row_scale
            if BF16_BY_HAND:
                g = _to_bf16_rtne(g)
            tl.store(out_row + col, g.to(out_ptr.dtype.element_ty), mask=mask)


def _check_logits(z, name="z"):
    if not isinstance(z, torch.Tensor) or z.dtype not in _LOGIT_DTYPES:
        dtype = getattr(z, "dtype", type(z).__name__)
        raise ValueError(f"{name} must be a bf16/fp16/fp32/fp64 tensor, got {name} dtype={dtype}")
    if z.dim() != 2 or z.shape[1] == 0 or (z.shape[0] > 0 and z.stride(1) != 1):
        raise ValueError(
            f"{name} must be [n, V_local] with V_local > 0 and contiguous rows, got "
            f"shape={tuple(z.shape)} stride={z.stride()}"
        )
    if not available() or (not _INTERPRETED and z.device.type != "cuda"):
        raise ValueError(
            f"the GEM Triton kernels need triton and CUDA tensors (or TRITON_INTERPRET=1 set "
            f"before megatron_gem.ops.gem_triton is imported), got {name} on {z.device}"
        )


def _check_row_vector(t, name, n, device, integer=False):
    ok = (
        isinstance(t, torch.Tensor)
        and tuple(t.shape) == (n,)
        and t.device == device
        and (not t.is_floating_point() if integer else t.dtype == torch.float32)
        and t.dtype != torch.bool
    )
    if not ok:
        kind = "an integer" if integer else "an fp32"
        got = (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t)
        raise ValueError(f"{name} must be {kind} tensor of shape ({n},) on {device}, got {got}")
    return t.contiguous()


def _block_v(v_local: int, block_v: int | None) -> int:
    if block_v is None:
        return min(MAX_BLOCK_V, triton.next_power_of_2(v_local))
    if (
        isinstance(block_v, bool)
        or not isinstance(block_v, int)
        or block_v < 16
        or block_v & (block_v - 1)
    ):
        raise ValueError(f"block_v must be a power of two >= 16, got block_v={block_v!r}")
    return block_v


def _quiet_interpreter():
    """The interpreter evaluates both sides of every tl.where in numpy, including the discarded
    -inf - -inf and 0 * -inf: silence numpy's warnings about those (compiled kernels have none)."""
    if not _INTERPRETED:
        return contextlib.nullcontext()
    import numpy

    return numpy.errstate(invalid="ignore", over="ignore")


def local_row_sums(
    z: torch.Tensor,
    *,
    beta: float,
    logsigmoid: bool,
    with_stats: bool,
    shift: torch.Tensor | None = None,
    zy: torch.Tensor | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of this rank's logits ``z`` ``[n, V_local]``, in one read of ``z``.

    Returns ``(sums, shift)``: fp32 ``sums`` ``[5 if with_stats else 3, n]`` holding
    ``[S, A, U, S1, U1 / beta]`` as ``gem_loss._chunk_sums`` defines them, completed as the torch
    op completes them after its loop (linear: ``A = S``; ``beta == 1``: ``S1 = S`` and, linear,
    ``U1 / beta = U``), all relative to ``shift``.

    ``shift=None`` (today's linear path): the shift is found in the same pass as each row's max
    over this shard and returned (-inf for a row that is all -inf here, whose sums are 0); the
    caller rescales to the global max (``gem_loss._rescale_to_max``). This works for logsigmoid
    too, whose weights need only ``zy``, so it can skip the op's extra pass for the max.
    ``shift`` given (today's logsigmoid path: the global row max, fp32 ``[n]``): used as is and
    returned. ``zy`` (fp32 ``[n]``, the global target logit) is required by logsigmoid only.
    A NaN logit makes its row's ``S`` NaN. ``block_v`` (a power of two) overrides the vocabulary
    block, for tests.
    """
    _check_logits(z)
    beta = check_beta(beta)
    n, v_local = z.shape
    if logsigmoid:
        if zy is None:
            raise ValueError("logsigmoid weights need zy, the global target logit; got zy=None")
        zy = _check_row_vector(zy, "zy", n, z.device)
    elif zy is not None:
        raise ValueError(f"linear takes no zy (its weights are 1), got zy={type(zy).__name__}")
    online_shift = shift is None
    if online_shift:
        shift = torch.empty(n, dtype=torch.float32, device=z.device)
    else:
        shift = _check_row_vector(shift, "shift", n, z.device)
    sums = torch.empty(5 if with_stats else 3, n, dtype=torch.float32, device=z.device)
    if n == 0:
        return sums, shift
    with _quiet_interpreter():
        _row_sums_kernel[(n,)](
            z,
            z.stride(0),
            shift,
            shift if zy is None else zy,  # not read by linear
            sums,
            n,
            v_local,
            1.0 / beta,
            beta,
            LOGSIGMOID_SCALE,
            LOGSIGMOID=bool(logsigmoid),
            ONLINE_SHIFT=online_shift,
            WITH_STATS=bool(with_stats),
            P_IS_E=beta == 1.0,
            BLOCK_V=_block_v(v_local, block_v),
            num_warps=_NUM_WARPS,
        )
    return sums, shift


def gem_grad(
    z: torch.Tensor,
    local_target: torch.Tensor,
    row_scale: torch.Tensor,
    sum_ew: torch.Tensor,
    *,
    beta: float,
    logsigmoid: bool,
    m: torch.Tensor,
    zy: torch.Tensor | None,
    out: torch.Tensor | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """Gradient of the GEM loss with respect to this rank's logits ``z`` ``[n, V_local]``.

    ``grad = (e w - sum_ew onehot(local_target)) * row_scale`` with ``e = exp((z - m) / beta)``
    and ``w`` as in the forward (1 for linear), in fp32 until the one cast to ``z``'s dtype.
    ``local_target`` (integer ``[n]``): target id minus this shard's start; outside
    ``[0, V_local)`` it is not on this shard. ``row_scale`` (fp32 ``[n]``: ``grad_output / S``),
    ``sum_ew`` (fp32 ``[n]``: ``A``), ``m`` (fp32 ``[n]``: global row max) and ``zy`` (fp32
    ``[n]``, logsigmoid only) are the forward's per-row values. Rows with ``row_scale == 0`` get
    zeros. ``out``: where to write (``z`` itself for an in-place gradient), default a fresh
    ``empty_like(z)``; returned.
    """
    _check_logits(z)
    beta = check_beta(beta)
    n, v_local = z.shape
    local_target = _check_row_vector(local_target, "local_target", n, z.device, integer=True)
    row_scale = _check_row_vector(row_scale, "row_scale", n, z.device)
    sum_ew = _check_row_vector(sum_ew, "sum_ew", n, z.device)
    m = _check_row_vector(m, "m", n, z.device)
    if logsigmoid:
        zy = _check_row_vector(zy, "zy", n, z.device)
    if out is None:
        out = torch.empty_like(z)
    elif (
        not isinstance(out, torch.Tensor)
        or out.shape != z.shape
        or out.dtype != z.dtype
        or out.device != z.device
        or (n > 0 and out.stride(1) != 1)
    ):
        got = (tuple(out.shape), out.dtype, out.device) if isinstance(out, torch.Tensor) else out
        raise ValueError(
            f"out must be a tensor like z ({tuple(z.shape)}, {z.dtype}, {z.device}) with "
            f"contiguous rows, got out={got}"
        )
    if n == 0:
        return out
    with _quiet_interpreter():
        _grad_kernel[(n,)](
            z,
            z.stride(0),
            out,
            out.stride(0),
            local_target,
            row_scale,
            sum_ew,
            m,
            zy if logsigmoid else m,  # not read by linear
            v_local,
            1.0 / beta,
            LOGSIGMOID_SCALE,
            LOGSIGMOID=bool(logsigmoid),
            BF16_BY_HAND=_INTERPRETED and out.dtype == torch.bfloat16,
            BLOCK_V=_block_v(v_local, block_v),
            num_warps=_NUM_WARPS,
        )
    return out
