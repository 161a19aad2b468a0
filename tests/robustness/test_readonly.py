"""Inputs are only ever read: after each command every input file has the same bytes, size, mode and
mtime, and no file or directory appeared or vanished in the input tree."""

from __future__ import annotations

import shutil

import pytest
from _robustness import tree_state, write_mc, make_lib


@pytest.fixture
def inputs(models, tmp_path):
    """A private copy of the zoo plus datasets; the library and outputs live outside it."""
    root = tmp_path / "inputs"
    for name in ("base", "ft_a", "ft_b", "lora_a", "lora_b", "run_lora", "base_sharded"):
        shutil.copytree(models / name, root / name)
    write_mc(root / "train.jsonl", 12, 0)
    write_mc(root / "eval.jsonl", 8, 1)
    return root


FAST_TRAIN = ["--steps", 2, "--batch-size", 4, "--eval-every", 2, "--max-length", 48]

COMMANDS = {
    "library-scan": lambda i, t: ["library", "scan", i, "--library", t / "lib.db"],
    "select": lambda i, t: ["select", "--target", i / "train.jsonl", "--base", i / "base", "--n", 4,
                            "--library", make_lib(t, i / "ft_a", i / "lora_a"), "--out", t / "sel.yaml"],
    "merge-full-ties": lambda i, t: ["merge", i / "ft_a", i / "ft_b", "--method", "ties", "--base", i / "base",
                                     "--density", "0.5", "--out", t / "m"],
    "merge-sharded-linear": lambda i, t: ["merge", i / "ft_a", i / "ft_b", "--base", i / "base_sharded",
                                          "--include-base", "--out", t / "m"],
    "merge-lora-svd": lambda i, t: ["merge", i / "lora_a", i / "lora_b", "--lora-mode", "svd", "--rank", 4,
                                    "--out", t / "m"],
    "merge-run-checkpoints": lambda i, t: ["merge", *sorted((i / "run_lora").glob("checkpoint-*")),
                                           "--weights", "mwa:loss", "--out", t / "m"],
    "transfer-full": lambda i, t: ["transfer", "--base-old", i / "base", "--finetuned", i / "ft_a",
                                   "--base-new", i / "ft_b", "--out", t / "x"],
    "transfer-lora": lambda i, t: ["transfer", "--base-old", i / "base", "--finetuned", i / "lora_a",
                                   "--base-new", i / "ft_b", "--out", t / "x"],
    "finetune-adapter": lambda i, t: ["finetune", "--init", i / "base", "--adapter", i / "lora_a",
                                      "--train", i / "train.jsonl", "--eval", i / "eval.jsonl", *FAST_TRAIN,
                                      "--out", t / "ft"],
    "optimize-lora": lambda i, t: ["optimize", i / "lora_a", i / "lora_b", "--base", i / "base",
                                   "--target", i / "eval.jsonl", "--budget", 2, "--sample", 4, "--out", t / "o"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_inputs_byte_identical_after(cli, inputs, tmp_path, name):
    argv = COMMANDS[name](inputs, tmp_path)
    before = tree_state(inputs)
    r = cli(*argv)
    assert r.code == 0, r.err[-3000:]
    after = tree_state(inputs)
    assert after.keys() == before.keys(), sorted(set(after) ^ set(before))
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, changed


def test_run_leaves_inputs_byte_identical(cli, inputs, tmp_path):
    lib = make_lib(tmp_path, inputs / "lora_a", inputs / "lora_b")
    before = tree_state(inputs)
    r = cli("run", "--target", inputs / "train.jsonl", "--library", lib, "--base", inputs / "base",
            "--k", 1, "--no-baseline", *FAST_TRAIN[:6], "--out", tmp_path / "run")
    assert r.code == 0, r.err[-3000:]
    assert tree_state(inputs) == before


def test_failed_command_leaves_inputs_byte_identical(cli, inputs, tmp_path):
    """Refused commands (output inside an input, --force onto an input) touch nothing either."""
    before = tree_state(inputs)
    r = cli("merge", inputs / "ft_a", inputs / "ft_b", "--out", inputs / "ft_a" / "nested")
    assert r.code == 1 and "overlaps an input" in r.err
    r = cli("merge", inputs / "ft_a", inputs / "ft_b", "--out", inputs / "ft_b", "--force")
    assert r.code == 1 and "overlaps an input" in r.err
    r = cli("transfer", "--base-old", inputs / "base", "--finetuned", inputs / "ft_a", "--base-new",
            inputs / "ft_b", "--out", inputs / "base", "--force")
    assert r.code == 1 and "overlaps an input" in r.err
    assert tree_state(inputs) == before
