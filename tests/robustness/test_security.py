"""Security: pickle refused by default (and never unpickled), no remote code, hub ids validated,
and nothing in a config, plan, selection or checkpoint can make warmstart write outside --out."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from _robustness import assert_user_error, write_mc
from safetensors.torch import load_file, save_file

SRC = Path(__file__).resolve().parents[2] / "src" / "warmstart"


# -- pickle -----------------------------------------------------------------------------------------
class _Boom:
    """Unpickling this writes a sentinel file: proof that pickle data was executed."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.write_text, (Path(self.sentinel), "pwned"))


@pytest.fixture
def pickled(models, tmp_path):
    """A full model and an adapter whose weights are pickle files carrying a payload."""
    sentinel = tmp_path / "PWNED"
    full = tmp_path / "pickled_full"
    shutil.copytree(models / "ft_a", full)
    sd = load_file(full / "model.safetensors")
    (full / "model.safetensors").unlink()
    torch.save({**sd, "boom": _Boom(str(sentinel))}, full / "pytorch_model.bin")
    lora = tmp_path / "pickled_lora"
    shutil.copytree(models / "lora_a", lora)
    sd = load_file(lora / "adapter_model.safetensors")
    (lora / "adapter_model.safetensors").unlink()
    torch.save({**sd, "boom": _Boom(str(sentinel))}, lora / "adapter_model.bin")
    write_mc(tmp_path / "t.jsonl", 8)
    return full, lora, sentinel


PICKLE_CMDS = {
    "merge": lambda m, f, l, t: ["merge", f, m / "ft_b", "--out", t / "out"],
    "merge-lora": lambda m, f, l, t: ["merge", l, m / "lora_b", "--out", t / "out"],
    "transfer": lambda m, f, l, t: ["transfer", "--base-old", m / "base", "--finetuned", f, "--base-new",
                                    m / "ft_b", "--out", t / "out"],
    "finetune": lambda m, f, l, t: ["finetune", "--init", f, "--train", t / "t.jsonl", "--eval", t / "t.jsonl",
                                    "--steps", 1, "--out", t / "out"],
    "finetune-adapter": lambda m, f, l, t: ["finetune", "--init", m / "base", "--adapter", l, "--train",
                                            t / "t.jsonl", "--eval", t / "t.jsonl", "--steps", 1, "--out", t / "out"],
    "optimize": lambda m, f, l, t: ["optimize", f, m / "ft_b", "--base", m / "base", "--target", t / "t.jsonl",
                                    "--budget", 2, "--out", t / "out"],
    "library-add": lambda m, f, l, t: ["library", "add", f, "--library", t / "lib.db"],
}


@pytest.mark.parametrize("name", list(PICKLE_CMDS))
def test_pickle_refused_by_default_and_never_unpickled(cli, models, pickled, tmp_path, name):
    full, lora, sentinel = pickled
    r = cli(*PICKLE_CMDS[name](models, full, lora, tmp_path))
    assert_user_error(r, "pickle", "refused", out=tmp_path / "out")
    assert "--allow-pickle" in r.err or name.startswith(("merge", "finetune"))
    assert not sentinel.exists()


# -- remote code ------------------------------------------------------------------------------------
def test_no_trust_remote_code_true_in_source():
    """Nothing passes trust_remote_code=True (or a variable that could be True without a flag)."""
    hits = [(p.relative_to(SRC), n, line.strip()) for p in SRC.rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"trust_remote_code\s*=\s*(?!False)", line)]
    assert hits == []


def test_custom_modeling_code_is_never_imported(cli, models, tmp_path):
    """A checkpoint whose config points at its own modeling code (auto_map): the code never runs."""
    sentinel = tmp_path / "EXECUTED"
    base = tmp_path / "evil_base"
    shutil.copytree(models / "base", base)
    (base / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n"
                                  "from transformers import LlamaForCausalLM as EvilModel, LlamaConfig as EvilConfig\n")
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((base / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTok", None]}
    (base / "tokenizer_config.json").write_text(json.dumps(tcfg))
    write_mc(tmp_path / "t.jsonl", 8)
    from warmstart.library import Library

    Library(tmp_path / "lib.db").close()
    r = cli("select", "--target", tmp_path / "t.jsonl", "--base", base, "--n", 4, "--library", tmp_path / "lib.db")
    r2 = cli("finetune", "--init", base, "--train", tmp_path / "t.jsonl", "--eval", tmp_path / "t.jsonl",
             "--steps", 1, "--batch-size", 2, "--max-length", 32, "--out", tmp_path / "ft")
    r3 = cli("transfer", "--base-old", models / "base", "--finetuned", models / "ft_a", "--base-new", base,
             "--out", tmp_path / "x")
    assert not sentinel.exists()
    for res in (r, r2, r3):  # either it ran with the built-in class, or it refused in one line
        assert res.code in (0, 1) and "Traceback" not in res.err, res.err[-2000:]


# -- hub ids ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ref", [
    "org/name@../../../etc", "../org/name", "org/../name", "org/name/../../x", "org name/x", "org/-name",
    "org/name@rev;rm -rf ~", "a/b/c",
])
def test_odd_hub_ids_are_refused_in_one_line(cli, models, tmp_path, monkeypatch, ref):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    r = cli("merge", ref, models / "ft_b", "--out", out)
    assert_user_error(r, ref, out=out)
    assert "no such file" in r.err or "hub" in r.err


