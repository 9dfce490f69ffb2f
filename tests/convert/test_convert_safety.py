"""Conversion never destroys what a user wrote (issue 11): an output overlapping an input is
refused before anything is written, only a complete output is published, and a conversion
killed mid-way leaves its inputs and an earlier output intact, stops its workers and has its
leftovers removed by the next run.

One tiny Llama and one first conversion (module fixture) serve every check; the kill checks run
the real CLI in a subprocess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_gem.convert import (
    IncompleteOutputError,
    api,
    arch_from_hf_config,
    check_output_dir,
    hf_to_megatron,
    megatron_to_hf,
    read_megatron_args,
    read_megatron_tensors,
)
from megatron_gem.convert.checkpoints import check_hf_output, check_megatron_output
from megatron_gem.convert.hf_files import read_hf_config
from megatron_gem.paths import publish
from test_convert import _cli, llama_cfg, random_hf_state

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "tools" / "convert_checkpoint.py"


def listing(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (directories and links listed too,
    so that an empty temp directory left behind shows)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link -> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """``(root, hf, ck)``: a tiny HF Llama and its first conversion (one worker spawn)."""
    root = tmp_path_factory.mktemp("safety")
    cfg = llama_cfg(
        8.0,
        num_hidden_layers=2,
        vocab_size=97,
        hidden_size=24,
        intermediate_size=40,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=12,
    )
    random_hf_state(cfg, 5).save_pretrained(str(root / "hf"))
    hf_to_megatron(root / "hf", root / "ck")
    return root, root / "hf", root / "ck"


def _arch(hf: Path):
    return arch_from_hf_config(read_hf_config(hf))


def _work(first, tmp_path) -> Path:
    """A scratch copy of the inputs: ``hf``, ``ck``, ``D/model`` (the HF model next to a file
    of the user's) and ``E`` (an earlier HF output), so that nothing here can harm the
    fixture."""
    _, hf, ck = first
    shutil.copytree(hf, tmp_path / "hf", symlinks=True)
    shutil.copytree(ck, tmp_path / "ck", symlinks=True)
    shutil.copytree(hf, tmp_path / "D" / "model")
    (tmp_path / "D" / "notes.txt").write_text("the user's own notes\n")
    shutil.copytree(hf, tmp_path / "E")
    (tmp_path / "link_ck").symlink_to(tmp_path / "ck")
    (tmp_path / "link_hf").symlink_to(tmp_path / "hf")
    return tmp_path


# every (conversion, input args, --out, words of the error): output is / contains / lies inside
# an input, directly or through a symlink
def _overlap_cases(w: Path):
    def h2m(hf, out):
        return (
            ["hf-to-megatron", "--hf", str(hf), "--out", str(out), "--overwrite"],
            lambda: hf_to_megatron(hf, out, overwrite=True),
        )

    def m2h(load, out, tok=None):
        return (
            ["megatron-to-hf", "--load", str(load), "--out", str(out), "--overwrite"]
            + (["--tokenizer", str(tok)] if tok else []),
            lambda: megatron_to_hf(load, out, tokenizer_dir=tok, overwrite=True),
        )

    return [
        (*m2h(w / "ck", w / "ck"), f"--out {w / 'ck'} is --load {w / 'ck'}"),
        (*m2h(w / "ck", w / "ck" / "release"), "lies inside --load"),
        (*m2h(w / "ck", w), f"--out {w} contains --load {w / 'ck'}"),
        (*m2h(w / "ck", w / "E", w / "E"), f"--out {w / 'E'} is --tokenizer {w / 'E'}"),
        (*m2h(w / "ck", w / "link_ck"), f"--out {w / 'link_ck'} is --load {w / 'ck'}"),
        (*m2h(w / "link_ck", w / "ck"), f"--out {w / 'ck'} is --load {w / 'link_ck'}"),
        (*h2m(w / "hf", w / "hf"), f"--out {w / 'hf'} is --hf {w / 'hf'}"),
        (*h2m(w / "D" / "model", w / "D"), f"--out {w / 'D'} contains --hf {w / 'D' / 'model'}"),
        (*h2m(w / "hf", w / "hf" / "megatron"), "lies inside --hf"),
        (*h2m(w / "link_hf", w / "hf"), f"--out {w / 'hf'} is --hf {w / 'link_hf'}"),
        (*h2m(w / "hf", w / "link_hf"), f"--out {w / 'link_hf'} is --hf {w / 'hf'}"),
    ]


def test_output_overlapping_an_input_is_refused_before_anything_is_written(first, tmp_path):
    """Library call: ValueError naming both paths; every file (and directory) under the inputs,
    D and their parent is unchanged, no temp directory was made."""
    w = _work(first, tmp_path)
    before = listing(w)
    for _, call, words in _overlap_cases(w):
        with pytest.raises(ValueError) as e:
            call()
        assert words in str(e.value) and "nothing was written" in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
        assert listing(w) == before, words


def test_export_refuses_to_replace_the_tokenizer_the_checkpoint_names(first, tmp_path, monkeypatch):
    """A checkpoint converted from HF records that directory as its tokenizer, and the export
    reads it: exporting over it (--overwrite) is refused like an explicit input."""
    w = _work(first, tmp_path)
    args = read_megatron_args(w / "ck" / "release")
    args.tokenizer_type, args.tokenizer_model = "HuggingFaceTokenizer", str(w / "link_hf")
    monkeypatch.setattr(api, "read_megatron_args", lambda d: args)
    before = listing(w)
    with pytest.raises(
        ValueError, match=f"--out {w / 'hf'} is the checkpoint's --tokenizer-model {w / 'link_hf'}"
    ):
        megatron_to_hf(w / "ck", w / "hf", overwrite=True)
    assert listing(w) == before


def test_cli_refuses_an_output_overlapping_an_input(first, tmp_path, capsys):
    """The CLI: exit code 2, the one error line naming both paths, no traceback, nothing
    changed."""
    w = _work(first, tmp_path)
    before = listing(w)
    for argv, _, words in _overlap_cases(w):
        code, err = _cli(argv, capsys)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and words in errors[0], err
        assert "Traceback" not in err
        assert listing(w) == before, words


# --------------------------------------------------------------------------------------------
# only a complete output is published
# --------------------------------------------------------------------------------------------


def _exit_without_saving(**kwargs):
    sys.exit(0)  # as Megatron's load/save paths do on some failures: exit code 0, nothing written


def _die(**kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does


def test_workers_that_write_nothing_publish_nothing(first, tmp_path, monkeypatch):
    """Workers that return without writing (no spawn) or exit 0 / get killed (real workers):
    IncompleteOutputError, nothing published, the earlier output at --out byte-identical, no
    temp directory left."""
    w = _work(first, tmp_path)
    before = listing(w)
    with monkeypatch.context() as m:
        m.setattr(api, "run_workers", lambda *a, **k: None)
        with pytest.raises(IncompleteOutputError, match="missing latest_checkpointed_iter"):
            hf_to_megatron(w / "hf", w / "ck", overwrite=True)
        assert listing(w) == before
        with pytest.raises(IncompleteOutputError, match="missing model.safetensors"):
            megatron_to_hf(w / "ck", w / "E", overwrite=True)
        assert listing(w) == before

    monkeypatch.setattr(api, "import_worker", _exit_without_saving)
    with pytest.raises(IncompleteOutputError, match=f"checkpoint they wrote in {w}/.ck.incompl"):
        hf_to_megatron(w / "hf", w / "ck", overwrite=True)
    assert listing(w) == before
    monkeypatch.setattr(api, "export_worker", _die)
    with pytest.raises(IncompleteOutputError, match="worker 0 of 1 was killed by SIGKILL"):
        megatron_to_hf(w / "ck", w / "E", overwrite=True)
    assert listing(w) == before


def test_cli_reports_an_incomplete_output_in_one_line(first, tmp_path, monkeypatch, capsys):
    w = _work(first, tmp_path)
    before = listing(w)
    monkeypatch.setattr(api, "run_workers", lambda *a, **k: None)
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", CLI)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    code = cli.main(
        ["megatron-to-hf", "--load", str(w / "ck"), "--out", str(w / "E"), "--overwrite"]
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    assert f"error: the conversion workers ended but the HF directory they wrote in {w}" in err
    assert listing(w) == before


def test_output_checks_name_what_is_missing(first, tmp_path):
    """The checks run before publishing pass on real outputs and name each kind of gap."""
    _, hf, ck = first
    arch = _arch(hf)
    check_megatron_output(ck, arch)
    check_hf_output(hf, arch)

    bad = tmp_path / "ck"
    shutil.copytree(ck, bad)
    distcp = next((bad / "release").glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:-10])  # a save cut short
    with pytest.raises(IncompleteOutputError, match=rf"missing release/{distcp.name} \(bytes"):
        check_megatron_output(bad, arch)
    distcp.unlink()
    with pytest.raises(IncompleteOutputError, match=f"missing release/{distcp.name}"):
        check_megatron_output(bad, arch)
    (bad / "release" / "metadata.json").unlink()
    with pytest.raises(IncompleteOutputError, match="missing release/metadata.json"):
        check_megatron_output(bad, arch)
    deeper = dataclasses.replace(arch, num_layers=4)  # the model needs more layers
    with pytest.raises(IncompleteOutputError, match="6 layer tensors of 4 layers"):
        check_megatron_output(ck, deeper)

    from safetensors.torch import load_file, save_file

    out = tmp_path / "hf"
    shutil.copytree(hf, out)
    state = load_file(str(out / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(IncompleteOutputError, match="tensor model.layers.1.mlp.up_proj.weight"):
        check_hf_output(out, arch)
    whole = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(whole[:-4])  # a write cut short
    with pytest.raises(IncompleteOutputError, match="missing model.safetensors"):
        check_hf_output(out, arch)
    (out / "model.safetensors").write_bytes(whole)
    (out / "model.safetensors").rename(out / "model-00001-of-00002.safetensors")
    (out / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors", '
        '"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}'
    )
    with pytest.raises(IncompleteOutputError, match="missing model-00002-of-00002.safetensors"):
        check_hf_output(out, arch)
    (out / "config.json").unlink()
    with pytest.raises(IncompleteOutputError, match="missing config.json"):
        check_hf_output(out, arch)


# --------------------------------------------------------------------------------------------
# leftovers of a conversion that died
# --------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_leftovers_are_named_and_only_dead_ones_removed(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("earlier output")
    dead, alive = _dead_pid(), os.getpid()
    for name in (
        f".out.incomplete-{dead}-abc",
        f".out.replaced-{dead}",
        f".out.tmp-{dead}",
        f".out.incomplete-{alive}-def",
        ".out.incomplete-k3j_x9",
        ".other.tmp-1",
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("x")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        check_output_dir(out, overwrite=False)  # a refusal touches nothing
    assert len(list(tmp_path.iterdir())) == 7
    capsys.readouterr()
    check_output_dir(out, overwrite=True)
    err = capsys.readouterr().err
    for name in (f".out.incomplete-{dead}-abc", f".out.replaced-{dead}", f".out.tmp-{dead}"):
        assert (
            f"found {tmp_path / name}, left by a conversion that died (process {dead}): "
            "removing it" in err
        )
        assert not (tmp_path / name).exists()
    assert (
        f"found {tmp_path}/.out.incomplete-{alive}-def (left by process {alive}, still "
        "running): leaving it" in err
    )
    assert f"found {tmp_path}/.out.incomplete-k3j_x9 (left by an unknown process)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.tmp-1",
        f".out.incomplete-{alive}-def",
        ".out.incomplete-k3j_x9",
        "out",
    ]
    assert (out / "f").read_text() == "earlier output"


def test_earlier_output_caught_between_the_renames_is_restored(tmp_path, capsys):
    """A conversion killed after moving the earlier output aside and before moving the new one
    in left the user's output only as .out.replaced-PID: the next run puts it back."""
    dead = _dead_pid()
    aside = tmp_path / f".out.replaced-{dead}"
    aside.mkdir()
    (aside / "f").write_text("earlier output")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        check_output_dir(tmp_path / "out", overwrite=False)
    assert (
        f"found {aside}, the earlier {tmp_path / 'out'} a conversion that died"
        in capsys.readouterr().err
    )
    assert (tmp_path / "out" / "f").read_text() == "earlier output" and not aside.exists()


def test_publish_puts_the_earlier_output_back_when_the_swap_fails(tmp_path, monkeypatch):
    out, tmp = tmp_path / "out", tmp_path / ".out.incomplete-1-x"
    out.mkdir()
    (out / "f").write_text("earlier output")
    tmp.mkdir()
    real = os.rename

    def rename(a, b):
        if Path(a) == tmp:
            raise OSError("disk gone")
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        publish(tmp, out)
    assert (out / "f").read_text() == "earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.incomplete-1-x", "out"]


