"""Benchmark: GEM forward+backward against Megatron's own cross-entropy, in one run.

Methods (the ones that import and run here; the others are skipped with a printed note):

    megatron_ce        megatron.core.tensor_parallel.vocab_parallel_cross_entropy
    megatron_fused_ce  megatron.core.fusions.fused_cross_entropy.fused_vocab_parallel_cross_entropy
                       (torch.compile'd; bf16 logits only: it hard-casts its gradient to bf16)
    te_ce              transformer_engine.pytorch.cross_entropy.parallel_cross_entropy (CUDA)
    liger_ce           Liger-Kernel's LigerCrossEntropyLoss (CUDA, TP 1 only: not vocab-parallel;
                       one scalar loss, the sum over tokens, so its backward gets one scalar)
    gem, gem+stats     megatron_gem.vocab_parallel_gem_loss(beta=0.7), impl="torch" where the op
                       has an impl= argument; +stats: return_stats=True (what --loss gem trains)
    gem_triton(+stats) the same with impl="triton" (only where the op has impl=)

On CUDA (defaults: TP 1, 8192 tokens x V/tp in 16032 32064 64128, bf16, best of 10) it prints per
method fwd+bwd time (CUDA events, synchronised around each call), the bandwidth achieved on the
ideal byte count (read the logits in the forward, read them again in the backward, write the
gradient: 3 x element size bytes per logit, 6 for bf16), its share of the device's peak (vendor
spec sheets, `--peak-gbps` to override), the peak extra memory (torch.cuda.max_memory_allocated
minus what was held before: the inputs), and ratios to Megatron's fused CE.

On CPU (defaults: TP 1 and 2, 4096 tokens x 32064, bf16 and fp32, best of 5) it prints time and
peak extra memory and ratios to Megatron's unfused CE. Memory comes from the process's peak
resident set size (Linux /proc VmHWM, reset before each measurement); time is the process's CPU
time (one thread per rank), which other load on a shared machine barely disturbs, measured in
separate processes whose malloc keeps freed memory (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_):
like CUDA's caching allocator, so neither loss pays first-touch page faults for its buffers,
which would otherwise dominate CPU timings and say nothing about GPUs.

The methods take turns (round-robin; the first round warms up and compiles), best time, worst
memory.

    python examples/benchmark_loss.py                        # CUDA or CPU defaults, see above
    python examples/benchmark_loss.py --logits intermediate  # the gradient as a model gets it
    python examples/benchmark_loss.py --tp 1 --dtypes bf16 --tokens 1024 --local-vocab 16032
    python examples/benchmark_loss.py --smoke                # every method once, tiny, any device

--linear: the output layer and the loss together, from hidden [tokens, 1, H] and this rank's
weight [V/tp, H] to the gradients of both (torch.autograd.grad, as a model receives them):

    gemm+megatron_ce        logits = hidden @ weight.T, then Megatron's vocab_parallel_cross_entropy
    gemm+megatron_fused_ce  the same with Megatron's fused CE (bf16; CUDA defaults only)
    gemm+gem(+stats)        logits = hidden @ weight.T, then vocab_parallel_gem_loss with
                            inplace_backward=True and sync_checks=False, as GemGPTModel calls it
                            (+stats: return_stats=True, what the main head computes)
    linear_gem(+stats)      megatron_gem.vocab_parallel_linear_gem_loss: no full logits

Peak extra memory is counted beyond the two gradients (which every method returns). On CPU the
memory processes map every allocation of 64 KiB or more on its own (MALLOC_MMAP_THRESHOLD_), so
freed buffers leave the resident set and each measurement sees only what it holds. Ratios are
against gemm+gem (the materialised path) and the CE anchors, in the same run.

    python examples/benchmark_loss.py --linear               # CPU: 4096 x H 1024 x V/tp 32064, bf16
    python examples/benchmark_loss.py --linear --smoke       # every linear method once, tiny
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import re
import socket
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BETA = 0.7
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALL_METHODS = [
    "megatron_ce",
    "megatron_fused_ce",
    "te_ce",
    "liger_ce",
    "gem",
    "gem+stats",
    "gem_triton",
    "gem_triton+stats",
]
# CPU: no Triton (its interpreter is far too slow at these sizes), no TE or Liger (CUDA only)
CPU_METHODS = ["gem", "gem+stats", "megatron_ce", "megatron_fused_ce"]
# Per mode: tokens, local vocabularies, TP sizes, dtypes, repeats, methods.
DEFAULTS = {
    "cuda": (8192, [16032, 32064, 64128], [1], ["bf16"], 10, ALL_METHODS),
    "cpu": (4096, [32064], [1, 2], ["bf16", "fp32"], 5, CPU_METHODS),
    "smoke": (12, [200], [1], ["bf16", "fp32"], 1, ALL_METHODS),
}
LINEAR_METHODS = [
    "gemm+megatron_ce",
    "gemm+megatron_fused_ce",
    "gemm+gem",
    "gemm+gem+stats",
    "linear_gem",
    "linear_gem+stats",
]
# --linear, per mode: tokens, local vocabularies, TP sizes, dtypes, repeats, methods, hidden.
# CUDA: Llama-3 8B at TP 2 (8192 tokens, H 4096, V/tp 64128); CPU: the CPU shape.
LINEAR_DEFAULTS = {
    "cuda": (8192, [64128], [1], ["bf16"], 10, LINEAR_METHODS, 4096),
    "cpu": (4096, [32064], [1], ["bf16"], 3, [m for m in LINEAR_METHODS if "fused" not in m], 1024),
    "smoke": (12, [200], [1], ["bf16", "fp32"], 1, LINEAR_METHODS, 16),
}
# Peak HBM bandwidth in GB/s from NVIDIA's product spec sheets (H100: "NVIDIA H100 Tensor Core
# GPU" datasheet, SXM5 3.35 TB/s, NVL 3.9, PCIe 2.0; H200: the H200 page, 4.8 TB/s; A100: the
# A100 datasheet). First substring of torch.cuda.get_device_name() that matches wins.
PEAK_GBPS = (
    ("H200", 4800),
    ("H100 NVL", 3900),
    ("H100 PCIe", 2000),
    ("H100", 3350),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039),
    ("A100 80GB PCIe", 1935),
    ("A100", 1555),  # 40 GB
)


def peak_gbps_for(device_name: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key in device_name:
            return float(gbps)
    return None


def ideal_bytes(tokens: int, local_vocab: int, dtype: torch.dtype) -> int:
    """Bytes a perfect fused loss moves per rank: read the logits (forward), read them again
    (backward), write the gradient; 6 bytes per element for bf16."""
    return 3 * torch.empty((), dtype=dtype).element_size() * tokens * local_vocab


def gem_accepts_impl() -> bool:
    from megatron_gem import vocab_parallel_gem_loss

    return "impl" in inspect.signature(vocab_parallel_gem_loss).parameters


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


class PeakMemory:
    """Peak extra bytes over a block: CUDA allocator stats, or the Linux peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.extra = _rss_kib("VmHWM") * 1024 - self.base


