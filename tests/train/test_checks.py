"""Bad inputs of the training entry get one named line; a killed checkpoint save loses nothing.

Five launches of ``megatron_gem.train`` (tiny GPT, mock data unless said):

* ``killed``: TP=2, 8 iterations, saves at 4 and 8; the save of 8 is held (a test-only hook,
  written below) after every rank wrote its ``.distcp`` and before ``.metadata``, and the whole
  process tree gets SIGKILL there;
* ``resumed``: ``--load`` of what the kill left, continued to 8 (saving into the same directory);
* ``bf16``: TP=2, 2 iterations with ``--bf16`` on CPU;
* the pre-training path with 400 documents and the default ``--split`` (used to hang forever);
* a checkpoint with a cut-short ``.distcp`` given to ``--load`` (python, no torchrun: the check
  runs before anything starts).

The other refusals are checked in-process on ``check_inputs(parse_args(argv))``, the function
``main`` calls before ``pretrain``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, cpu_flag, parse_megatron_log, run_train
from megatron_gem.train.arguments import parse_args
from megatron_gem.train.checks import InputError, check_inputs, checkpoint_damage

MODEL = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 --lr 3e-3 "
    "--log-interval 1 --eval-interval 1000 --num-workers 0 --seed 1234"
).split()
MOCK = "--mock-data --tokenizer-type NullTokenizer --vocab-size 250 --eval-iters 0".split()
TP2 = ["--tensor-model-parallel-size", "2"]
KILL_ARGS = MODEL + MOCK + TP2 + ["--train-iters", "8", "--save-interval", "4"]

WORDS = "the cat dog sat on mat a big small red blue runs jumps quickly over under".split()

# Holds the save of one iteration where rank 0's writer finishes: every .distcp is written,
# .metadata (renamed into place last) and the tracker file are not.
STOP_SAVE = """
import os, time

def stop_before_metadata():
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    original = FileSystemWriter.finish
    def finish(self, metadata, results):
        path = os.fspath(getattr(self, "checkpoint_dir", self.path))
        if os.path.basename(path) == os.environ["STOP_SAVE_AT"]:
            open(os.environ["STOP_SAVE_FLAG"], "w").close()
            time.sleep(600)
        return original(self, metadata, results)
    FileSystemWriter.finish = finish

if __name__ == "__main__":
    stop_before_metadata()
    from megatron_gem.train.entry import main
    main()
"""


@pytest.fixture(autouse=True)
def _tp_env(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron asserts it for TP > 1


def _env():
    return dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )


def _kill_tree(proc):
    """SIGKILL torchrun and every process under it (its workers run in sessions of their own)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(procs, timeout=30)


def _start(cmd, log_path, env=None):
    log = open(log_path, "w")
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=dict(_env(), **(env or {})),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    ), log


def _run_entry(argv, nproc=None, timeout=120):
    """``(returncode, output)`` of the entry: under torchrun with ``nproc``, else plain python.
    On timeout the process tree is killed and the test fails (a hang is a failure)."""
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "megatron_gem.train",
            *cpu_flag(),
            *argv,
        ]
    else:
        cmd = [sys.executable, "-m", "megatron_gem.train", *cpu_flag(), *argv]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        pytest.fail(f"the entry ran past {timeout} s (hang): {' '.join(cmd)}")
    return proc.returncode, out


def _entry_error(rc, out, torchrun=False):
    """The entry's one error line; asserts exit status 2 and no Python trace from the entry."""
    lines = [line for line in out.splitlines() if line.startswith("megatron-gem-train: error: ")]
    assert rc != 0 and len(lines) == 1, out[-4000:]
    if (
        torchrun
    ):  # torchrun reports a failed worker with a trace of its own; the worker printed none
        assert "[rank0]: Traceback" not in out and "exitcode  : 2" in out, out[-4000:]
    else:
        assert rc == 2 and "Traceback" not in out, out[-4000:]
    return lines[0]


