"""Bad input, command by command: one line naming the file and the problem, exit 1, no traceback
(``--debug`` shows one), and nothing written (no output dir, no ``*.tmp-*`` sibling)."""

from __future__ import annotations

import os

import pytest
from _robustness import assert_nothing_written, assert_user_error, build_bad_zoo


@pytest.fixture(scope="module")
def z(models, tmp_path_factory):
    return build_bad_zoo(models, tmp_path_factory.mktemp("bad"))


# -- merge ----------------------------------------------------------------------------------------
# (id, argv after "merge" given the zoo, words the error line must contain)
MERGE = [
    ("missing-path", lambda z: ["/no/such/model", z.ft_b], ["/no/such/model", "no such file"]),
    ("dangling-symlink", lambda z: [z.dangling, z.ft_b], ["dangling", "no such file"]),
    ("not-a-dir", lambda z: [z.a_file, z.ft_b], ["a_file.txt", "not a directory"]),
    ("truncated", lambda z: [z.truncated, z.ft_b], ["truncated/model.safetensors", "truncated"]),
    ("bad-header", lambda z: [z.bad_header, z.ft_b], ["bad_header/model.safetensors", "corrupt"]),
    ("bad-offsets", lambda z: [z.bad_offsets, z.ft_b], ["bad_offsets/model.safetensors", "offsets"]),
    ("config-not-json", lambda z: [z.config_not_json, z.ft_b], ["config_not_json/config.json", "not valid json"]),
    ("config-mismatch", lambda z: [z.config_mismatch, z.ft_b], ["config_mismatch", "config"]),
    ("mixed-arch", lambda z: [z.ft_a, z.other_arch], ["other_arch", "shape"]),
    ("lora-and-full", lambda z: [z.ft_a, z.lora_a], ["cannot mix lora"]),
    ("lora-other-base", lambda z: [z.lora_a, z.lora_other_base], ["base"]),
    ("lora-factors-unequal-rank", lambda z: [z.lora_a, z.lora_b, "--lora-mode", "factors"], ["equal ranks"]),
    ("lora-unknown-peft", lambda z: [z.lora_a, z.lora_ia3], ["lora_ia3/adapter_config.json", "IA3"]),
    ("nan-full", lambda z: [z.nan, z.ft_b], ["nan/model.safetensors", "nan/inf", "up_proj"]),
    ("nan-lora", lambda z: [z.lora_nan, z.lora_b], ["lora_nan/adapter_model.safetensors", "nan/inf"]),
    ("device-cuda", lambda z: [z.ft_a, z.ft_b, "--device", "cuda"], ["cuda"]),
    ("unknown-method", lambda z: [z.ft_a, z.ft_b, "--method", "average"], ["unknown method 'average'"]),
    ("negative-density", lambda z: [z.ft_a, z.ft_b, "--method", "ties", "--base", z.base, "--density", "-0.5"],
     ["density"]),
    ("weights-sum-zero", lambda z: [z.ft_a, z.ft_b, "--weights", "1,-1"], ["sum to zero"]),
    ("weights-count", lambda z: [z.ft_a, z.ft_b, "--weights", "0.3,0.3,0.4"], ["3 numbers for 2 models"]),
    ("bad-dtype", lambda z: [z.ft_a, z.ft_b, "--dtype", "int4"], ["int4"]),
    ("bad-shard-size", lambda z: [z.ft_a, z.ft_b, "--shard-size", "lots"], ["lots"]),
    ("out-inside-input", None, ["overlaps an input"]),
]


@pytest.mark.parametrize("argv,needles", [pytest.param(a, n, id=i) for i, a, n in MERGE])
def test_merge_bad_input(cli, z, tmp_path, argv, needles):
    out = tmp_path / "merged"
    if argv is None:  # out inside an input: copy the input so a mistake could not damage the zoo
        import shutil

        src = tmp_path / "ft_a"
        shutil.copytree(z.ft_a, src)
        out = src / "merged"
        argv = lambda z: [src, z.ft_b]  # noqa: E731
    r = cli("merge", *argv(z), "--out", out)
    assert_user_error(r, *needles, out=out)


