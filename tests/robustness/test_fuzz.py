"""Property-based fuzzing (Hypothesis) of the inputs users hand warmstart: safetensors headers, adapter
configs, selection files and dataset rows. On every generated input the promises of docs/guarantees.md
hold: the command succeeds, or it exits 1 with one ``error:`` line and no traceback, writes nothing, and
leaves its inputs byte-identical. An accepted input is also checked for the silent wrong results the
guarantees rule out (a header the reference reader refuses; an adapter whose rank is not its tensors').

The budget is fixed and the search derandomized, so CI runs the same examples every time, in about 20 s
on a 2-core machine (``WARMSTART_FUZZ_EXAMPLES`` scales it for a longer local hunt).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from _robustness import assert_user_error, tree_state

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALE = float(os.environ.get("WARMSTART_FUZZ_EXAMPLES", "1"))


def budget(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=8)


# -- safetensors headers ---------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F64", "X9", "f32"]


@st.composite
def headers(draw):
    """Mostly well-formed headers with a few fields bent: offsets shifted, shapes off, names repeated,
    data missing or trailing, odd JSON values; sometimes raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64)), draw(st.binary(max_size=32))
    entries, off = [], 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(DTYPES[:7]) if draw(st.integers(0, 5)) else st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        n = 1
        for d in shape:
            n *= d
        size = n * {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F64": 8}.get(dtype, 4)
        s, e = off + draw(st.sampled_from([0, 0, 0, 1, -1])), off + size + draw(st.sampled_from([0, 0, 0, 2, -2]))
        info = {"dtype": dtype, "shape": shape, "data_offsets": [s, e]}
        if draw(st.integers(0, 7)) == 0:
            info[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON)
        name = draw(st.sampled_from(["w", "b", f"t{i}", "__metadata__"])) if draw(st.integers(0, 4)) == 0 else f"t{i}"
        entries.append((name, info))
        off += size
    body = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in entries) + "}"  # keeps duplicate names
    data = b"\0" * max(0, off + draw(st.sampled_from([0, 0, 0, 4, -4])))
    return body.encode(), data


@budget(300)
@given(h=headers())
def test_fuzz_safetensors_header(tmp_path_factory, h):
    """read_header raises only CheckpointError, and never accepts what the reference reader refuses."""
    from safetensors import safe_open

    from warmstart.checkpoints import read_header
    from warmstart.errors import CheckpointError

    header, data = h
    pad = header + b" " * (-len(header) % 8)
    f = tmp_path_factory.mktemp("st") / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(pad)) + pad + data)
    try:
        tensors, _ = read_header(f)
    except CheckpointError as e:
        assert str(f) in e.one_line()
        return
    with safe_open(str(f), "pt") as ref:  # accepted here → accepted, with the same tensors, there
        assert sorted(ref.keys()) == sorted(tensors)
        for name, m in tensors.items():
            if m.dtype != "F8_E4M3":
                assert list(ref.get_slice(name).get_shape()) == list(m.shape)


@budget(25)
@given(h=headers())
def test_fuzz_safetensors_header_through_the_cli(cli, models, tmp_path_factory, h):
    """The same headers as a model's weights: `merge` succeeds or fails in one line, writes nothing."""
    d = tmp_path_factory.mktemp("ck") / "m"
    shutil.copytree(models / "ft_a", d, ignore=shutil.ignore_patterns("*.safetensors"))
    header, data = h
    pad = header + b" " * (-len(header) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(pad)) + pad + data)
    before = tree_state(d)
    out = d.parent / "out"
    r = cli("merge", d, models / "ft_b", "--out", out)
    assert r.code == 1  # no header built here has ft_b's tensors
    assert_user_error(r, out=out)
    assert tree_state(d) == before


# -- adapter configs -------------------------------------------------------------------------------

FIELDS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "base_model_name_or_path",
          "use_rslora", "peft_type", "fan_in_fan_out"]
VALUES = st.one_of(
    st.integers(-2, 16), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.none(),
    st.booleans(), st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "zz"]), max_size=3),
    st.dictionaries(st.sampled_from(["q_proj", "v_proj", "layers.0.self_attn.q_proj", "(", ".*", "q_proj["]),
                    st.one_of(st.integers(-1, 8), st.floats(), st.text(max_size=3)), max_size=2),
    JSON)


