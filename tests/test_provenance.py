"""provenance: the one size parser, the one versions(), the one warmstart.json + model card writer."""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
import tomllib
from pathlib import Path

import pytest

import warmstart
from warmstart import provenance
from warmstart.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
import _card_cases as C  # noqa: E402

BEFORE = json.loads((Path(__file__).parent / "fixtures" / "cards_before_12.json").read_text())
ROOT = Path(__file__).resolve().parents[1]

# -- sizes ---------------------------------------------------------------------------------------------
# decimal units, as transformers' max_shard_size and mergekit: written out, not computed by the parser
SIZES = {"2GB": 2_000_000_000, "500MB": 500_000_000, "1.5GB": 1_500_000_000, "8KB": 8_000, "20kb": 20_000,
         " 2 gb ": 2_000_000_000, "3TB": 3_000_000_000_000, "1KiB": 1_024, "2GiB": 2_147_483_648,
         "4MiB": 4_194_304, "100": 100, "100B": 100, "1e3B": 1_000, 7: 7}


@pytest.mark.parametrize("text,n", list(SIZES.items()))
def test_sizes_are_decimal(text, n):
    assert provenance.parse_size(text) == n


@pytest.mark.parametrize("text", ["lots", "0", "-1GB", "1e400GB", "2G", "", "GB", "1e3"])
def test_bad_sizes_are_one_error(text):
    with pytest.raises(ConfigError) as e:
        provenance.parse_size(text)
    assert repr(text) in str(e.value) and isinstance(e.value, ValueError)  # plan validation collects ValueErrors


def test_merge_plan_uses_the_same_parser():
    from warmstart.merge import plan

    assert plan.parse_size is provenance.parse_size


def test_transfer_shard_size_1mb_writes_shards_of_at_most_a_million_bytes(cli, tmp_path):
    from warmstart import testing
    from warmstart.checkpoints import read_header

    base = testing.make_base(tmp_path / "old", hidden_size=128, intermediate_size=256)  # ~2.6 MB of float32
    new = testing.make_variant(base, tmp_path / "new", seed=1)
    ft = testing.make_variant(base, tmp_path / "ft", seed=2)
    out = tmp_path / "moved"
    r = cli("transfer", "--base-old", base, "--finetuned", ft, "--base-new", new, "--shard-size", "1MB", "--out", out)
    assert r.code == 0, r.err
    shards = sorted(out.glob("model-*.safetensors"))
    sizes = [sum(m.nbytes for m in read_header(f)[0].values()) for f in shards]
    assert len(shards) > 1 and max(sizes) <= 10**6
    assert sizes[0] + next(iter(read_header(shards[1])[0].values())).nbytes > 10**6  # greedy: filled to 10⁶
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(sizes)
    # the old flag is a hidden alias: same shards, and a warning
    old = tmp_path / "moved_old"
    r = cli("transfer", "--base-old", base, "--finetuned", ft, "--base-new", new, "--max-shard-size", "1MB",
            "--out", old)
    assert r.code == 0 and "deprecated" in r.err
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in out.iterdir())
    assert "--max-shard-size" not in cli("transfer", "--help").out


# -- versions ------------------------------------------------------------------------------------------
def test_versions_is_the_union_and_reads_the_installed_versions():
    v = provenance.versions()
    assert {"warmstart", "torch", "transformers", "safetensors", "peft", "python"} <= set(v)
    for pkg in ("torch", "transformers", "safetensors", "peft"):
        assert v[pkg] == md.version(pkg)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert v["warmstart"] == warmstart.__version__ == version


def test_no_module_imports_the_package_root():
    import ast

    for p in (ROOT / "src" / "warmstart").rglob("*.py"):
        if p.name == "__init__.py" and p.parent.name == "warmstart":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                assert all(a.name != "warmstart" for a in node.names), p
            if isinstance(node, ast.ImportFrom):
                depth = len(p.relative_to(ROOT / "src" / "warmstart").parts) - (p.name == "__init__.py")
                root = node.module == "warmstart" or (node.level == depth and node.module is None)
                assert not (root and any(a.name == "__version__" for a in node.names)), p
                assert node.module != "warmstart" or node.level, p


# -- one writer, the same cards as before #12 (tests/fixtures/cards_before_12.json, captured from the
#    code before the change with tests/fixtures/capture_cards_before_12.py) ------------------------
@pytest.mark.parametrize("output", ["lora", "full"])
def test_train_card_unchanged(output):
    from warmstart.train import _model_card

    assert _model_card(C.train_meta(output)) == BEFORE[f"train-{output}"]


@pytest.mark.parametrize("warn", [False, True])
def test_transfer_card_unchanged(warn):
    from warmstart.transfer import _model_card

    assert _model_card(C.transfer_meta(warn)) == BEFORE[f"transfer-{'warn' if warn else 'plain'}"]


@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_merge_card_unchanged(kind, tmp_path, monkeypatch):
    from warmstart.merge import engine

    monkeypatch.setattr(engine, "versions", lambda: dict(C.VERSIONS))
    plan, res = C.merge_case(kind)
    engine.write_card(tmp_path, plan, res, kind=kind)
    assert (tmp_path / "README.md").read_text() == BEFORE[f"merge-{kind}"]
    meta = json.loads((tmp_path / "warmstart.json").read_text())
    assert BEFORE[f"merge-{kind}-meta"].items() <= meta.items()


def test_extract_card_unchanged_and_metadata_richer(tmp_path):
    from warmstart.merge.extract import _write

    cfg, ft, bs, res = C.extract_case()
    _write(tmp_path, {}, cfg, ft, bs, res)
    assert (tmp_path / "README.md").read_text() == BEFORE["extract"]
    meta = json.loads((tmp_path / "warmstart.json").read_text())
    assert BEFORE["extract-meta"].items() <= meta.items() and meta["versions"] == provenance.versions()


def test_write_then_update_an_artefact(tmp_path):
    provenance.write_artefact(tmp_path, {"kind": "x"}, ["# title", "", "body", ""])
    assert (tmp_path / "README.md").read_text() == "# title\n\nbody\n"
    provenance.update_artefact(tmp_path, {"optimize": {"budget": 3}}, "\n## more\n")
    assert (tmp_path / "README.md").read_text() == "# title\n\nbody\n\n## more\n"
    meta = json.loads((tmp_path / "warmstart.json").read_text())
    assert meta == {"kind": "x", "versions": provenance.versions(), "optimize": {"budget": 3}}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_front_matter():
    assert provenance.front_matter(base_model="/m", library_name=None, tags=["a", "b"]) == \
        ["---", "base_model: /m", "tags: [a, b]", "---"]