# --------------------------------------------------------------------------------------------
# the parent is killed: its workers stop, inputs and the earlier output survive
# --------------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _descendants(pid: int) -> set[int]:
    kids, out, todo = _children(), set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(CLI), *argv],
            stdout=subprocess.DEVNULL,
            stderr=f,
            env=env,
            cwd=REPO,
        )


def _wait_until_saving(proc: subprocess.Popen, out: Path, log: Path) -> set[int]:
    """Wait until the worker writes the checkpoint into the temp dir and (for up to 3 s) has
    started its own child (Megatron's checkpoint writer starts a multiprocessing Manager);
    return the PIDs of every process under the CLI."""
    deadline, saving = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if saving is None and list(out.parent.glob(f".{out.name}.incomplete-{proc.pid}-*/release")):
            saving = time.monotonic()
        if saving is not None:
            kids = _children()
            below = _descendants(proc.pid)
            if any(kids.get(w) for w in kids.get(proc.pid, [])) or time.monotonic() > saving + 3:
                assert below, "no worker process under the CLI"
                return below
        time.sleep(0.05)
    raise AssertionError("the conversion never started saving:\n" + log.read_text()[-3000:])


def _assert_gone(pids: set[int], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in pids if _running(p)}
    assert not left, f"processes outlived the conversion: {left}"


