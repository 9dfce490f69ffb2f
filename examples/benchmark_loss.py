"""Benchmark: GEM forward+backward against Megatron's own cross-entropy, in one run.

Prints, per (tensor-parallel size, logits dtype), the time and the peak extra memory of
megatron_gem.vocab_parallel_gem_loss and of Megatron's unfused `vocab_parallel_cross_entropy`
and fused native cross-entropy, and their ratios (GEM / Megatron unfused CE).

"Peak extra memory" is the peak over forward+backward minus what was held before (the
inputs): on CUDA from torch's allocator statistics, on CPU from the process's peak resident
set size (Linux /proc VmHWM, reset before each measurement).

Time on CUDA is wall time after a synchronize. On CPU it is the process's CPU time (one thread
per rank), which other load on a shared machine barely disturbs, measured in separate
processes whose malloc keeps freed memory (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_): like
CUDA's caching allocator, so neither loss pays first-touch page faults for its buffers, which
would otherwise dominate CPU timings and say nothing about GPUs.

    python examples/benchmark_loss.py                      # 4096 tokens x 32064 local vocab
    python examples/benchmark_loss.py --logits intermediate  # the gradient as a model gets it
    python examples/benchmark_loss.py --tp 1 --dtypes bf16 --tokens 1024
"""

from __future__ import annotations

import argparse
import os
import re
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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


def _methods(group):
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_gem import vocab_parallel_gem_loss

    return {
        "gem": lambda z, t: vocab_parallel_gem_loss(z, t, beta=0.7, tp_group=group),
        "gem+stats": lambda z, t: vocab_parallel_gem_loss(
            z, t, beta=0.7, tp_group=group, return_stats=True
        )[0],
        "megatron_ce": lambda z, t: vocab_parallel_cross_entropy(z, t, tp_group=group),
        "megatron_fused_ce": lambda z, t: fused_vocab_parallel_cross_entropy(z, t, group),
    }


def _measure_once(fn, logits, target, grad, device, intermediate):
    """Seconds and peak extra bytes of one fwd+bwd, on a fresh copy of the logits (Megatron's
    cross-entropy overwrites fp32 input logits in place). `intermediate`: the gradient is
    returned (torch.autograd.grad), as a model's output layer receives it, instead of being
    accumulated into the leaf's .grad, where autograd clones a gradient that aliases its input
    (Megatron's fp32 one does)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    z = logits.detach().clone().requires_grad_()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with PeakMemory(device) as mem:
        t0 = clock()
        loss = fn(z, target)
        if intermediate:
            torch.autograd.grad(loss, z, grad)
        else:
            loss.backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = clock() - t0
        del loss, z
    return dt, mem.extra


def _worker(rank, world, args, phase, results):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    methods = _methods(group)
    gen = torch.Generator().manual_seed(
        1234
    )  # same full logits on every rank: slice this rank's shard
    for dtype_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        full_v = args.local_vocab * world
        target = torch.randint(0, full_v, (args.tokens, 1), generator=gen).to(device)
        grad = torch.rand(args.tokens, 1, generator=gen).to(device)
        logits = (torch.randn(args.tokens, 1, args.local_vocab, generator=gen) * 3).to(
            device=device, dtype=dtype
        )
        # the fused CE hard-casts its gradient to bf16: only meaningful for bf16 logits
        names = [
            n for n in args.methods if not (n == "megatron_fused_ce" and dtype != torch.bfloat16)
        ]
        samples = {n: [] for n in names}
        # Round-robin over the methods, so drift in a shared machine's speed hits all of them;
        # the first round warms up (and compiles the fused CE). Best time, worst memory.
        for round_ in range(args.repeats + 1):
            for name in names:
                if samples[name] is None:
                    continue
                try:
                    sample = _measure_once(
                        methods[name], logits, target, grad, device, args.logits == "intermediate"
                    )
                except Exception as exc:  # e.g. the fused CE's torch.compile failing on a host
                    samples[name] = None
                    if rank == 0:
                        print(f"  {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                if round_:
                    samples[name].append(sample)
        if rank == 0:
            for name, got in samples.items():
                sec, extra = (
                    (min(s for s, _ in got), max(e for _, e in got)) if got else (float("nan"),) * 2
                )
                results.append((world, dtype_name, name, phase, sec, extra))
        del logits
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=4096, help="rows (s*b) of logits")
    p.add_argument("--local-vocab", type=int, default=32064, help="vocabulary shard per TP rank")
    p.add_argument(
        "--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes (processes)"
    )
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument(
        "--methods", nargs="+", default=["gem", "gem+stats", "megatron_ce", "megatron_fused_ce"]
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--logits",
        choices=["leaf", "intermediate"],
        default="leaf",
        help="leaf: backward() into logits.grad; intermediate: the gradient returned as in a model",
    )
    args = p.parse_args(argv)
    torch._dynamo.config.suppress_errors = False

    print(
        "device: "
        f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
        f"torch {torch.__version__}, {args.tokens} tokens x {args.local_vocab} local vocab, "
        f"logits: {args.logits}, best of {args.repeats} fwd+bwd "
        f"({'wall' if torch.cuda.is_available() else 'CPU'} time"
        f"{'' if torch.cuda.is_available() else ', 1 thread per rank'})"
    )
    # CPU: memory under the default malloc, time under a retaining one (see the module doc).
    phases = (
        {"both": {}}
        if torch.cuda.is_available()
        else {
            "memory": {},
            "time": {
                "MALLOC_MMAP_MAX_": "0",
                "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
                "MALLOC_TOP_PAD_": str(1 << 28),
            },
        }
    )
    measured = {}
    for world in args.tp:
        for phase, env in phases.items():
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                with mp.Manager() as manager:
                    results = manager.list()
                    os.environ["MASTER_PORT"] = str(29500 + (os.getpid() % 1000) + world)
                    mp.spawn(_worker, args=(world, args, phase, results), nprocs=world, join=True)
                    for w, d, n, ph, sec, extra in results:
                        entry = measured.setdefault((w, d, n), {})
                        if ph in ("time", "both"):
                            entry["sec"] = sec
                        if ph in ("memory", "both"):
                            entry["extra"] = extra
            finally:
                for k, v in saved.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    rows = [
        (w, d, n, e.get("sec", float("nan")), e.get("extra", float("nan")))
        for (w, d, n), e in measured.items()
    ]

    ref = {(w, d): (s, e) for w, d, n, s, e in rows if n == "megatron_ce"}
    header = (
        "| TP | logits | method | fwd+bwd ms | peak extra MiB "
        "| time / Megatron CE | memory / Megatron CE |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|")
    for w, d, n, s, e in rows:
        rs, re_ = ref.get((w, d), (float("nan"), float("nan")))
        time_ratio = s / rs if rs else float("nan")
        # no ratio against ~0 extra bytes (tiny shapes; Megatron's in-place fp32 path as an
        # intermediate)
        mem_ratio = e / re_ if re_ > 2**20 else float("nan")
        # RSS can end a hair below where it started: that is 0 extra, not "-0"
        print(
            f"| {w} | {d} | {n} | {s * 1e3:.0f} | {max(e, 0) / 2**20:.0f} "
            f"| {time_ratio:.2f} | {mem_ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