PLANS = [
    ("unknown-key", "models: [{ref: A}, {ref: B}]\nmethod: linear\nwieghts: [1, 2]\n", ["unknown key", "wieghts"]),
    ("unknown-model-key", "models: [{ref: A, wieght: 1}, {ref: B}]\n", ["unknown key", "wieght"]),
    ("negative-density", "models: [{ref: A}, {ref: B}]\nmethod: ties\nbase: BASE\nparams: {density: -0.2}\n",
     ["density"]),
    ("per-model-negative-density",
     "models: [{ref: A, params: {density: -1}}, {ref: B}]\nmethod: ties\nbase: BASE\n", ["density"]),
    ("weights-sum-zero", "models: [{ref: A, weight: 0.5}, {ref: B, weight: -0.5}]\nweighting: given\n",
     ["sum to zero"]),
    ("not-yaml", "models: [ref: A\n  - {{{\n", ["not valid YAML"]),
    ("not-a-mapping", "- A\n- B\n", ["mapping"]),
    ("empty-models", "models: []\n", ["model"]),
]


@pytest.mark.parametrize("text,needles", [pytest.param(t, n, id=i) for i, t, n in PLANS])
def test_merge_bad_plan(cli, z, tmp_path, text, needles):
    plan = tmp_path / "plan.yaml"
    plan.write_text(text.replace("BASE", str(z.base)).replace("A", str(z.ft_a)).replace("B", str(z.ft_b))
                    if "ref" in text else text)
    out = tmp_path / "merged"
    r = cli("merge", "--config", plan, "--out", out)
    assert_user_error(r, "plan.yaml", *needles, out=out)


def test_merge_missing_plan_and_selection(cli, tmp_path):
    out = tmp_path / "merged"
    assert_user_error(cli("merge", "--config", tmp_path / "nope.yaml", "--out", out), "nope.yaml", "not found",
                      out=out)
    assert_user_error(cli("merge", "--selection", tmp_path / "nope.yaml", "--out", out), "nope.yaml", out=out)


def test_merge_adapters_with_different_targets_says_how(cli, z, tmp_path):
    """Not an error: a module an adapter lacks counts as ΔW = 0, and the merge says so."""
    import json

    out = tmp_path / "merged"
    r = cli("merge", z.lora_a, z.lora_kv, "--out", out)
    assert r.code == 0, r.err
    assert "target different modules" in " ".join(r.err.split())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_merge_adapters_whose_base_was_copied(cli, z, tmp_path):
    """Adapters record their base as a path; the same weights elsewhere (a copied or converted base, a hub
    id vs a local dir) are the same base. `select` accepts them, so `merge --base` (and `run`) must too."""
    import shutil

    base = tmp_path / "base_copy"
    shutil.copytree(z.base, base)
    r = cli("merge", z.lora_a, z.lora_b, "--base", base, "--out", tmp_path / "ok")
    assert r.code == 0, r.err
    out = tmp_path / "bad"
    assert_user_error(cli("merge", z.lora_a, z.lora_b, "--base", z.base2, "--out", out), "trained on", out=out)


