"""Conversion inputs (issue 11): the right model or a named one-line error, never a silently
wrong one. Tiny models and helpers from tests/convert/test_convert.py; the worker spawns are grouped
(one qwen2 import + export, one Llama-3 import at TP=2 and two one-iteration training runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from megatron_gem.convert import (
    arch_from_hf_config,
    hf_to_megatron,
    megatron_to_hf,
    read_megatron_args,
)
from megatron_gem.convert.api import _export_token_ids, check_export_vocab, recorded_vocab
from megatron_gem.convert.checkpoints import IMPORT_RECORD, read_import_record
from megatron_gem.convert.hf_files import SafetensorsReader, read_hf_config, untie_if_head_differs
from test_convert import (
    check_reloaded_logits,
    hf_logits,
    llama_cfg,
    qwen2_cfg,
    random_hf_state,
    sample_tokens,
)

REPO = Path(__file__).resolve().parents[2]


def listing(*roots) -> dict:
    """path -> sha256 of every file under ``roots``."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for r in roots
        for p in sorted(Path(r).rglob("*"))
        if p.is_file()
    }


def cli(*argv) -> tuple[int, str]:
    """tools/convert_checkpoint.py in a fresh process: (exit status, stderr)."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    p = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return p.returncode, p.stderr


def assert_one_line_error(code, err, *words):
    assert code != 0 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("convert_checkpoint.py: error: "), err
    for w in words:
        assert w in last, (w, last)


# --------------------------------------------------------------------------------------------
# (3) broken files: one line naming the file, what to do
# --------------------------------------------------------------------------------------------


def test_broken_config_json_and_safetensors_are_named_errors(tmp_path):
    hf = tmp_path / "hf"
    random_hf_state(llama_cfg(8.0), 0).save_pretrained(str(hf))
    out = tmp_path / "out"
    good_cfg = (hf / "config.json").read_text()
    # truncated config.json: line and column of the JSONDecodeError
    cut = good_cfg[: good_cfg.index('"hidden_size"') + 15]
    (hf / "config.json").write_text(cut)
    line = cut.count("\n") + 1
    with pytest.raises(ValueError) as e:
        hf_to_megatron(hf, out)
    msg = str(e.value)
    assert f"{hf / 'config.json'}: invalid JSON at line {line} column" in msg
    assert "restore or re-download" in msg and "\n" not in msg
    code, err = cli("hf-to-megatron", "--hf", str(hf), "--out", str(out))
    assert_one_line_error(code, err, str(hf / "config.json"), f"line {line} column")
    (hf / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an object"):
        read_hf_config(hf)

    # truncated single-file safetensors (an interrupted download)
    (hf / "config.json").write_text(good_cfg)
    st = hf / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ValueError) as e:
        hf_to_megatron(hf, out)
    assert f"{st}: cannot be read as safetensors" in str(e.value)
    assert "truncated" in str(e.value) and "download or save it again" in str(e.value)
    code, err = cli("hf-to-megatron", "--hf", str(hf), "--out", str(out))
    assert_one_line_error(code, err, str(st), "truncated")

    # sharded: a truncated shard, a missing shard, a truncated index
    st.unlink()
    random_hf_state(llama_cfg(8.0), 0).save_pretrained(str(hf), max_shard_size="100KB")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not st.exists()
    last = hf / shards[-1]
    last.write_bytes(last.read_bytes()[:50])
    with pytest.raises(ValueError, match=f"{last}: cannot be read as safetensors"):
        hf_to_megatron(hf, out)
    last.unlink()
    with pytest.raises(ValueError, match=f"{last}: cannot be read as safetensors.*missing"):
        hf_to_megatron(hf, out)
    ix = hf / "model.safetensors.index.json"
    ix.write_text(ix.read_text()[:200])
    with pytest.raises(ValueError, match=f"{ix}: invalid JSON at line"):
        hf_to_megatron(hf, out)
    before = listing(hf)
    code, err = cli("hf-to-megatron", "--hf", str(hf), "--out", str(out))
    assert_one_line_error(code, err, str(ix), "invalid JSON at line")
    assert listing(hf) == before and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary leftovers


# --------------------------------------------------------------------------------------------
# (2) tied config, distinct lm_head.weight: convert what transformers loads (untied)
# --------------------------------------------------------------------------------------------


def test_untie_if_head_differs_follows_transformers(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    random_hf_state(qwen2_cfg(), 1).save_pretrained(str(tmp_path))
    arch = arch_from_hf_config(read_hf_config(tmp_path))
    assert arch.tie_word_embeddings
    st = tmp_path / "model.safetensors"
    sd = load_file(str(st))
    assert "lm_head.weight" not in sd
    assert untie_if_head_differs(SafetensorsReader(tmp_path), arch) == arch
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # present, equal: still tied
    save_file(sd, str(st), metadata={"format": "pt"})
    assert untie_if_head_differs(SafetensorsReader(tmp_path), arch, rows_per_read=10) == arch
    sd["lm_head.weight"][150] += 1.0  # differs in the last block of rows only
    save_file(sd, str(st), metadata={"format": "pt"})
    untied = untie_if_head_differs(SafetensorsReader(tmp_path), arch, rows_per_read=10)
    assert untied == dataclasses.replace(arch, tie_word_embeddings=False)
    # ... which is what transformers (the installed version) loads
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert torch.equal(m.lm_head.weight, sd["lm_head.weight"])
    assert torch.equal(m.model.embed_tokens.weight, sd["model.embed_tokens.weight"])


# --------------------------------------------------------------------------------------------
# (1) export vocabulary against what the checkpoint records (no worker needed)
# --------------------------------------------------------------------------------------------


def test_check_export_vocab_rules(tmp_path):
    null = NS(
        tokenizer_type="NullTokenizer",
        vocab_size=157,
        padded_vocab_size=256,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
    )
    check_export_vocab(157, "x", null)
    with pytest.raises(
        ValueError,
        match=r"--vocab-size 100: vocabulary size 100 cannot be .*"
        r"padded to 256 \(make_vocab_size_divisible_by=128 x TP 1\), and 100 "
        r"pads to 128",
    ):
        check_export_vocab(100, "--vocab-size 100", null)
    with pytest.raises(ValueError, match="cannot be this checkpoint's.*300 pads to 384"):
        check_export_vocab(300, "--vocab-size 300", null)
    with pytest.raises(
        ValueError,
        match=r"vocabulary size 150, but the checkpoint records 157 "
        r"\(its NullTokenizer --vocab-size\).*pass --vocab-size 157",
    ):
        check_export_vocab(150, "--vocab-size 150", null)
    # converted at TP=2 (padded 512), fine-tuned at TP=1 with --use-checkpoint-args (padded
    # kept): the import record's layout explains the padding
    moved = NS(
        tokenizer_type="NullTokenizer",
        vocab_size=300,
        padded_vocab_size=512,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
    )
    with pytest.raises(ValueError, match="300 pads to 384"):
        check_export_vocab(300, "x", moved)
    check_export_vocab(
        300,
        "x",
        moved,
        {
            "padded_vocab_size": 512,
            "vocab_size": 300,
            "make_vocab_size_divisible_by": 128,
            "tensor_model_parallel_size": 2,
        },
    )
    # an HF tokenizer directory without config.json records only a lower bound (its length)
    tok = tmp_path / "tok"
    tok.mkdir()
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(140)}, unk_token="t0")).save(
        str(tok / "tokenizer.json")
    )
    (tok / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})
    )
    hf_tok = NS(
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(tok),
        vocab_size=None,
        padded_vocab_size=256,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
    )
    assert recorded_vocab(hf_tok)[:2] == (140, False)
    check_export_vocab(157, "x", hf_tok)
    with pytest.raises(ValueError, match=f"records 140 \\(its tokenizer {tok} \\(length\\)\\)"):
        check_export_vocab(139, "--vocab-size 139", hf_tok)


# --------------------------------------------------------------------------------------------
# end to end: (2) (4) (5) and (1) on a real checkpoint; (6) (7) on a Llama-3 one
# --------------------------------------------------------------------------------------------


def test_qwen2_head_dim_tied_distinct_head_token_ids_round_trip(tmp_path):
    """Qwen2 with an explicit head_dim (16, not hidden/heads = 10), a config that ties the
    embeddings but a distinct lm_head.weight, and bos/eos ids, without tokenizer files:
    HF -> Megatron (reloaded logits = transformers' on the original) -> HF without
    --tokenizer (logits = transformers' on the original; head_dim, untied, bos/eos kept in
    config.json and generation_config.json). Then wrong export vocabularies are refused."""
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    cfg = qwen2_cfg(head_dim=16, bos_token_id=5, eos_token_id=7)
    random_hf_state(cfg, 21).save_pretrained(str(hf))
    sd = load_file(str(hf / "model.safetensors"))
    torch.manual_seed(0)
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"]) * 0.2
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    tokens = sample_tokens(157)
    ref = hf_logits(hf, tokens)  # transformers: untied, both tensors used

    ckpt = tmp_path / "ckpt"
    flags = hf_to_megatron(
        hf,
        ckpt,
        tp=1,
        make_vocab_size_divisible_by=64,
        after_save=partial(check_reloaded_logits, ref=ref),
    )
    assert "--untie-embeddings-and-output-weights" in flags and "--kv-channels" in flags
    record = json.loads((ckpt / IMPORT_RECORD).read_text())
    assert (
        record["vocab_size"],
        record["padded_vocab_size"],
        record["bos_token_id"],
        record["eos_token_id"],
    ) == (157, 192, 5, 7)
    saved = read_megatron_args(ckpt / "release")  # the export checks against these
    assert (saved.make_vocab_size_divisible_by, saved.padded_vocab_size) == (64, 192)

    out = tmp_path / "back"
    megatron_to_hf(ckpt, out)
    got = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert got["head_dim"] == 16 and got["tie_word_embeddings"] is False
    assert (got["bos_token_id"], got["eos_token_id"]) == (5, 7)
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (5, 7)
    back = load_file(str(out / "model.safetensors"))
    assert torch.equal(back["lm_head.weight"], sd["lm_head.weight"])
    diff = (hf_logits(out, tokens) - ref).abs().max().item()
    print(f"[test] exported vs original transformers logits: max |diff| = {diff:.3g}")
    assert diff <= 1e-5, diff

    # (1) vocabularies this checkpoint (NullTokenizer 157, padded 192 = 64 x TP 1) cannot hold
    inputs = listing(ckpt, hf)
    dest = tmp_path / "refused"
    for kw, words in (
        (
            {"vocab_size": 100},
            "--vocab-size 100: vocabulary size 100 cannot be this "
            r"checkpoint's: its vocabulary is padded to 192 \(make_vocab_size_divisible_by=64 "
            r"x TP 1\), and 100 pads to 128",
        ),
        ({"vocab_size": 150}, "vocabulary size 150, but the checkpoint records 157"),
        ({"vocab_size": 300}, "300 pads to 320"),
    ):
        with pytest.raises(ValueError, match=words):
            megatron_to_hf(ckpt, dest, **kw)
    other = tmp_path / "other_tok"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"vocab_size": 180}))
    with pytest.raises(
        ValueError,
        match=f"--tokenizer {other}: vocabulary size 180, but the checkpoint records 157",
    ):
        megatron_to_hf(ckpt, dest, tokenizer_dir=other)
    (other / "config.json").write_text('{"vocab_size": 180,')
    with pytest.raises(ValueError, match=f"{other / 'config.json'}: invalid JSON at line 1"):
        megatron_to_hf(ckpt, dest, tokenizer_dir=other)
    code, err = cli(
        "megatron-to-hf", "--load", str(ckpt), "--out", str(dest), "--vocab-size", "150"
    )
    assert_one_line_error(code, err, "vocabulary size 150", "records 157", "--vocab-size 157")
    assert listing(ckpt, hf) == inputs and not dest.exists()


def _train_once(ckpt, flags, tp):
    from conftest import parse_megatron_log, run_train

    out = run_train(
        tp,
        flags
        + [
            "--tensor-model-parallel-size",
            str(tp),
            "--finetune",
            "--load",
            str(ckpt),
            "--train-iters",
            "1",
            "--loss",
            "gem",
            "--gem-beta",
            "0.7",
            "--lr",
            "1e-3",
            "--seq-length",
            "16",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "2",
            "--mock-data",
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "203",
            "--log-interval",
            "1",
            "--eval-iters",
            "1",
            "--eval-interval",
            "1000",
            "--num-workers",
            "0",
            "--seed",
            "7",
        ],
    )
    assert "loading release" in out
    return parse_megatron_log(out)["train"][1]


def test_llama3_rope_factor32_and_another_training_tp(tmp_path):
    """(6) A Llama-3-style model with rope factor 32 (Llama 3.2's) converts exactly at TP=2
    (reloaded logits = transformers' within 1e-5); the TP=2 checkpoint fine-tunes at TP=1 with
    the same lm loss, gem loss and entropy to 6 digits as at TP=2.
    (7) The padded vocabulary's zero logits (256 - 203 columns) raise the cross-entropy of the
    converted model over transformers' by mean log(1 + P / sum_j exp z_j)."""
    hf = tmp_path / "hf"
    random_hf_state(llama_cfg(32.0), 31).save_pretrained(str(hf))
    tokens = sample_tokens(203)
    ref = hf_logits(hf, tokens)
    ckpt = tmp_path / "ckpt"
    flags = hf_to_megatron(hf, ckpt, tp=2, after_save=partial(check_reloaded_logits, ref=ref))
    assert flags[flags.index("--rope-scaling-factor") + 1] == "32.0"

    tp2, tp1 = _train_once(ckpt, flags, 2), _train_once(ckpt, flags, 1)
    print(f"[test] iteration 1 at TP=2 {tp2} / at TP=1 {tp1}")
    for key in ("lm loss", "gem loss", "entropy"):
        assert math.isclose(tp1[key], tp2[key], rel_tol=1e-6), (key, tp1[key], tp2[key])

    # (7) cross-entropy over the padded logits (zero for the 53 padded rows, checked by
    # check_reloaded_logits) against transformers' own loss on the same logits
    labels = tokens[:, 1:].reshape(-1)
    z = ref[:, :-1].reshape(-1, 203)
    ce_hf = torch.nn.functional.cross_entropy(z, labels)
    ce_meg = torch.nn.functional.cross_entropy(torch.cat([z, z.new_zeros(len(z), 53)], 1), labels)
    formula = torch.log1p(53 / z.exp().sum(1)).mean()
    print(
        f"[test] CE transformers {ce_hf:.6f}, with Megatron's padded columns {ce_meg:.6f}: "
        f"+{ce_meg - ce_hf:.3g} (formula {formula:.3g})"
    )
    assert ce_meg > ce_hf and torch.isclose(ce_meg - ce_hf, formula, rtol=1e-4)


def test_export_token_ids_and_import_record_lookup(tmp_path):
    """(5) without --tokenizer: the HF tokenizer directory the checkpoint records, else the
    import record of the checkpoint itself or of the one a --finetune run loaded."""
    imported, trained = tmp_path / "imported", tmp_path / "trained"
    imported.mkdir(), trained.mkdir()
    (imported / IMPORT_RECORD).write_text(
        json.dumps(
            {"vocab_size": 157, "bos_token_id": 5, "eos_token_id": [7, 8], "pad_token_id": None}
        )
    )
    null = NS(tokenizer_type="NullTokenizer", vocab_size=157, load=str(imported))
    rec = read_import_record(trained, null)  # found through the saved --load
    assert _export_token_ids(None, null, rec) == {"bos_token_id": 5, "eos_token_id": [7, 8]}
    assert read_import_record(trained, NS(load=str(trained))) == {}
    assert read_import_record(imported, NS()) == rec
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps({"vocab_size": 157, "bos_token_id": 1, "eos_token_id": 2})
    )
    hf_tok = NS(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(hf))
    assert _export_token_ids(None, hf_tok, rec) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    }
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"bos_token_id": 9}))
    assert _export_token_ids(other, hf_tok, rec)["bos_token_id"] == 9  # --tokenizer first