def _methods(group, world: int, wanted: list[str]) -> tuple[dict, list[str]]:
    """``(name -> fn(logits [n, 1, V/tp], target [n, 1]) -> loss [n, 1], notes)``: the wanted
    methods that import here, and one note per wanted method that does not."""
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_gem import vocab_parallel_gem_loss

    def gem(impl, stats):
        kw = {"impl": impl} if gem_accepts_impl() else {}
        if stats:
            return lambda z, t: vocab_parallel_gem_loss(
                z, t, beta=BETA, tp_group=group, return_stats=True, **kw
            )[0]
        return lambda z, t: vocab_parallel_gem_loss(z, t, beta=BETA, tp_group=group, **kw)

    methods = {
        "megatron_ce": lambda z, t: vocab_parallel_cross_entropy(z, t, tp_group=group),
        "megatron_fused_ce": lambda z, t: fused_vocab_parallel_cross_entropy(z, t, group),
        "gem": gem("torch", False),
        "gem+stats": gem("torch", True),
    }
    notes = []
    if gem_accepts_impl():
        methods["gem_triton"] = gem("triton", False)
        methods["gem_triton+stats"] = gem("triton", True)
    else:
        notes.append("gem_triton skipped: vocab_parallel_gem_loss has no impl= argument here")
    try:
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

        # as Megatron calls it (extensions/transformer_engine.py): no smoothing, per-token loss
        methods["te_ce"] = lambda z, t: parallel_cross_entropy(z, t, 0.0, False, group)
    except Exception as exc:  # TE's import can fail in many ways besides ImportError
        notes.append(f"te_ce skipped: Transformer Engine does not import ({type(exc).__name__})")
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        if world == 1:
            liger = LigerCrossEntropyLoss(reduction="sum")
            methods["liger_ce"] = lambda z, t: liger(z.view(t.numel(), -1), t.view(-1)).expand(
                t.shape
            )
        else:
            notes.append("liger_ce skipped: Liger-Kernel's cross-entropy is not vocab-parallel")
    except Exception as exc:
        notes.append(f"liger_ce skipped: Liger-Kernel does not import ({type(exc).__name__})")
    notes = [n for n in notes if n.split()[0] in wanted]
    return {n: f for n, f in methods.items() if n in wanted}, notes