def test_merge_nonfinite_allowed_with_flag(cli, z, tmp_path):
    """The NaN check is what refuses the merge above, and the flag turns exactly that check off."""
    out = tmp_path / "merged"
    r = cli("merge", z.nan, z.ft_b, "--out", out, "--allow-nonfinite")
    assert r.code == 0, r.err
    from safetensors.torch import load_file

    merged = load_file(out / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    assert merged[0, 0].isnan() and merged[0, 1].isinf()


def test_debug_shows_traceback(cli, z, tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_DEBUG", "")  # --debug sets it for the process; undone at teardown
    out = tmp_path / "merged"
    with pytest.raises(Exception, match="truncated"):
        cli("--debug", "merge", z.truncated, z.ft_b, "--out", out)
    assert_nothing_written(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode")
def test_unreadable_checkpoint(cli, z, tmp_path):
    import shutil

    d = tmp_path / "locked"
    shutil.copytree(z.ft_a, d)
    os.chmod(d, 0)
    try:
        assert_user_error(cli("merge", d, z.ft_b, "--out", tmp_path / "m"), "locked", "not readable",
                          out=tmp_path / "m")
    finally:
        os.chmod(d, 0o755)


def test_unreadable_weights_file(cli, z, tmp_path, monkeypatch):
    """A weights file that cannot be opened (EACCES, simulated so the test also runs as root)."""
    import shutil

    d = tmp_path / "eacces"
    shutil.copytree(z.ft_a, d)
    real_open = os.open  # inputs are opened through warmstart._io.open_regular (os.open, regular files only)

    def fake_open(p, *a, **k):
        if str(p).endswith("eacces/model.safetensors"):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    assert_user_error(cli("merge", d, z.ft_b, "--out", tmp_path / "m"), "eacces/model.safetensors",
                      "permission denied", out=tmp_path / "m")


# -- transfer ---------------------------------------------------------------------------------------
TRANSFER = [
    ("missing-base-old", lambda z: ["/no/such/base", z.ft_a, z.ft_b], ["/no/such/base", "no such file"]),
    ("truncated-finetuned", lambda z: [z.base, z.truncated, z.ft_b], ["truncated/model.safetensors", "truncated"]),
    ("bad-header-new", lambda z: [z.base, z.ft_a, z.bad_header], ["bad_header/model.safetensors", "corrupt"]),
    ("config-not-json", lambda z: [z.base, z.config_not_json, z.ft_b], ["config.json", "not valid json"]),
    ("config-mismatch", lambda z: [z.base, z.config_mismatch, z.ft_b], ["config_mismatch", "config"]),
    ("adapter-as-base", lambda z: [z.lora_a, z.ft_a, z.ft_b], ["lora_a", "not a lora adapter"]),
    ("lora-unknown-peft", lambda z: [z.base, z.lora_ia3, z.ft_b], ["IA3"]),
    ("nan-finetuned", lambda z: [z.base, z.nan, z.ft_b], ["nan/model.safetensors", "nan/inf"]),
    ("nan-lora", lambda z: [z.base, z.lora_nan, z.ft_b], ["lora_nan/adapter_model.safetensors", "nan/inf"]),
]


@pytest.mark.parametrize("refs,needles", [pytest.param(a, n, id=i) for i, a, n in TRANSFER])
def test_transfer_bad_input(cli, z, tmp_path, refs, needles):
    old, ft, new = refs(z)
    out = tmp_path / "moved"
    r = cli("transfer", "--base-old", old, "--finetuned", ft, "--base-new", new, "--out", out)
    assert_user_error(r, *needles, out=out)


def test_transfer_adapter_naming_another_base_warns(cli, z, tmp_path):
    """Same shapes, another base recorded: paths move, so transfer warns (naming both) rather than refuses."""
    out = tmp_path / "moved"
    r = cli("transfer", "--base-old", z.base, "--finetuned", z.lora_other_base, "--base-new", z.ft_b, "--out", out)
    assert r.code == 0, r.err
    flat = " ".join(r.err.split())
    assert "warning: the adapter names" in flat and "base2" in flat


@pytest.mark.parametrize("extra,needles", [
    (["--alpha", "nan"], ["alpha"]),
    (["--dtype", "int4"], ["int4"]),
    (["--compute-dtype", "float16"], ["float16"]),
    (["--shard-size", "lots"], ["lots"]),
    (["--max-shard-size", "lots"], ["lots"]),  # the deprecated alias
])
def test_transfer_bad_flags(cli, z, tmp_path, extra, needles):
    out = tmp_path / "moved"
    r = cli("transfer", "--base-old", z.base, "--finetuned", z.ft_a, "--base-new", z.ft_b, "--out", out, *extra)
    assert_user_error(r, *needles, out=out)


def test_transfer_out_inside_input_and_nonfinite_flag(cli, z, tmp_path):
    import shutil

    new = tmp_path / "new"
    shutil.copytree(z.ft_b, new)
    r = cli("transfer", "--base-old", z.base, "--finetuned", z.ft_a, "--base-new", new, "--out", new / "x")
    assert_user_error(r, "overlaps an input", out=new / "x")
    out = tmp_path / "moved"
    r = cli("transfer", "--base-old", z.base, "--finetuned", z.nan, "--base-new", new, "--out", out,
            "--allow-nonfinite")
    assert r.code == 0, r.err
    assert (out / "model.safetensors").exists()


# -- select -----------------------------------------------------------------------------------------
SELECT = [
    ("missing-target", lambda z, t: ["--target", t / "nope.jsonl", "--base", z.base], ["nope.jsonl", "no such file"]),
    ("empty-target", lambda z, t: ["--target", z.empty, "--base", z.base], ["empty.jsonl", "empty"]),
    ("malformed-target", lambda z, t: ["--target", z.malformed, "--base", z.base], ["malformed.jsonl", "line 2"]),
    ("mislabeled-target", lambda z, t: ["--target", z.mislabeled, "--base", z.base], ["mislabeled.jsonl", "Lyon"]),
    ("unknown-format", lambda z, t: ["--target", z.unknown_format, "--base", z.base], ["unknown_format.jsonl"]),
    ("not-utf8", lambda z, t: ["--target", z.binary, "--base", z.base], ["binary.jsonl", "utf-8"]),
    ("missing-base", lambda z, t: ["--target", z.train, "--base", t / "nobase"], ["nobase", "no such file"]),
    ("adapter-as-base", lambda z, t: ["--target", z.train, "--base", z.lora_a], ["lora_a", "adapter"]),
    ("truncated-base", lambda z, t: ["--target", z.train, "--base", z.truncated], ["truncated", "truncated"]),
    ("bad-metric", lambda z, t: ["--target", z.train, "--base", z.base, "--metric", "bleu"], ["bleu"]),
    ("corrupt-library", lambda z, t: ["--target", z.train, "--base", z.base, "--library", z.a_file],
     ["a_file.txt"]),
]


@pytest.mark.parametrize("argv,needles", [pytest.param(a, n, id=i) for i, a, n in SELECT])
def test_select_bad_input(cli, z, tmp_path, argv, needles):
    from warmstart.library import Library

    lib = tmp_path / "lib.db"
    with Library(lib) as L:
        L.add(z.lora_a)
    out = tmp_path / "sel.yaml"
    args = argv(z, tmp_path)
    if "--library" not in args:
        args += ["--library", lib]
    r = cli("select", *args, "--n", 4, "--out", out)
    assert_user_error(r, *needles, out=out)


@pytest.mark.parametrize("bad", ["lora_nan", "nan"])
def test_select_candidate_with_nan_weights(cli, z, tmp_path, bad):
    """One broken checkpoint in the library: select names it in one line (it used to crash storing a NaN score)."""
    from warmstart.library import Library

    lib = tmp_path / "lib.db"
    with Library(lib) as L:
        L.add(z.lora_a)
        L.add(getattr(z, bad))
    out = tmp_path / "sel.yaml"
    r = cli("select", "--target", z.train, "--base", z.base, "--n", 4, "--library", lib, "--out", out)
    assert_user_error(r, bad, "nan", out=out)


def test_select_non_float_dtype(cli, z, tmp_path):
    out = tmp_path / "sel.yaml"
    r = cli("select", "--target", z.train, "--base", z.base, "--dtype", "int4", "--n", 4,
            "--library", tmp_path / "lib.db", "--out", out)
    assert_user_error(r, "int4", out=out)


# -- finetune ---------------------------------------------------------------------------------------
FINETUNE = [
    ("missing-init", lambda z, t: ["--init", t / "noinit", "--train", z.train, "--eval", z.eval], ["noinit"]),
    ("truncated-init", lambda z, t: ["--init", z.truncated, "--train", z.train, "--eval", z.eval],
     ["truncated/model.safetensors", "truncated"]),
    ("config-not-json", lambda z, t: ["--init", z.config_not_json, "--train", z.train, "--eval", z.eval],
     ["config_not_json/config.json"]),
    ("nan-init", lambda z, t: ["--init", z.nan, "--train", z.train, "--eval", z.eval], ["nan", "nan/inf"]),
    ("nan-adapter", lambda z, t: ["--init", z.base, "--adapter", z.lora_nan, "--train", z.train, "--eval", z.eval],
     ["lora_nan", "nan/inf"]),
    ("missing-train", lambda z, t: ["--init", z.base, "--train", t / "nope.jsonl", "--eval", z.eval],
     ["nope.jsonl"]),
    ("empty-eval", lambda z, t: ["--init", z.base, "--train", z.train, "--eval", z.empty], ["empty.jsonl", "empty"]),
    ("malformed-train", lambda z, t: ["--init", z.base, "--train", z.malformed, "--eval", z.eval],
     ["malformed.jsonl", "line 2"]),
    ("mislabeled-eval", lambda z, t: ["--init", z.base, "--train", z.train, "--eval", z.mislabeled],
     ["mislabeled.jsonl", "Lyon"]),
    ("adapter-other-arch", lambda z, t: ["--init", z.other_arch, "--adapter", z.lora_a, "--train", z.train,
                                         "--eval", z.eval], ["lora_a", "the base weight is [48, 48]"]),
    ("adapter-unknown-peft", lambda z, t: ["--init", z.base, "--adapter", z.lora_ia3, "--train", z.train,
                                           "--eval", z.eval], ["lora_ia3", "IA3"]),
    ("bad-precision", lambda z, t: ["--init", z.base, "--train", z.train, "--eval", z.eval,
                                    "--precision", "fp8"], ["fp8"]),
    ("bad-lora-targets", lambda z, t: ["--init", z.base, "--train", z.train, "--eval", z.eval,
                                       "--lora-targets", "nonexistent_proj"], ["nonexistent_proj"]),
    ("bad-config-key", None, ["train.yaml", "stpes"]),
    ("out-inside-init", "inside", ["overlaps an input"]),
]


@pytest.mark.parametrize("argv,needles", [pytest.param(a, n, id=i) for i, a, n in FINETUNE])
def test_finetune_bad_input(cli, z, tmp_path, argv, needles):
    out = tmp_path / "ft"
    if argv is None:
        (tmp_path / "train.yaml").write_text("stpes: 3\n")
        argv = lambda z, t: ["--init", z.base, "--train", z.train, "--eval", z.eval,  # noqa: E731
                             "--config", t / "train.yaml"]
    elif argv == "inside":
        import shutil

        shutil.copytree(z.base, tmp_path / "base")
        out = tmp_path / "base" / "ft"
        argv = lambda z, t: ["--init", t / "base", "--train", z.train, "--eval", z.eval]  # noqa: E731
    r = cli("finetune", *argv(z, tmp_path), "--steps", 2, "--batch-size", 2, "--max-length", 32, "--out", out)
    assert_user_error(r, *needles, out=out)


# -- run --------------------------------------------------------------------------------------------
RUN = [
    ("missing-target", lambda z, t: ["--target", t / "nope.jsonl", "--base", z.base], ["nope.jsonl", "not found"]),
    ("empty-target", lambda z, t: ["--target", z.empty, "--base", z.base], ["empty.jsonl", "empty"]),
    ("malformed-target", lambda z, t: ["--target", z.malformed, "--base", z.base], ["malformed.jsonl"]),
    ("missing-base", lambda z, t: ["--target", z.train, "--base", t / "nobase"], ["nobase"]),
    ("bad-config", lambda z, t: ["--target", z.train, "--base", z.base, "--config", z.a_file], ["a_file.txt"]),
    ("corrupt-library", lambda z, t: ["--target", z.train, "--base", z.base, "--library", z.a_file],
     ["a_file.txt"]),
]


@pytest.mark.parametrize("argv,needles", [pytest.param(a, n, id=i) for i, a, n in RUN])
def test_run_bad_input(cli, z, tmp_path, argv, needles):
    from warmstart.library import Library

    lib = tmp_path / "lib.db"
    Library(lib).close()
    args = argv(z, tmp_path)
    if "--library" not in args:
        args += ["--library", lib]
    out = tmp_path / "run"
    r = cli("run", *args, "--steps", 2, "--out", out)
    assert_user_error(r, *needles)
    # the run dir may be claimed (run.json) for resuming, but no stage finished or half-written
    assert not out.exists() or not any((out / s).exists() for s in ("select", "merge", "warm", "baseline"))


# -- optimize ---------------------------------------------------------------------------------------
OPTIMIZE = [
    ("missing-model", lambda z, t: ["/no/such/model", z.ft_b, "--base", z.base, "--target", z.train],
     ["/no/such/model"]),
    ("mixed-arch", lambda z, t: [z.ft_a, z.other_arch, "--base", z.base, "--target", z.train], ["other_arch"]),
    ("lora-other-base", lambda z, t: [z.lora_a, z.lora_other_base, "--base", z.base, "--target", z.train],
     ["different bases", "base2"]),
    ("nan-model", lambda z, t: [z.nan, z.ft_b, "--base", z.base, "--target", z.train], ["nan", "nan/inf"]),
    ("nan-lora", lambda z, t: [z.lora_nan, z.lora_b, "--base", z.base, "--target", z.train], ["lora_nan", "nan"]),
    ("empty-target", lambda z, t: [z.ft_a, z.ft_b, "--base", z.base, "--target", z.empty], ["empty.jsonl"]),
    ("budget", lambda z, t: [z.ft_a, z.ft_b, "--base", z.base, "--target", z.train, "--budget", 1], ["budget"]),
    ("malformed-target", lambda z, t: [z.ft_a, z.ft_b, "--base", z.base, "--target", z.malformed],
     ["malformed.jsonl", "line 2"]),
]


@pytest.mark.parametrize("argv,needles", [pytest.param(a, n, id=i) for i, a, n in OPTIMIZE])
def test_optimize_bad_input(cli, z, tmp_path, argv, needles):
    out = tmp_path / "opt"
    args = argv(z, tmp_path)
    if "--budget" not in args:
        args += ["--budget", 2]
    r = cli("optimize", *args, "--sample", 4, "--out", out)
    assert_user_error(r, *needles, out=out)


# -- library and bench ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needles", [
    pytest.param(lambda z, t: ["library", "add", t / "nope"], ["nope", "no such file"], id="library-add-missing"),
    pytest.param(lambda z, t: ["library", "add", z.truncated], ["truncated", "truncated"], id="library-add-truncated"),
    pytest.param(lambda z, t: ["library", "scan", z.a_file], ["a_file.txt", "not a directory"], id="library-scan-file"),
    pytest.param(lambda z, t: ["library", "list", "--library", z.a_file], ["a_file.txt"], id="library-not-sqlite"),
    pytest.param(lambda z, t: ["bench", "tasks", "--out", t / "b", "--task", "klingon"], ["klingon"],
                 id="bench-unknown-task"),
    pytest.param(lambda z, t: ["bench", "results", "--out", t / "nobench"], ["nobench"], id="bench-results-missing"),
    pytest.param(lambda z, t: ["bench", "results", "--out", z.base], ["base/bench.json", "not found"],
                 id="bench-results-not-a-bench"),
])
def test_library_and_bench_bad_input(cli, z, tmp_path, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    r = cli(*argv(z, tmp_path))
    assert_user_error(r, *needles)


@pytest.mark.parametrize("damage", ["newer-schema", "locked"])
@pytest.mark.parametrize("command", ["library-list", "library-add", "select"])
def test_damaged_or_busy_library(cli, z, tmp_path, monkeypatch, damage, command):
    import sqlite3

    from warmstart.library import Library

    lib = tmp_path / "lib.db"
    Library(lib).close()
    holder = sqlite3.connect(lib, isolation_level=None)
    if damage == "newer-schema":
        holder.execute("INSERT INTO schema_migrations VALUES (99, 'm099_future', 0)")
    else:
        monkeypatch.setenv("WARMSTART_DB_TIMEOUT", "0.3")
        holder.execute("BEGIN EXCLUSIVE")  # another process mid-write
    argv = {"library-list": ["library", "list"], "library-add": ["library", "add", z.lora_a],
            "select": ["select", "--target", z.train, "--base", z.base, "--n", 4, "--out", tmp_path / "sel.yaml"]}
    try:
        r = cli(*argv[command], "--library", lib)
    finally:
        if damage == "locked":
            holder.execute("ROLLBACK")
        holder.close()
    assert_user_error(r, "lib.db", "upgrade warmstart" if damage == "newer-schema" else "locked",
                      out=tmp_path / "sel.yaml")
