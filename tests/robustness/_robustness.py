"""Shared helpers for tests/test_robustness_*.py: broken inputs built once, and the checks every
user error must pass (one line, exit 1, no traceback, nothing written)."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome")]


def write_mc(path: Path, n: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            c, a = rng.choice(CAPITALS)
            f.write(json.dumps({"question": f"capital of {c}?", "choices": [x for _, x in CAPITALS],
                                "answer": a}) + "\n")
    return path


def _rewrite_st(f: Path, edit) -> None:
    """Rewrite a safetensors header through ``edit(header_dict)``, keeping the data bytes."""
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def build_bad_zoo(models: Path, root: Path) -> SimpleNamespace:
    """Every broken input the robustness tests feed to the commands (built once per module)."""
    import torch
    from safetensors.torch import load_file, save_file

    from warmstart import testing

    z = SimpleNamespace(**{n: models / n for n in
                           ("base", "base_sharded", "ft_a", "ft_b", "lora_a", "lora_b", "other_arch")})

    def cp(src: Path, name: str) -> Path:
        shutil.copytree(src, root / name)
        return root / name

    f = cp(models / "ft_a", "truncated") / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    z.truncated = f.parent
    f = cp(models / "ft_a", "bad_header") / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 5) + b"{oops" + f.read_bytes()[8:])
    z.bad_header = f.parent
    f = cp(models / "ft_a", "bad_offsets") / "model.safetensors"
    first = [k for k in json.loads(f.read_bytes()[8:8 + struct.unpack("<Q", f.read_bytes()[:8])[0]])
             if k != "__metadata__"][0]
    _rewrite_st(f, lambda h: h[first].__setitem__("data_offsets", [h[first]["data_offsets"][0],
                                                                   h[first]["data_offsets"][1] + 4]))
    z.bad_offsets = f.parent
    z.config_not_json = cp(models / "ft_a", "config_not_json")
    (z.config_not_json / "config.json").write_text('{"model_type": "llama", ')
    z.config_mismatch = cp(models / "ft_a", "config_mismatch")
    cfg = json.loads((z.config_mismatch / "config.json").read_text())
    cfg["hidden_size"], cfg["num_hidden_layers"] = 64, 4
    (z.config_mismatch / "config.json").write_text(json.dumps(cfg))
    z.nan = cp(models / "ft_a", "nan")
    sd = load_file(z.nan / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][0, :2] = torch.tensor([float("nan"), float("inf")])
    save_file(sd, z.nan / "model.safetensors", metadata={"format": "pt"})
    z.lora_nan = cp(models / "lora_a", "lora_nan")
    sd = load_file(z.lora_nan / "adapter_model.safetensors")
    k = sorted(sd)[0]
    sd[k].view(-1)[0] = float("nan")
    save_file(sd, z.lora_nan / "adapter_model.safetensors", metadata={"format": "pt"})
    z.lora_ia3 = cp(models / "lora_a", "lora_ia3")
    c = json.loads((z.lora_ia3 / "adapter_config.json").read_text())
    c["peft_type"] = "IA3"
    (z.lora_ia3 / "adapter_config.json").write_text(json.dumps(c))
    z.base2 = testing.make_base(root / "base2", seed=7)
    z.lora_other_base = testing.make_adapter(z.base2, root / "lora_other_base", seed=8)
    z.lora_kv = testing.make_adapter(models / "base", root / "lora_kv", seed=9, targets=("k_proj", "o_proj"))
    z.dangling = root / "dangling"
    os.symlink(root / "does-not-exist", z.dangling)
    z.a_file = root / "a_file.txt"
    z.a_file.write_text("not a checkpoint")
    # datasets
    z.train = write_mc(root / "train.jsonl", 12, 0)
    z.eval = write_mc(root / "eval.jsonl", 8, 1)
    z.empty = root / "empty.jsonl"
    z.empty.write_text("")
    z.malformed = root / "malformed.jsonl"
    z.malformed.write_text(z.train.read_text().splitlines()[0] + "\n{\"question\": \"x\", \n")
    z.mislabeled = root / "mislabeled.jsonl"
    z.mislabeled.write_text(json.dumps({"question": "capital of France?", "choices": ["Paris", "Rome"],
                                        "answer": "Lyon"}) + "\n")
    z.unknown_format = root / "unknown_format.jsonl"
    z.unknown_format.write_text(json.dumps({"foo": 1, "bar": 2}) + "\n")
    z.binary = root / "binary.jsonl"
    z.binary.write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    return z


def make_lib(tmp_path: Path, *refs) -> Path:
    """A catalog at ``tmp_path/lib.db`` holding ``refs``."""
    from warmstart.library import Library

    lib = tmp_path / "lib.db"
    with Library(lib) as L:
        for r in refs:
            L.add(r)
    return lib


def assert_user_error(r, *needles: str, out: Path | None = None) -> None:
    """Exit 1, one line on stderr naming the problem (no traceback), and nothing written at ``out``."""
    assert r.code == 1, (r.code, r.err[-2000:])
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert "Traceback" not in r.err, r.err[-2000:]
    errs = [ln for ln in lines if ln.startswith("error:")]
    assert len(errs) == 1, r.err[-2000:]
    for n in needles:
        assert n.lower() in errs[0].lower(), (n, errs[0])
    if out is not None:
        assert_nothing_written(out)


def assert_nothing_written(out: Path) -> None:
    out = Path(out)
    assert not out.exists(), f"{out} was written"
    if out.parent.is_dir():
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".tmp-")]
        assert not left, f"temporary leftovers: {left}"


def tree_state(root: Path) -> dict[str, tuple]:
    """Every file under ``root``: (sha256, size, mtime_ns, mode); directories: their mtime."""
    import hashlib

    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        st = os.stat(dirpath)
        state[os.path.relpath(dirpath, root) + "/"] = (st.st_mtime_ns, st.st_mode)
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            st = os.lstat(p)
            with open(p, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            state[os.path.relpath(p, root)] = (digest, st.st_size, st.st_mtime_ns, st.st_mode)
    return state