@budget(40)
@given(changes=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=3))
def test_fuzz_adapter_config(cli, models, tmp_path_factory, changes):
    """A bent adapter_config.json: the merge fails in one line, or succeeds only where r / rank_pattern
    really are the tensors' ranks (else the adapter would be scaled by the wrong alpha/r)."""
    from warmstart.checkpoints import lora_modules, open_checkpoint

    d = tmp_path_factory.mktemp("ad") / "lora"
    shutil.copytree(models / "lora_a", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    before, before_b = tree_state(d), tree_state(models / "lora_b")
    out = d.parent / "out"
    r = cli("merge", d, models / "lora_b", "--out", out)
    assert tree_state(d) == before and tree_state(models / "lora_b") == before_b
    if r.code != 0:
        assert_user_error(r, out=out)
        return
    ck = open_checkpoint(d)
    from warmstart.checkpoints import _pattern_value

    for name, m in lora_modules(ck).items():
        assert _pattern_value(ck.lora.rank_pattern, name, ck.lora.r) == m.rank


# -- selection files -------------------------------------------------------------------------------

SEL_KEYS = ["donors", "base", "method", "params", "metric", "target", "ranking"]


@st.composite
def selections(draw, models: Path):
    refs = st.sampled_from([str(models / "ft_a"), str(models / "ft_b"), str(models / "lora_a"), "../../x",
                            "/no/such", "org/name", ""])
    donor = st.fixed_dictionaries({"ref": refs}, optional={"weight": VALUES, "score": VALUES})
    sel = {"donors": draw(st.lists(st.one_of(donor, JSON), min_size=0, max_size=3))}
    for k in draw(st.lists(st.sampled_from(SEL_KEYS[1:]), max_size=3, unique=True)):
        sel[k] = draw(st.one_of(VALUES, st.just(str(models / "base")), st.sampled_from(["linear", "ties", "slerp"])))
    if draw(st.booleans()):
        return json.dumps(sel)  # JSON is YAML too
    import yaml

    return yaml.safe_dump(sel)


@budget(40)
@given(data=st.data())
def test_fuzz_selection_file(cli, models, tmp_path_factory, data):
    text = data.draw(selections(models))
    root = tmp_path_factory.mktemp("sel")
    f = root / "sel.yaml"
    f.write_text(text)
    before = tree_state(models)
    out = root / "out"
    r = cli("merge", "--selection", f, "--out", out)
    assert tree_state(models) == before
    if r.code != 0:
        assert_user_error(r, out=out)
    else:
        assert (out / "warmstart.json").is_file()


# -- dataset rows ----------------------------------------------------------------------------------

ROW_KEYS = ["prompt", "completion", "messages", "question", "choices", "answer", "role", "content"]
ROW_VALUES = st.one_of(JSON, st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]),
                                                             "content": st.one_of(st.text(max_size=5), JSON)}),
                                      max_size=3), st.lists(st.text(max_size=4), max_size=4))
ROWS = st.lists(st.one_of(st.dictionaries(st.sampled_from(ROW_KEYS), ROW_VALUES, max_size=4), JSON),
                min_size=0, max_size=4)


@pytest.fixture(scope="module")
def tok(models):
    from warmstart.checkpoints import load_tokenizer

    return load_tokenizer(models / "base")


@budget(200)
@given(rows=ROWS, suffix=st.sampled_from([".jsonl", ".csv"]), junk=st.binary(max_size=6))
def test_fuzz_dataset_rows(tmp_path_factory, tok, rows, suffix, junk):
    """Rows of any shape: load_target + tokenize give examples or a DataError naming the file; nothing
    else escapes (the CLI prints a WarmstartError as its one line)."""
    import csv
    import io

    from warmstart.data import load_target, tokenize
    from warmstart.errors import DataError

    f = tmp_path_factory.mktemp("data") / f"t{suffix}"
    if suffix == ".jsonl":
        raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        for r in rows:
            w.writerow([json.dumps(v) if not isinstance(v, str) else v for v in
                        (r.values() if isinstance(r, dict) else [r])])
        raw = ("prompt,completion\n" + buf.getvalue()).encode()
    f.write_bytes(raw + junk)
    before = f.read_bytes()
    try:
        data = load_target(f)
        tokenize(data, tok, max_length=16)
    except DataError as e:
        assert str(f) in e.one_line()
    assert f.read_bytes() == before


def test_fuzz_budget_is_fixed():
    """CI cost stays bounded: every fuzz test above carries a fixed, derandomized budget."""
    import inspect

    src = inspect.getsource(inspect.getmodule(test_fuzz_budget_is_fixed))
    assert src.count("@budget(") == 6 and "derandomize=True" in src