def _measure_once(fn, logits, target, grad, device, intermediate):
    """Seconds and peak extra bytes of one fwd+bwd, on a fresh copy of the logits (Megatron's
    cross-entropy overwrites fp32 input logits in place). `intermediate`: the gradient is
    returned (torch.autograd.grad), as a model's output layer receives it, instead of being
    accumulated into the leaf's .grad, where autograd clones a gradient that aliases its input
    (Megatron's fp32 one does)."""
    z = logits.detach().clone().requires_grad_()
    cuda = device.type == "cuda"
    with PeakMemory(device) as mem:  # synchronises on CUDA
        if cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
        else:
            t0 = time.process_time()
        loss = fn(z, target)
        if intermediate:
            torch.autograd.grad(loss, z, grad)
        else:
            loss.backward(grad)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            dt = time.process_time() - t0
        del loss, z
    return dt, mem.extra


def _take_turns(methods, names, measure, repeats, failed, rank):
    """{name: (best seconds, worst extra bytes)} of ``measure(methods[name])`` (rank 0; {} on
    the others). Round-robin over the methods, so drift in a shared machine's speed hits all of
    them; the first round warms up (and compiles). A method that raises (e.g. the fused CE's
    torch.compile failing on a host) is dropped here and, through ``failed``, later."""
    samples = {n: [] for n in names if n not in failed}
    for round_ in range(repeats + 1):
        for name in list(samples):
            try:
                sample = measure(methods[name])
            except Exception as exc:
                del samples[name]
                failed.add(name)
                if rank == 0:
                    print(f"  {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            if round_:
                samples[name].append(sample)
    if rank != 0:
        return {}
    return {
        name: (
            min(s for s, _ in got) if got else math.nan,
            max(e for _, e in got) if got else math.nan,
        )
        for name, got in samples.items()
    }


def _init_rank(rank, world):
    """(cuda, device, group) of a benchmark rank: NCCL on CUDA, else gloo with one thread."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    return cuda, device, group


def _worker(rank, world, args, phase, results):
    cuda, device, group = _init_rank(rank, world)
    methods, notes = _methods(group, world, args.methods)
    if rank == 0:
        for note in notes:
            print(f"  {note}")
    failed = set()
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        # the fused CE hard-casts its gradient to bf16: only meaningful for bf16 logits
        names = [n for n in methods if not (n == "megatron_fused_ce" and dtype != torch.bfloat16)]
        for local_vocab in args.local_vocab:
            # every rank draws the same shard; targets cover the full vocabulary, so they land
            # in every rank's shard
            gen = torch.Generator(device=device).manual_seed(1234)
            full_v = local_vocab * world
            target = torch.randint(0, full_v, (args.tokens, 1), generator=gen, device=device)
            grad = torch.rand(args.tokens, 1, generator=gen, device=device)
            logits = torch.randn(
                args.tokens, 1, local_vocab, generator=gen, device=device, dtype=torch.float32
            )
            logits = logits.mul_(3).to(dtype)
            measure = partial(
                _measure_once,
                logits=logits,
                target=target,
                grad=grad,
                device=device,
                intermediate=args.logits == "intermediate",
            )
            for name, (sec, extra) in _take_turns(
                methods, names, measure, args.repeats, failed, rank
            ).items():
                results.append((world, dtype_name, local_vocab, name, phase, sec, extra))
            del logits, measure  # the partial holds them too
    dist.barrier()
    dist.destroy_process_group()


def _linear_methods(group, wanted: list[str]) -> dict:
    """``name -> fn(hidden [n, 1, H], weight [V/tp, H], target [n, 1]) -> loss [n, 1]``."""
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_gem import vocab_parallel_gem_loss, vocab_parallel_linear_gem_loss

    def gemm_gem(stats):
        def fn(x, w, t):
            out = vocab_parallel_gem_loss(
                x @ w.T,
                t,
                beta=BETA,
                tp_group=group,
                return_stats=stats,
                sync_checks=False,
                inplace_backward=True,
            )
            return out[0] if stats else out

        return fn

    def linear_gem(stats):
        def fn(x, w, t):
            out = vocab_parallel_linear_gem_loss(
                x, w, t, beta=BETA, tp_group=group, return_stats=stats, sync_checks=False
            )
            return out[0] if stats else out

        return fn

    methods = {
        "gemm+megatron_ce": lambda x, w, t: vocab_parallel_cross_entropy(
            x @ w.T, t, tp_group=group
        ),
        "gemm+megatron_fused_ce": lambda x, w, t: fused_vocab_parallel_cross_entropy(
            x @ w.T, t, group
        ),
        "gemm+gem": gemm_gem(False),
        "gemm+gem+stats": gemm_gem(True),
        "linear_gem": linear_gem(False),
        "linear_gem+stats": linear_gem(True),
    }
    return {n: f for n, f in methods.items() if n in wanted}


def _measure_linear_once(fn, hidden, weight, target, grad, device):
    """Seconds and peak extra bytes, beyond the two gradients, of one fwd+bwd from fresh leaf
    copies of hidden and weight (made before the measurement)."""
    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    cuda = device.type == "cuda"
    with PeakMemory(device) as mem:
        if cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
        else:
            t0 = time.process_time()
        loss = fn(x, w, target)
        dx, dw = torch.autograd.grad(loss, (x, w), grad)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            dt = time.process_time() - t0
        grads = dx.nbytes + dw.nbytes
        del loss, dx, dw
    return dt, mem.extra - grads


def _linear_worker(rank, world, args, phase, results):
    """As _worker, for --linear: every rank draws the same hidden and weight shard."""
    cuda, device, group = _init_rank(rank, world)
    methods = _linear_methods(group, args.methods)
    failed = set()
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        names = [n for n in methods if not ("fused" in n and dtype != torch.bfloat16)]
        for local_vocab in args.local_vocab:
            gen = torch.Generator(device=device).manual_seed(1234)
            target = torch.randint(
                0, local_vocab * world, (args.tokens, 1), generator=gen, device=device
            )
            grad = torch.rand(args.tokens, 1, generator=gen, device=device)
            hidden = torch.randn(args.tokens, 1, args.hidden, generator=gen, device=device)
            weight = torch.randn(local_vocab, args.hidden, generator=gen, device=device)
            # logits ~ 3 N(0, 1), as the loss benchmark's
            hidden, weight = hidden.to(dtype), weight.mul_(3 / args.hidden**0.5).to(dtype)
            measure = partial(
                _measure_linear_once,
                hidden=hidden,
                weight=weight,
                target=target,
                grad=grad,
                device=device,
            )
            for name, (sec, extra) in _take_turns(
                methods, names, measure, args.repeats, failed, rank
            ).items():
                results.append((world, dtype_name, local_vocab, name, phase, sec, extra))
            del hidden, weight, measure
    dist.barrier()
    dist.destroy_process_group()


def print_linear_table(rows, args) -> None:
    """One markdown table for --linear. rows: (TP, dtype, V/tp, method, seconds, extra bytes)."""
    by_key = {(w, d, v, n): (s, e) for w, d, v, n, s, e in rows}
    nan2 = (math.nan, math.nan)
    print(
        "| TP | dtype | tokens x H x V/tp | method | fwd+bwd ms | peak extra MiB beyond grads "
        "| time / gemm+gem | memory / gemm+gem | time / gemm+megatron_ce "
        "| time / gemm+fused CE |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w, d, v, n, s, e in rows:
        ms, me = by_key.get((w, d, v, "gemm+gem+stats" if "stats" in n else "gemm+gem"), nan2)
        cs, _ = by_key.get((w, d, v, "gemm+megatron_ce"), nan2)
        fs, _ = by_key.get((w, d, v, "gemm+megatron_fused_ce"), nan2)
        ms_s = f"{s * 1e3:.0f}" if s >= 0.01 or math.isnan(s) else f"{s * 1e3:.3f}"
        print(
            f"| {w} | {d} | {args.tokens} x {args.hidden} x {v} | {n} | {ms_s} "
            f"| {max(e, 0) / 2**20:.1f} | {_ratio(s, ms):.2f} | {_ratio(e, me, 2**20):.3f} "
            f"| {_ratio(s, cs):.2f} | {_ratio(s, fs):.2f} |"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ratio(a, b, floor=0.0):
    return a / b if b > floor and not math.isnan(a) else math.nan


def print_table(rows, args, cuda: bool, peak: float | None) -> None:
    """One markdown table. rows: (TP, dtype, V/tp, method, seconds, extra bytes)."""
    ref = {(w, d, v): (s, e) for w, d, v, n, s, e in rows if n == "megatron_ce"}
    fused = {(w, d, v): (s, e) for w, d, v, n, s, e in rows if n == "megatron_fused_ce"}
    if cuda:
        print(
            "| TP | logits | V/tp | method | fwd+bwd ms | GB/s | % of peak | peak extra MiB "
            "| extra / gradient | time / Megatron CE | time / fused CE | memory / fused CE |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        print(
            "| TP | logits | V/tp | method | fwd+bwd ms | peak extra MiB "
            "| time / Megatron CE | memory / Megatron CE |"
        )
        print("|---|---|---|---|---|---|---|---|")
    nan2 = (math.nan, math.nan)
    for w, d, v, n, s, e in rows:
        rs, re_ = ref.get((w, d, v), nan2)
        fs, fe = fused.get((w, d, v), nan2)
        # RSS can end a hair below where it started: that is 0 extra, not "-0"
        mib = max(e, 0) / 2**20
        if cuda:
            gbps = ideal_bytes(args.tokens, v, DTYPES[d]) / s / 1e9
            grad_bytes = ideal_bytes(args.tokens, v, DTYPES[d]) / 3
            share = 100 * gbps / peak if peak else math.nan
            print(
                f"| {w} | {d} | {v} | {n} | {s * 1e3:.3f} | {gbps:.0f} | {share:.0f}% "
                f"| {mib:.0f} | {e / grad_bytes:.2f} | {_ratio(s, rs):.2f} | {_ratio(s, fs):.2f} "
                f"| {_ratio(e, fe, 2**20):.2f} |"
            )
        else:
            # no memory ratio against ~0 extra bytes (tiny shapes; Megatron's in-place fp32
            # path as an intermediate)
            ms = f"{s * 1e3:.0f}" if s >= 0.01 or math.isnan(s) else f"{s * 1e3:.3f}"
            print(
                f"| {w} | {d} | {v} | {n} | {ms} | {mib:.0f} "
                f"| {_ratio(s, rs):.2f} | {_ratio(e, re_, 2**20):.2f} |"
            )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, help="rows (s*b) of logits")
    p.add_argument("--local-vocab", type=int, nargs="+", help="vocabulary shard(s) per TP rank")
    p.add_argument("--tp", type=int, nargs="+", help="tensor-parallel sizes (processes)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS + LINEAR_METHODS)
    p.add_argument("--repeats", type=int, help="timed rounds after one warm-up round")
    p.add_argument(
        "--logits",
        choices=["leaf", "intermediate"],
        default="leaf",
        help="leaf: backward() into logits.grad; intermediate: the gradient returned as in a model",
    )
    p.add_argument(
        "--peak-gbps",
        type=float,
        help="the device's peak memory bandwidth, GB/s (default: by device name, spec sheets)",
    )
    p.add_argument(
        "--linear",
        action="store_true",
        help="the output layer and the loss together: materialised GEMM + loss against the "
        "fused vocab_parallel_linear_gem_loss (see the module doc)",
    )
    p.add_argument("--hidden", type=int, help="--linear: hidden size H")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="every available method once at a tiny size, on any device (a test that the "
        "script runs; the numbers mean nothing)",
    )
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "cuda" if torch.cuda.is_available() else "cpu"
    keys = ("tokens", "local_vocab", "tp", "dtypes", "repeats", "methods", "hidden")
    for key, default in zip(keys, LINEAR_DEFAULTS[mode] if args.linear else DEFAULTS[mode]):
        if getattr(args, key) is None:
            setattr(args, key, list(default) if isinstance(default, list) else default)
    allowed = LINEAR_METHODS if args.linear else ALL_METHODS
    wrong = [m for m in args.methods if m not in allowed]
    if wrong:
        p.error(
            f"--methods: {wrong[0]} is not a method of this mode"
            f"{' (--linear)' if args.linear else ' (without --linear)'}; choose from {allowed}"
        )
    if args.hidden is not None and not args.linear:
        p.error(f"--hidden {args.hidden}: only with --linear")
    for key in ("tokens", "repeats") + (("hidden",) if args.linear else ()):
        if getattr(args, key) < 1:
            p.error(f"--{key}: must be a positive integer, got {getattr(args, key)}")
    for key in ("local_vocab", "tp"):
        bad = [x for x in getattr(args, key) if x < 1]
        if bad:
            p.error(f"--{key.replace('_', '-')}: must be positive integers, got {bad[0]}")
    if args.peak_gbps is not None and not args.peak_gbps > 0:
        p.error(f"--peak-gbps: must be positive, got {args.peak_gbps}")
    if torch.cuda.is_available() and max(args.tp) > torch.cuda.device_count():
        p.error(f"--tp {max(args.tp)}: only {torch.cuda.device_count()} CUDA device(s) here")
    return args


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke and not cuda:
        # Triton kernels run in Triton's CPU interpreter (read when triton is first imported:
        # before torch._dynamo, which imports it)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch._dynamo.config.suppress_errors = False
    if args.smoke and not cuda:
        # no inductor build of the fused CE on a CPU (tens of seconds): its code runs eagerly
        torch._dynamo.config.disable = True

    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_gbps or (peak_gbps_for(name) if cuda else None)
    shape = (
        f"{args.tokens} tokens x H {args.hidden} x {' '.join(map(str, args.local_vocab))} local "
        "vocab, output layer + loss (--linear)"
        if args.linear
        else f"{args.tokens} tokens x {' '.join(map(str, args.local_vocab))} local vocab, "
        f"logits: {args.logits}"
    )
    print(
        f"device: {'cuda ' + name if cuda else 'cpu'}, torch {torch.__version__}, {shape}, "
        f"best of {args.repeats} fwd+bwd "
        f"({'CUDA events' if cuda else 'CPU time, 1 thread per rank'})"
        + (", smoke run: the numbers mean nothing" if args.smoke else "")
    )
    if cuda and not args.linear:
        source = "--peak-gbps" if args.peak_gbps else "NVIDIA spec sheet"
        print(
            f"peak bandwidth: {peak:.0f} GB/s ({source})"
            if peak
            else f"peak bandwidth: unknown for {name!r}: pass --peak-gbps"
        )
        print("GB/s: 3 x element size bytes per logit (read fwd, read bwd, write grad) / time")
    # CPU: memory under the default malloc, time under a retaining one (see the module doc).
    phases = (
        {"both": {}}
        if cuda or args.smoke
        else {
            # --linear: every allocation of 64 KiB or more mapped on its own, so that freed
            # buffers leave the resident set (glibc's adaptive threshold would keep some)
            "memory": {"MALLOC_MMAP_THRESHOLD_": "65536"} if args.linear else {},
            "time": {
                "MALLOC_MMAP_MAX_": "0",
                "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
                "MALLOC_TOP_PAD_": str(1 << 28),
            },
        }
    )
    measured = {}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    for world in args.tp:
        for phase, env in phases.items():
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            os.environ["MASTER_PORT"] = str(_free_port())
            try:
                worker = _linear_worker if args.linear else _worker
                if phase == "both" and world == 1:  # in this process: no start-up of a child
                    results = []
                    worker(0, 1, args, phase, results)
                else:
                    with mp.Manager() as manager:
                        shared = manager.list()
                        mp.spawn(worker, args=(world, args, phase, shared), nprocs=world)
                        results = list(shared)
                for w, d, v, n, ph, sec, extra in results:
                    entry = measured.setdefault((w, d, v, n), {})
                    if ph in ("time", "both"):
                        entry["sec"] = sec
                    if ph in ("memory", "both"):
                        entry["extra"] = extra
            finally:
                for k, v in saved.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    rows = [
        (w, d, v, n, e.get("sec", math.nan), e.get("extra", math.nan))
        for (w, d, v, n), e in measured.items()
    ]
    if args.linear:
        print_linear_table(rows, args)
    else:
        print_table(rows, args, cuda, peak)


if __name__ == "__main__":
    main()
