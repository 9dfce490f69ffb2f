"""A label outside the vocabulary ends a training run with its named ValueError at the next log
line, although the GEM op checks targets without a host sync (``sync_checks=False``).

One launch: TP=2, ``--log-interval 2``, Megatron's NaN check off (with it on the error comes at the
first micro-batch: ``reduce_token_losses``). The entry's start-up checks refuse out-of-vocabulary
data, so a test-only entry script (below) sets one label of iteration 2 to the padded vocabulary
size after the batch is read.
"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, cpu_flag, parse_megatron_log

BAD_LABEL = """
import os

def inject_bad_label():
    import megatron_gem.train.batches as batches
    original, calls = batches.get_batch, []

    def get_batch(data_iterator, vp_stage=None):
        out = original(data_iterator, vp_stage)
        calls.append(1)
        if len(calls) == int(os.environ["BAD_LABEL_AT_CALL"]) and out[1] is not None:
            from megatron.training import get_args
            out[1][0, 3] = get_args().padded_vocab_size
        return out

    batches.get_batch = get_batch

if __name__ == "__main__":
    inject_bad_label()
    from megatron_gem.train.entry import main
    main()
"""

ARGS = (
    "--num-layers 1 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 4 --lr 1e-3 "
    "--train-iters 4 --log-interval 2 --eval-iters 0 --eval-interval 1000 --num-workers 0 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 250 --tensor-model-parallel-size 2 "
    "--loss gem --no-check-for-nan-in-loss-and-grad"
).split()


def test_out_of_vocabulary_label_stops_the_run_at_the_next_log_line(tmp_path):
    script = tmp_path / "bad_label_entry.py"
    script.write_text(BAD_LABEL)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(script),
        *cpu_flag(),
        *ARGS,
    ]
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        CUDA_DEVICE_MAX_CONNECTIONS="1",
        BAD_LABEL_AT_CALL="3",  # 2 micro-batches per iteration: iteration 2's first
    )
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode != 0, out[-4000:]
    # vocabulary 250 padded to 256 at TP=2; the error names the range and the label
    assert "ValueError: target/labels hold ids outside the vocabulary [0, 256)" in out, out[-4000:]
    assert "e.g. [256]" in out
    # iteration 1 is logged (Megatron logs a run's first iteration), iteration 2's line never is
    log = parse_megatron_log(out)["train"]
    assert sorted(log) == [1], out[-4000:]
    assert {"lm loss", "gem loss", "entropy"} <= set(log[1])  # the GEM run's statistics