def _listing(root):
    """path -> sha256 of every file under ``root``."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _refusal(argv):
    with pytest.raises(InputError) as err:
        check_inputs(parse_args(argv))
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The checkpoint directory as the kill left it (a copy), and the killed run's log."""
    d = tmp_path_factory.mktemp("kill")
    ckpt, flag, script = d / "ckpt", d / "stopped", d / "stop_save.py"
    script.write_text(STOP_SAVE)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(script),
        *cpu_flag(),
        *KILL_ARGS,
        "--save",
        str(ckpt),
    ]
    proc, log = _start(
        cmd, d / "killed.log", env={"STOP_SAVE_AT": "iter_0000008", "STOP_SAVE_FLAG": str(flag)}
    )
    try:
        deadline = time.time() + 240
        while not flag.exists():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(
                    "the run did not reach the held save:\n"
                    f"{(d / 'killed.log').read_text()[-4000:]}"
                )
            time.sleep(0.1)
    finally:
        _kill_tree(proc)
        log.close()
    snapshot = d / "as_killed"
    shutil.copytree(ckpt, snapshot)
    return ckpt, snapshot, parse_megatron_log((d / "killed.log").read_text())


@pytest.fixture(scope="module")
def resumed(killed):
    ckpt, _, _ = killed
    out = run_train(2, KILL_ARGS + ["--load", str(ckpt), "--save", str(ckpt)])
    return out, parse_megatron_log(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 60-token SentencePiece model, 400 pre-training documents, SFT data, a text file."""
    from megatron_gem.data.sft import prepare_sft_data
    from megatron_gem.data.text import preprocess_jsonl
    from megatron_gem.data.tokenizer import build_tokenizer, train_sentencepiece

    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(400)]
    model = train_sentencepiece(docs, d / "tok", 60)
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    text = preprocess_jsonl(
        str(d / "docs.jsonl"), str(d / "docs"), "SentencePieceTokenizer", model
    ).outputs["text"]
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"is the {w} red?"},
                {"role": "assistant", "content": f"the {w} is blue"},
            ]
        }
        for w in WORDS
    ]
    (d / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    prepare_sft_data(
        str(d / "chat.jsonl"), str(d / "chat"), build_tokenizer("SentencePieceTokenizer", model), 32
    )
    (d / "notes.txt").write_text("not a tokenizer\n")
    return {
        "dir": d,
        "model": model,
        "text": text,
        "sft": str(d / "chat"),
        "notes": str(d / "notes.txt"),
    }


def _sp(data):
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data["model"]]


# --------------------------------------------------------------------------------------- 7. kill
def test_kill_during_save_keeps_last_checkpoint_and_resume_is_exact(killed, resumed):
    ckpt, snapshot, full = killed
    out, log = resumed
    # the kill hit the save of 8: its shards are on disk, its .metadata and the tracker are not
    assert (snapshot / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert sorted(p.name for p in (snapshot / "iter_0000008").iterdir()) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert checkpoint_damage(str(snapshot / "iter_0000004")) is None
    assert "the save did not finish" in checkpoint_damage(str(snapshot / "iter_0000008"))
    # the killed run trained 1..8 uninterrupted; the resumed one loaded 4 and trained 5..8
    assert sorted(full["train"]) == list(range(1, 9))
    assert f"successfully loaded checkpoint from {ckpt}" in out and "at iteration 4" in out
    assert sorted(log["train"]) == [5, 6, 7, 8]
    for i in (5, 7, 8):
        assert log["train"][i]["lm loss"] == full["train"][i]["lm loss"], (
            i,
            log["train"][i],
            full["train"][i],
        )
    for i in (5, 6, 7, 8):
        assert log["train"][i]["grad norm"] == full["train"][i]["grad norm"], i
    # Megatron's first log line of a run keeps its running sums: line 6 is the mean of 5 and 6
    assert log["train"][6]["lm loss"] == pytest.approx(
        (full["train"][5]["lm loss"] + full["train"][6]["lm loss"]) / 2, abs=2e-6
    )
    # the complete checkpoint was never touched; the held one was rewritten whole
    assert _listing(ckpt / "iter_0000004") == _listing(snapshot / "iter_0000004")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert checkpoint_damage(str(ckpt / "iter_0000008")) is None


# --------------------------------------------------------------------------------------- 3. damage
def test_damaged_checkpoint_is_named_with_the_earlier_one(killed, resumed, tmp_path):
    ckpt, snapshot, _ = killed  # as the resumed run left it: iterations 4 and 8 complete
    base = MODEL + MOCK + ["--train-iters", "8"]  # TP=1: the checks do not depend on it
    # the held save named explicitly
    msg = _refusal(base + ["--load", str(snapshot), "--ckpt-step", "8"])
    assert "iter_0000008" in msg and ".metadata is missing" in msg and "--ckpt-step 4" in msg
    # a tracker emptied by a kill while it was written
    emptied = tmp_path / "emptied"
    shutil.copytree(ckpt, emptied)
    (emptied / "latest_checkpointed_iteration.txt").write_text("")
    msg = _refusal(base + ["--load", str(emptied)])
    assert "latest_checkpointed_iteration.txt names no iteration" in msg and "--ckpt-step 8" in msg
    # a tracker naming an iteration whose directory is gone
    msg = _refusal(base + ["--load", str(snapshot), "--ckpt-step", "6"])
    assert "iter_0000006" in msg and "is missing" in msg and "--ckpt-step 4" in msg
    # a .distcp cut short, through the entry itself: one line, exit 2, nothing written
    cut = tmp_path / "cut"
    shutil.copytree(ckpt, cut)
    shard = cut / "iter_0000008" / "__1_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    before = _listing(cut)
    line = _entry_error(*_run_entry(base + ["--load", str(cut)]))
    assert (
        str(shard) in line and "cut short" in line and "damaged" in line and "--ckpt-step 4" in line
    ), line
    assert _listing(cut) == before
    # no earlier iteration to offer
    only = tmp_path / "only"
    shutil.copytree(cut, only, ignore=shutil.ignore_patterns("iter_0000004"))
    assert "no earlier complete checkpoint" in _refusal(base + ["--load", str(only)])
    # --ckpt-format torch: a cut-short .pt
    torch_dir = tmp_path / "torch_fmt" / "iter_0000003" / "mp_rank_00"
    torch_dir.mkdir(parents=True)
    import torch

    torch.save({"x": torch.zeros(1000)}, torch_dir / "model_optim_rng.pt")
    assert checkpoint_damage(str(torch_dir.parent)) is None
    os.truncate(torch_dir / "model_optim_rng.pt", 2000)
    (tmp_path / "torch_fmt" / "latest_checkpointed_iteration.txt").write_text("3")
    msg = _refusal(base + ["--load", str(tmp_path / "torch_fmt"), "--ckpt-format", "torch"])
    assert "model_optim_rng.pt is not a whole torch file" in msg


# ------------------------------------------------------------------------------------- 1. finetune
def test_finetune_needs_a_checkpoint(killed, tmp_path):
    _, snapshot, _ = killed
    base = MODEL + MOCK + ["--train-iters", "8"]  # TP=1: the checks do not depend on it
    msg = _refusal(base + ["--finetune", "--load", "/typo"])
    assert msg.startswith("argument --load: '/typo' holds no checkpoint") and "--finetune" in msg
    assert "random weights" in msg
    assert "needs --load" in _refusal(base + ["--finetune"])
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _refusal(base + ["--pretrained-checkpoint", "/typo2", "--load", str(empty)])
    assert msg.startswith("argument --pretrained-checkpoint: '/typo2' holds no checkpoint")
    # accepted: a real checkpoint either way, and a plain --load of an empty dir (a first run)
    for extra in (
        ["--finetune", "--load", str(snapshot)],
        ["--pretrained-checkpoint", str(snapshot), "--load", str(empty)],
        ["--load", str(empty)],
    ):
        check_inputs(parse_args(base + extra))


# ------------------------------------------------------------------------------------ 4. tokenizer
def test_tokenizer_model_that_is_not_one_is_named(data, tmp_path):
    base = MODEL + ["--mock-data", "--eval-iters", "0", "--train-iters", "2"]
    for kind in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
        msg = _refusal(base + ["--tokenizer-type", kind, "--tokenizer-model", data["notes"]])
        assert msg.startswith(
            f"argument --tokenizer-model {data['notes']!r}: not a {kind} model"
        ), msg
    msg = _refusal(
        base
        + [
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(tmp_path / "none"),
        ]
    )
    assert "no such file" in msg and str(tmp_path / "none") in msg
    check_inputs(parse_args(base + _sp(data)))


# --------------------------------------------------------------------------------------- 5. data
def test_pretraining_data_checks(data, monkeypatch, tmp_path):
    from megatron_gem.train import checks as train_inputs

    base = MODEL + ["--eval-iters", "1", "--train-iters", "2", "--split", "90,5,5"]
    check_inputs(parse_args(base + _sp(data) + ["--data-path", data["text"]]))  # fine as it is
    # SFT data without --sft (it used to reach the embedding as negative ids: IndexError)
    msg = _refusal(base + _sp(data) + ["--data-path", data["sft"]])
    assert f"{data['sft']!r} is SFT data" in msg and "pass --sft" in msg
    # a path given with its suffix
    msg = _refusal(base + _sp(data) + ["--data-path", data["text"] + ".bin"])
    assert f"no {data['text']}.bin.idx" in msg
    # ids of another tokenizer: the data's largest id against a smaller padded vocabulary
    top = int(np.fromfile(data["text"] + ".bin", dtype=np.uint16).max())
    small = [
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "20",
        "--make-vocab-size-divisible-by",
        "8",
    ]
    padded = 24  # NullTokenizer(20) has 21 ids (eod added), padded to a multiple of 8
    msg = _refusal(base + small + ["--data-path", data["text"]])
    assert (
        f"{data['text']}.bin holds token id {top}" in msg
        and f"padded vocabulary of {padded}" in msg
    ), msg
    # uint16 data under a vocabulary above 65535 cannot hold a bad id: nothing is read
    monkeypatch.setattr(train_inputs, "_sample_ids", lambda *a: pytest.fail("read the .bin"))
    check_inputs(
        parse_args(
            base
            + [
                "--tokenizer-type",
                "NullTokenizer",
                "--vocab-size",
                "70000",
                "--data-path",
                data["text"],
            ]
        )
    )
    monkeypatch.undo()
    # a large .bin is sampled (its head and 16 windows), not scanned
    n = train_inputs.SAMPLE_HEAD + 40 * train_inputs.SAMPLE_WINDOW
    tokens = np.zeros(n, dtype=np.uint16)
    tokens[[5, n - 1]] = 7  # first token and last token are always in the sample
    tokens[train_inputs.SAMPLE_HEAD + train_inputs.SAMPLE_WINDOW + 5] = 9  # between windows 0 and 1
    tokens.tofile(tmp_path / "big.bin")
    sample = train_inputs._sample_ids(str(tmp_path / "big.bin"), np.dtype(np.uint16))
    assert sample.size == train_inputs.SAMPLE_HEAD + 16 * train_inputs.SAMPLE_WINDOW
    assert sample.max() == 7 and (sample == 7).sum() == 2


def test_empty_split_part_is_refused_instead_of_hanging(data):
    # 400 documents, Megatron's default --split 969,30,1: the test part gets round(0.4) = 0
    before = _listing(data["dir"])
    argv = (
        MODEL + _sp(data) + ["--data-path", data["text"], "--train-iters", "2", "--eval-iters", "1"]
    )
    line = _entry_error(*_run_entry(argv, nproc=1, timeout=150), torchrun=True)
    assert (
        f"the test part of {data['text']!r} gets no document (400 documents, --split '969, 30, 1')"
        in line
    )
    assert "--split" in line and "more documents" in line
    assert _listing(data["dir"]) == before  # refused before Megatron wrote its index cache
    # the validation part is checked the same way (also without torchrun)
    msg = _refusal(
        MODEL
        + _sp(data)
        + [
            "--data-path",
            data["text"],
            "--train-iters",
            "2",
            "--eval-iters",
            "1",
            "--split",
            "999,0.5,0.5",
        ]
    )
    assert "the validation part" in msg


# --------------------------------------------------------------------------------------- 6. bf16
def test_bf16_trains_on_cpu(killed):
    _, _, fp32 = killed
    argv = MODEL + MOCK + TP2 + ["--train-iters", "2", "--bf16"]
    assert (
        "--no-masked-softmax-fusion" not in argv
    )  # the entry adds it on a host without the kernel
    out = run_train(2, argv)
    log = parse_megatron_log(out)
    assert sorted(log["train"]) == [1, 2]
    assert re.search(r"^  bf16 \.+ True$", out, re.M) and re.search(
        r"^  params_dtype \.+ torch.bfloat16$", out, re.M
    )
    assert re.search(r"^  masked_softmax_fusion \.+ False$", out, re.M)  # what makes it run
    # same weights, data and seed as the fp32 killed run: bf16 rounding moves the first loss a
    # little
    first = log["train"][1]["lm loss"]
    assert first != fp32["train"][1]["lm loss"] and first == pytest.approx(
        fp32["train"][1]["lm loss"], abs=0.05
    )
