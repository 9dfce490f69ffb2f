"""megatron_gem.paths: an output that is, contains or lies inside an input is refused."""

import pytest

from megatron_gem.paths import check_output_apart, overlap


def test_overlap_kinds(tmp_path):
    d = tmp_path / "d"
    (d / "model").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    assert overlap(d / "model", d / "model") == "is"
    assert overlap(d, d / "model") == "contains"
    assert overlap(d / "model" / "out", d / "model") == "lies inside"
    assert overlap(tmp_path / "other", d / "model") is None
    assert overlap(tmp_path / "d2", d) is None  # a shared name prefix is not nesting


def test_symlink_and_relative_paths_are_the_same_input(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    assert overlap(tmp_path / "link", tmp_path / "ckpt") == "is"
    monkeypatch.chdir(tmp_path)
    assert overlap("ckpt/../ckpt", tmp_path / "ckpt") == "is"


def test_error_names_both_paths_and_skips_none(tmp_path):
    check_output_apart(tmp_path / "out", [("--load", None), ("--tokenizer", tmp_path / "tok")])
    with pytest.raises(ValueError) as e:
        check_output_apart(tmp_path, [("--load", tmp_path / "ckpt")], output_name="--out")
    msg = str(e.value)
    assert f"--out {tmp_path} contains --load {tmp_path / 'ckpt'}" in msg
    assert "\n" not in msg
