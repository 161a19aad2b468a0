"""Unit 2 of the real-benchmark bench: the start a target run trains from (issue #18).

A start is (init, adapter): the base and a merged adapter, or the base alone (a fresh LoRA).
Its JSON in ``results/starts/<target>/<start>.json`` records the donors, the selection
and merge times and whether the do-no-harm gate sent the run back to the base. The
merged adapter itself lives in ``work`` and is rebuilt from that JSON and the committed
sources (merging LoRA adapters takes seconds; the selection's scores are what costs, and
they are in the JSON).

Every merge goes through the public API: :func:`warmstart.select.select` for the
donors, then :func:`warmstart.rundir.read_selection` (a merge plan) and
:func:`warmstart.merge.merge`, with the options ``warmstart run`` uses for LoRA donors
(SVD to the scratch LoRA's rank, its scaling, A at a fresh LoRA's row norm) unless the
start names another ``lora_mode``.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .._io import atomic_dir, atomic_write_json, read_json
from ..library import Library
from ..merge import MergePlan, merge
from ..rundir import read_selection
from ..select import select

# The starts a target run can train from. "base": the fresh LoRA of training from scratch.
# Each other entry: (how donors are chosen, select options, merge options).
# Donors: "select" (warmstart's selection), "all" (every donor, no selection: the centroid),
# "random" (k donors drawn at random, seeded by target), "randlora" (main's donors replaced by
# random LoRAs of the same per-tensor norms: the control of arXiv 2602.12323).
_SEL = {"k": 2, "metric": "loss", "weights": "uniform", "min_own_gain": None}
STARTS: dict[str, tuple[str, dict, dict]] = {
    "main": ("select", {}, {}),
    "all": ("all", {}, {}),
    "random": ("random", {}, {}),
    "best1": ("select", {"k": 1}, {}),
    "randlora": ("randlora", {}, {}),
    "cat": ("select", {}, {"lora_mode": "cat"}),
    "factors": ("select", {}, {"lora_mode": "factors"}),
    "mwa": ("select", {"weights": "mwa:loss"}, {}),
    "optimized": ("select", {"weights": "optimized", "optimize_budget": 20}, {}),
}




LORA_ONLY = ("randlora", "cat", "factors")  # starts that exist only in adapter space


def start_init(cfg, d, base: Path, target: str, start: str, log: Callable[[str], None]):
    """(init, adapter or None, info) of ``start`` for ``target``; builds what is missing.
    LoRA: (base, merged adapter); full fine-tuning: (merged model, None)."""
    if start == "base":
        return base, None, {"start": "base"}
    info_path = d.start_json(target, start)
    info = read_json(info_path) if info_path.is_file() else None
    merged = d.start_dir(target, start) / "model"
    marker = "config.json" if cfg.full else "adapter_config.json"
    if info is None or (info["donors"] and not (merged / marker).is_file()):
        built = build_start(cfg, d, base, target, start, log, selection=(info or {}).get("selection"))
        if info is None:  # a rebuild in a later session keeps the JSON of the session that chose and timed it
            info = built
            atomic_write_json(info_path, info)
    if not info["donors"]:
        return base, None, info
    return (merged, None, info) if cfg.full else (base, merged, info)


def library_for(cfg, d, target: str) -> Path:
    """The leave-one-out catalog: every other task's stored source."""
    path = d.library(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Library(path) as lib:
        for t in cfg.tasks:
            if t != target:
                lib.add(d.source(t), task=t)
    return path


def build_start(cfg, d, base: Path, target: str, start: str, log, selection: dict | None = None) -> dict:
    how, sel_opts, merge_opts = STARTS[start]
    t0 = time.perf_counter()
    if selection is None:  # a resumed session reuses the committed selection (same donors, no rescoring)
        selection = _choose(cfg, d, base, target, start, how, {**_SEL, **sel_opts})
    select_s = time.perf_counter() - t0
    info = {"start": start, "how": how, "donors": selection["donors"], "selection": selection,
            "select_s": selection.get("select_s", select_s), "gate": None}
    if how == "select" and cfg.margin is not None and not selection["donors"]:
        info["gate"] = "no donor beats the base by the margin: trains from the base"
        log(f"{target}/{start}: {info['gate']}")
        return {**info, "merge_s": 0.0}
    donors = _materialise(cfg, d, target, start, how, selection)
    work = d.start_dir(target, start)
    work.mkdir(parents=True, exist_ok=True)
    sel_file = work / "selection.json"
    atomic_write_json(sel_file, {**selection, "donors": donors, "base": str(base)})
    t1 = time.perf_counter()
    opts = {} if cfg.full else _merge_options(cfg, merge_opts)
    plan = MergePlan.from_dict(read_selection(sel_file).plan_dict(**opts), source=str(sel_file))
    if (work / "model").exists():
        shutil.rmtree(work / "model")
    merge(plan, work / "model")
    info["merge_s"] = time.perf_counter() - t1
    log(f"{target}/{start}: merged {', '.join(x.get('task') or Path(x['ref']).name for x in selection['donors'])} "
        f"(select {info['select_s']:.0f} s, merge {info['merge_s']:.1f} s)")
    return info


def _merge_options(cfg, merge_opts: dict) -> dict:
    """What ``warmstart run`` does for LoRA donors (pipeline._merge_options), unless overridden."""
    opts = dict(merge_opts)
    opts.setdefault("lora_mode", "svd")
    if opts["lora_mode"] == "svd":
        opts.setdefault("rank", cfg.lora_r)
        opts.setdefault("lora_scaling", cfg.lora_alpha / cfg.lora_r)
        opts.setdefault("lora_a_norm", 3 ** -0.5)
    elif opts["lora_mode"] == "cat":
        opts.setdefault("lora_scaling", cfg.lora_alpha / cfg.lora_r)
    return opts


def _choose(cfg, d, base: Path, target: str, start: str, how: str, sel_opts: dict) -> dict:
    """The donors (ref, task, weight, score) and what the choice cost."""
    lib_path = library_for(cfg, d, target)
    t0 = time.perf_counter()
    if how in ("all", "random"):
        with Library(lib_path) as lib:
            entries = sorted(lib.list(), key=lambda e: e.task or "")
        if how == "random":
            rng = random.Random(f"warmstart-olmo-random:{target}")
            entries = rng.sample(entries, cfg.k_random)
        donors = [{"ref": e.ref, "task": e.task, "kind": "full" if cfg.full else "lora", "weight": 1.0 / len(entries)}
                  for e in entries]
        return {"donors": donors, "metric": "loss", "select_s": 0.0}
    if how == "randlora":  # the donors main chose, their weights, random directions
        main = start_init(cfg, d, base, target, "main", lambda s: None)[2]
        return {"donors": main["donors"], "metric": "loss", "select_s": main["select_s"]}
    # n: the selection sample is drawn from the target's train slice, never the held-out split
    opts = {k: v for k, v in sel_opts.items()}
    margin = cfg.margin if how == "select" else None
    with Library(lib_path) as lib:
        sel = select(d.task(target) / "train.jsonl", str(base), library=lib, n=cfg.select_n, seed=0,
                     margin=margin, max_length=cfg.max_length, compute_dtype="auto", **opts)
    s = sel.to_dict()
    keep = {k: s[k] for k in ("metric", "method", "params", "weighting", "margin") if s.get(k) is not None}
    ranking = [{"task": r.get("task"), "kind": r["kind"], "score": r["score"]} for r in s["ranking"]]
    return {"donors": s["donors"], "ranking": ranking, "select_s": time.perf_counter() - t0, **keep}


def _materialise(cfg, d, target: str, start: str, how: str, selection: dict) -> list[dict]:
    """Donor refs that exist on this machine (sources by task; random LoRAs written here)."""
    donors = [{**x, "ref": str(d.source(x["task"]))} if x.get("task") else dict(x) for x in selection["donors"]]
    if how != "randlora":
        return donors
    out = []
    for x in donors:
        rnd = d.start_dir(target, start) / "random" / x["task"]
        random_lora_like(Path(x["ref"]), rnd, seed=f"{target}:{x['task']}")
        out.append({**x, "ref": str(rnd)})
    return out


def random_lora_like(adapter: Path, out: Path, *, seed: str) -> Path:
    """An adapter of ``adapter``'s shapes whose every tensor is Gaussian noise rescaled to that
    tensor's Frobenius norm (the control of arXiv 2602.12323: trained directions vs. random ones)."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(adapter / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(int.from_bytes(seed.encode(), "little") % (2 ** 63))
    rnd = {}
    for k in sorted(sd):
        v = sd[k].float()
        r = torch.randn(v.shape, generator=g)
        rnd[k] = (r * (v.norm() / r.norm().clamp_min(1e-30))).to(sd[k].dtype).contiguous()
    with atomic_dir(out, force=True) as tmp:
        for name in ("adapter_config.json", "warmstart.json"):
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, tmp / name)
        save_file(rnd, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


__all__ = ["build_start", "library_for", "random_lora_like", "start_init"]
