"""Merge speed: warmstart vs mergekit vs the I/O floor, on the same inputs in the same run.

    nice -n 10 python benchmarks/merge_speed.py --quick
    nice -n 10 python benchmarks/merge_speed.py --methods linear,ties

Every tool runs as its own subprocess (fresh interpreter, imports included in
the time, as a user would run it) and its peak RSS is read with GNU time.
The I/O floor reads every input with plain ``safetensors.torch.load_file`` and
writes one model-sized output with ``save_file``: no merge can be faster than
that. Inputs are warmed into the page cache once before timing, so all runs
see the same cache state. The max |Δ| column compares warmstart's output with
mergekit's tensor by tensor (fp32 both).

Inputs: ``--quick`` builds a ~10M-parameter Llama; otherwise the converted
SmolLM2-135M (``warmstart bench prepare-model``) if present, else a random
Llama with SmolLM2-135M's shape. Donors are the base + 0.01·N(0, 1) per tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT = Path(os.environ.get("MERGEKIT_YAML", ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"))
SMOL = Path(os.environ.get("WARMSTART_MODELS_DIR", Path.home() / ".cache" / "warmstart" / "models")) \
    / "SmolLM2-135M-Instruct"
PARAMS = {  # one setting per method, shared by both tools
    "linear": {}, "task_arithmetic": {}, "ties": {"density": 0.5}, "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "slerp": {"t": 0.3}, "model_stock": {},
}


# ----------------------------------------------------------------------------
# Inputs


def _config(quick: bool):
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=False)
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def build_inputs(root: Path, quick: bool, n: int) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    base = root / "base"
    if not base.exists():
        if not quick and SMOL.exists():
            shutil.copytree(SMOL, base)
        else:
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(_config(quick)).save_pretrained(base)
    sd = load_file(base / "model.safetensors")
    donors = []
    for i in range(n):
        d = root / f"donor{i}"
        donors.append(d)
        if d.exists():
            continue
        g = torch.Generator().manual_seed(100 + i)
        d.mkdir(parents=True)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()},
                  d / "model.safetensors", metadata={"format": "pt"})
        for f in base.iterdir():
            if f.name.endswith(".json") or f.name.endswith(".jinja"):
                shutil.copy2(f, d / f.name)
    return base, donors


# ----------------------------------------------------------------------------
# Running a command: wall time and peak RSS of that child alone


ENV = dict(os.environ)


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall time and peak RSS of ``cmd``. RSS comes from GNU time (``%M``): ``ru_maxrss`` of a child forked
    from this process would include this process's own pages from before the exec."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", *cmd], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env=ENV)
    wall = time.perf_counter() - t0
    err = p.stderr.decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{err[-3000:]}")
    kb = int(err.rsplit("maxrss_kb=", 1)[1].split()[0])
    return wall, kb / 1024


def io_floor(inputs: list[Path], out: Path) -> tuple[float, float]:
    script = ("import sys\nfrom safetensors.torch import load_file, save_file\nsd=None\n"
              "for d in sys.argv[2:]:\n"
              "    sd = {k: v.clone() for k, v in load_file(d + '/model.safetensors').items()}\n"
              "save_file(sd, sys.argv[1])\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    return run([sys.executable, "-c", script, str(out), *map(str, inputs)])


def warmstart_cmd(method, base, donors, out) -> list[str]:
    ins = donors[:1] if method == "slerp" else donors
    cmd = [sys.executable, "-m", "warmstart", "merge", *map(str, ins), "--method", method, "--out", str(out),
           "--force", "--dtype", "float32"]
    if method != "linear":
        cmd += ["--base", str(base)]
    for k, v in PARAMS[method].items():
        cmd += [f"--{k}", str(v)]
    return cmd


def mergekit_config(method, base, donors) -> dict:
    w = 1.0 / len(donors)
    pm = {k: v for k, v in PARAMS[method].items() if k in ("density", "gamma")}
    cfg = {"merge_method": method, "dtype": "float32", "out_dtype": "float32"}
    if method == "slerp":
        cfg.update(base_model=str(base), models=[{"model": str(base)}, {"model": str(donors[0])}],
                   parameters={"t": PARAMS["slerp"]["t"]})
    elif method == "model_stock":
        cfg.update(base_model=str(base), models=[{"model": str(d)} for d in donors])
    else:
        cfg["models"] = [{"model": str(d), "parameters": {"weight": w, **pm}} for d in donors]
        if method != "linear":
            cfg["base_model"] = str(base)
    return cfg


def mergekit_cmd(method, base, donors, out, work) -> list[str]:
    import yaml

    f = work / f"mk-{method}.yaml"
    f.write_text(yaml.safe_dump(mergekit_config(method, base, donors)))
    return [str(MERGEKIT), str(f), str(out), "--lazy-unpickle", "--quiet", "--no-write-model-card"]


def max_abs_diff(a: Path, b: Path) -> tuple[float, list[str]]:
    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            h = safe_open(str(f), "pt")
            out.update({k: (h, k) for k in h.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    worst = 0.0
    for k in set(ta) & set(tb):
        x, y = ta[k][0].get_tensor(k).double(), tb[k][0].get_tensor(k).double()
        worst = max(worst, float((x - y).abs().max()))
    return worst, sorted(set(ta) ^ set(tb))


# ----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~10M-parameter model instead of 135M")
    ap.add_argument("--methods", default=None, help="comma list (default: all for --quick, linear,ties otherwise)")
    ap.add_argument("--n", type=int, default=3, help="number of donors")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "merge_speed")
    ap.add_argument("--omp-threads", type=int, default=1,
                    help="OMP_NUM_THREADS for every tool (default 1: on shared, oversubscribed cores OpenMP "
                         "spin-waiting makes 2 threads slower than 1; 0 leaves it unset)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--same-yaml", action="store_true",
                    help="warmstart runs mergekit's YAML (`merge --config`, mergekit's semantics) instead of flags")
    args = ap.parse_args()
    if args.omp_threads:
        ENV["OMP_NUM_THREADS"] = str(args.omp_threads)
    methods = (args.methods or (",".join(PARAMS) if args.quick else "linear,ties")).split(",")
    work = args.work / ("quick" if args.quick else "135m")
    work.mkdir(parents=True, exist_ok=True)
    base, donors = build_inputs(work / "inputs", args.quick, args.n)
    inputs = [base, *donors]
    n_params = _count(base)
    print(f"inputs: base + {len(donors)} donors, {n_params / 1e6:.1f}M params each, fp32; "
          f"OMP_NUM_THREADS={ENV.get('OMP_NUM_THREADS', 'unset')}; load avg {os.getloadavg()[0]:.1f}; "
          f"mergekit: {MERGEKIT if MERGEKIT.exists() else 'NOT INSTALLED'}", flush=True)
    io_floor(inputs, work / "floor" / "warm.safetensors")  # warm the page cache for everyone
    t0 = time.perf_counter()
    _register(inputs)
    print(f"input digests computed once, as `warmstart library add` does: {time.perf_counter() - t0:.1f}s "
          "(a merge of unregistered inputs hashes them from the bytes it reads instead)", flush=True)
    rows = []
    for method in methods:
        used = [base, donors[0]] if method == "slerp" else (donors if method == "linear" else inputs)
        floor_t, floor_m = io_floor(used, work / "floor" / "out.safetensors")
        if args.same_yaml:
            import yaml

            cfg = work / f"mk-{method}.yaml"
            cfg.write_text(yaml.safe_dump(mergekit_config(method, base, donors)))
            ws_t, ws_m = run([sys.executable, "-m", "warmstart", "merge", "--config", str(cfg), "--out",
                              str(work / f"ws-{method}"), "--force"])
        else:
            ws_t, ws_m = run(warmstart_cmd(method, base, donors, work / f"ws-{method}"))
        row = {"method": method, "floor_s": floor_t, "floor_mb": floor_m, "ws_s": ws_t, "ws_mb": ws_m}
        if MERGEKIT.exists():
            out = work / f"mk-{method}"
            shutil.rmtree(out, ignore_errors=True)
            row["mk_s"], row["mk_mb"] = run(mergekit_cmd(method, base, donors, out, work))
            row["max_abs_diff"], row["only_one_side"] = max_abs_diff(work / f"ws-{method}", out)
        rows.append(row)
        _print_row(row, header=len(rows) == 1)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _register(inputs: list[Path]) -> None:
    from warmstart.checkpoints import open_checkpoint

    for d in inputs:
        open_checkpoint(d).fingerprint()


def _count(d: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in d.glob("*.safetensors"):
        h = safe_open(str(f), "pt")
        for k in h.keys():
            s = 1
            for x in h.get_slice(k).get_shape():
                s *= x
            n += s
    return n


def _print_row(r: dict, header: bool) -> None:
    if header:
        print("| method | warmstart s | mergekit s | ws/mk time | warmstart MiB | mergekit MiB | I/O floor s "
              "| ws/floor | max abs diff |")
        print("|---|---|---|---|---|---|---|---|---|")
    mk, mkm, diff = r.get("mk_s"), r.get("mk_mb"), r.get("max_abs_diff")
    cells = [r["method"], f"{r['ws_s']:.2f}", f"{mk:.2f}" if mk else "—", f"{r['ws_s'] / mk:.2f}×" if mk else "—",
             f"{r['ws_mb']:.0f}", f"{mkm:.0f}" if mkm else "—", f"{r['floor_s']:.2f}",
             f"{r['ws_s'] / r['floor_s']:.2f}×", f"{diff:.2e}" if diff is not None else "—"]
    print("| " + " | ".join(cells) + " |", flush=True)

if __name__ == "__main__":
    main()