# -- nothing written outside --out -----------------------------------------------------------------
def snapshot(root: Path, *outs: Path) -> set[str]:
    """Every path under root except the outputs and their temporary siblings."""
    def inside(p: Path, out: Path) -> bool:
        return any(q == out or q.name.startswith(out.name + ".tmp-") for q in (p, *p.parents))

    return {str(p.relative_to(root)) for p in root.rglob("*") if not any(inside(p, o) for o in outs)}


def _with_evil_tensor(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    sd["../../../escaped.weight"] = torch.ones(4)
    sd["/tmp/abs_escaped.weight"] = torch.ones(4)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_tensor_names_cannot_escape_out(cli, models, tmp_path):
    a = _with_evil_tensor(models / "ft_a", tmp_path / "in" / "a")
    b = _with_evil_tensor(models / "ft_b", tmp_path / "in" / "b")
    out = tmp_path / "work" / "merged"
    out.parent.mkdir()
    before = snapshot(tmp_path, out)
    r = cli("merge", a, b, "--shard-size", "8KB", "--out", out)
    assert r.code == 0, r.err
    assert snapshot(tmp_path, out) == before
    assert not Path("/tmp/abs_escaped.weight").exists()
    names = {p.name for p in out.iterdir()}
    assert all(re.fullmatch(r"[\w.-]+", n) for n in names), names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "../../../escaped.weight" in index["weight_map"]  # kept as a tensor name, not a path
    r = cli("transfer", "--base-old", a, "--finetuned", b, "--base-new", a, "--out", tmp_path / "work" / "t")
    assert r.code == 0, r.err
    assert snapshot(tmp_path, out, tmp_path / "work" / "t") == before


@pytest.mark.parametrize("ref", ["../../../..", "/", "/etc", "~", "org/name@../../x", "run/../../lib.db"])
def test_selection_with_odd_refs(cli, models, tmp_path, monkeypatch, ref):
    import yaml

    monkeypatch.chdir(tmp_path)
    sel = tmp_path / "sel.yaml"
    sel.write_text(yaml.safe_dump({"donors": [{"ref": ref, "weight": 0.5}, {"ref": str(models / "ft_b"),
                                                                          "weight": 0.5}],
                                   "metric": "loss", "higher_is_better": False}))
    out = tmp_path / "merged"
    before = snapshot(tmp_path, out)
    r = cli("merge", "--selection", sel, "--out", out)
    assert_user_error(r, out=out)
    assert snapshot(tmp_path, out) == before


def test_plan_cannot_name_an_output(cli, models, tmp_path):
    """A plan has no key that names where to write: `out`, `output`, `name` are unknown keys."""
    for key in ("out", "output_dir", "name"):
        plan = tmp_path / f"plan-{key}.yaml"
        plan.write_text(f"models: [{{ref: {models / 'ft_a'}}}, {{ref: {models / 'ft_b'}}}]\n{key}: ../../evil\n")
        assert_user_error(cli("merge", "--config", plan, "--out", tmp_path / "m"), "unknown key", key,
                          out=tmp_path / "m")
    assert not (tmp_path.parent.parent / "evil").exists()


def test_symlinked_side_files_are_copied_as_files_not_links(cli, models, tmp_path):
    """A config source whose side file is a symlink: the output holds a regular file (the link is not
    reproduced, so later writes into the output cannot follow it out)."""
    a = tmp_path / "a"
    shutil.copytree(models / "ft_a", a)
    outside = tmp_path / "outside.txt"
    outside.write_text("outside")
    os.symlink(outside, a / "notes.txt")
    out = tmp_path / "merged"
    r = cli("merge", a, models / "ft_b", "--out", out)
    assert r.code == 0, r.err
    for p in out.rglob("*"):
        assert not p.is_symlink(), p
    assert outside.read_text() == "outside"


def test_chat_template_names_cannot_escape(cli, models, tmp_path):
    """tokenizer_config.json naming a chat template '../../x': transfer writes the tokenizer only inside out."""
    new = tmp_path / "new"
    shutil.copytree(models / "ft_b", new)
    tc = json.loads((new / "tokenizer_config.json").read_text())
    tc["chat_template"] = [{"name": "default", "template": "{{ 'a' }}"}, {"name": "../../escaped", "template": "x"}]
    (new / "tokenizer_config.json").write_text(json.dumps(tc))
    (new / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "x" / "out"
    out.parent.mkdir()
    before = snapshot(tmp_path, out)
    r = cli("transfer", "--base-old", models / "base", "--finetuned", models / "ft_a", "--base-new", new,
            "--out", out)
    assert r.code in (0, 1) and "Traceback" not in r.err, r.err[-2000:]
    if r.code == 1:
        assert_user_error(r, out=out)
    assert snapshot(tmp_path, out) == before
    assert not list(tmp_path.rglob("escaped*"))


@pytest.mark.parametrize("cmd", [("merge", "{ft_a}", "{ft_b}"), ("run", "--target", "{t}", "--base", "{base}"),
                                 ("bench", "run")])
def test_empty_out_is_refused_not_the_working_directory(cli, models, tmp_path, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    args = [a.format(ft_a=models / "ft_a", ft_b=models / "ft_b", t=tmp_path / "t.jsonl", base=models / "base")
            for a in cmd]
    r = cli(*args, "--out", "")
    assert r.code == 1 and "empty or the working directory" in r.err, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]