def test_killed_conversion_stops_its_workers_and_the_next_run_cleans_up(first, tmp_path):
    """hf-to-megatron --out CK --overwrite, CK the first conversion: (1) SIGTERM while the
    worker saves: exit 143, worker gone, the temp dir removed; (2) kill -9 while it saves:
    the worker dies within seconds, the temp dir stays; inputs and CK are unchanged after
    both; (3) the next run names the dead run's leftover and removes it, leaves a live
    process's one, and publishes a complete checkpoint equal to the first."""
    _, hf, ck = first
    ck2 = tmp_path / "ck"
    shutil.copytree(ck, ck2)
    argv = ["hf-to-megatron", "--hf", str(hf), "--out", str(ck2), "--overwrite"]
    inputs, earlier = listing(hf), listing(ck2)
    log = tmp_path / "log"

    proc = _start(argv, log)
    workers = _wait_until_saving(proc, ck2, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert "stopped by SIGTERM: nothing was published" in log.read_text()
    _assert_gone(workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "log"]
    assert listing(hf) == inputs and listing(ck2) == earlier

    proc = _start(argv, log)
    workers = _wait_until_saving(proc, ck2, log)
    proc.kill()
    proc.wait()
    _assert_gone(workers)
    (stale,) = tmp_path.glob(f".ck.incomplete-{proc.pid}-*")
    assert listing(hf) == inputs and listing(ck2) == earlier

    mine = tmp_path / f".ck.incomplete-{os.getpid()}-live"  # a live process's: never removed
    mine.mkdir()
    done = subprocess.run(
        [sys.executable, str(CLI), *argv],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        f"found {stale}, left by a conversion that died (process {proc.pid}): removing it"
        in done.stderr
    )
    assert f"found {mine} (left by process {os.getpid()}, still running): leaving it" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "ck", "log"]
    check_megatron_output(ck2, _arch(hf))
    new, old = read_megatron_tensors(ck2 / "release"), read_megatron_tensors(ck / "release")
    assert new.keys() == old.keys() and all(new[k].equal(old[k]) for k in old)
    assert listing(hf) == inputs
