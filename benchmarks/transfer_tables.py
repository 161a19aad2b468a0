"""The tables of docs/transfer.md ("A real version bump") from benchmarks/transfer_exp.py's JSON.

    python benchmarks/transfer_exp.py tables --results docs/transfer-results
"""

from __future__ import annotations

import json
from pathlib import Path

NAMES = {"arc_easy": "ARC-Easy", "csqa": "CommonsenseQA"}


def _load(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def _hits(s: dict) -> list[int]:
    return [int(c) for c in s["hits"]]


def _ci(a: dict, b: dict) -> str:
    from warmstart.bench.stats import paired_bootstrap

    d, lo, hi = paired_bootstrap(_hits(a), _hits(b))
    return f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table_pair(res: Path, bump: dict | None, targets: list[str], drifts: list[int]) -> list[str]:
    out = ["| bump | steps | tokens | held-out text loss | rel. weight drift ‖v1.1−v1‖/‖v1‖ | cos(v1, v1.1) | "
           + " | ".join(f"{NAMES.get(t, t)} zero-shot" for t in targets) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(targets)]
    v1 = [_load(res / "scores" / t / "v1.json") for t in targets]
    loss0 = bump["heldout_loss"]["0"] if bump else None
    out.append(f"| v1 | 0 | 0 | {loss0:.3f} | 0 | 1 | " + " | ".join(_pct(s and s["accuracy"]) for s in v1) + " |")
    for d in drifts:
        ov = next((r["overall"] for t in targets for k in ("full", "lora")
                   if (r := _load(res / "notrain" / t / f"{k}-d{d}.json"))), None) or {}
        sc = [_load(res / "scores" / t / f"v11-d{d}.json") for t in targets]
        info = (bump or {}).get("saved", {}).get(str(d), {})
        cells = [f"{_pct(s['accuracy'])} ({_ci(s, a)})" if s and a else "–" for s, a in zip(sc, v1)]
        rd, cb = ov.get("rel_drift"), ov.get("cos_bases")
        out.append(f"| v1.1-d{d} | {d} | {info.get('tokens', 0):,} | {info.get('heldout_loss', float('nan')):.3f} | "
                   f"{'–' if rd is None else f'{rd:.4f}'} | {'–' if cb is None else f'{cb:.5f}'} | "
                   + " | ".join(cells) + " |")
    return out


def table_notrain(res: Path, targets: list[str], drifts: list[int]) -> list[str]:
    out = ["| target | fine-tune | v1 | v1 fine-tune | bump | v1.1 | v1.1 + 0.5·Δ | v1.1 + Δ | "
           "v1.1 + Δ − v1.1, 95% CI | v1.1 + Δ − v1 fine-tune | recovered |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in targets:
        v1 = _load(res / "scores" / t / "v1.json")
        for k in ("lora", "full"):
            ft = _load(res / "scores" / t / f"v1-{k}.json")
            for d in drifts:
                r = _load(res / "notrain" / t / f"{k}-d{d}.json")
                v11 = _load(res / "scores" / t / f"v11-d{d}.json")
                if not (r and v11 and v1 and ft):
                    continue
                s5, s1 = r["scores"]["0.5"], r["scores"]["1.0"]
                gain = ft["accuracy"] - v1["accuracy"]
                rec = (s1["accuracy"] - v11["accuracy"]) / gain if gain > 0 else None
                out.append(f"| {NAMES.get(t, t)} | {k} | {_pct(v1['accuracy'])} | {_pct(ft['accuracy'])} | d{d} | "
                           f"{_pct(v11['accuracy'])} | {_pct(s5['accuracy'])} | {_pct(s1['accuracy'])} | "
                           f"{_ci(s1, v11)} | {_ci(s1, ft)} | {'–' if rec is None else f'{100 * rec:.0f} %'} |")
    return out


def table_compat(res: Path, targets: list[str], drifts: list[int]) -> list[str]:
    out = ["| target | fine-tune | bump | cos(drift, Δ) overall | per-layer cos range | ‖Δ‖/‖v1‖ | ‖drift‖/‖v1‖ | "
           "warnings |", "|---|---|---|---|---|---|---|---|"]
    for t in targets:
        for k in ("lora", "full"):
            for d in drifts:
                r = _load(res / "notrain" / t / f"{k}-d{d}.json")
                if not r:
                    continue
                ov = r["overall"] or {}
                cs = [x.get("cos_drift_diff") for x in r["layers"] if x.get("cos_drift_diff") is not None]
                rng = f"{min(cs):+.3f} … {max(cs):+.3f}" if cs else "–"
                out.append(f"| {NAMES.get(t, t)} | {k} | d{d} | {ov.get('cos_drift_diff', 0):+.4f} | {rng} | "
                           f"{ov.get('rel_diff', 0):.4f} | {ov.get('rel_drift', 0):.4f} | {len(r['warnings'])} |")
    return out


def table_line(res: Path, drifts: list[int]) -> list[str]:
    line = _load(res / "line.json") or {}
    ts = sorted({t for row in line.values() for t in row}, key=float)
    out = ["| bump | " + " | ".join(f"t = {float(t):g}" for t in ts) + " | barrier |", "|---|" + "---|" * (len(ts) + 1)]
    for d in drifts:
        row = line.get(str(d))
        if not row:
            continue
        lo, hi = row[ts[0]], row[ts[-1]]
        barrier = max(row[t] - ((1 - float(t)) * lo + float(t) * hi) for t in ts)
        out.append(f"| d{d} | " + " | ".join(f"{row[t]:.4f}" for t in ts) + f" | {barrier:+.4f} |")
    return out


def _init_files(res: Path, t: str, d: int) -> list[Path]:
    return sorted((res / "init" / t).glob(f"lora-d{d}.json")) + sorted((res / "init" / t).glob(f"lora-d{d}-s*.json"))


def table_init(res: Path, targets: list[str], drifts: list[int]) -> list[str]:
    out = ["| target | bump | seed | lr | from v1.1 + Δ: step 0 → 80 | from v1.1: step 0 → 80 | Δ final (run report) | "
           "steps to parity | wall clock to parity |", "|---|---|---|---|---|---|---|---|---|"]
    rows2 = ["| target | bump | seed | warm (lr chosen on validation) | baseline (lr chosen on validation) | "
             "Δ, 95% CI (400 questions) |", "|---|---|---|---|---|---|"]
    for t in targets:
        for d in drifts:
            for f in _init_files(res, t, d):
                r = _load(f)
                seed = r.get("seed", 0)
                for lr, run in r["runs"].items():
                    rep = run["report"]
                    w, b = rep.get("warm", {}), rep.get("baseline", {})
                    par = rep.get("parity") or {}
                    steps = f"{par['step']:.0f} ({par['percent_steps']:.0f} %)" if par.get("step") is not None \
                        else par.get("status", "–")
                    wall = f"{par['wall_s']:.0f} s ({par['percent_wall']:.0f} %)" if par.get("wall_s") is not None \
                        else "–"
                    out.append(f"| {NAMES.get(t, t)} | d{d} | {seed} | {float(lr):g} | "
                               f"{_pct(w.get('zero_shot'))} → {_pct(w.get('final'))} | "
                               f"{_pct(b.get('zero_shot'))} → {_pct(b.get('final'))} | "
                               f"{_pct(rep.get('delta'))} | {steps} | {wall} |")
                te = r["test"]
                rows2.append(f"| {NAMES.get(t, t)} | d{d} | {seed} | "
                             f"{_pct(te['warm']['accuracy'])} (lr {r['chosen_lr']['warm']:g}) | "
                             f"{_pct(te['baseline']['accuracy'])} (lr {r['chosen_lr']['baseline']:g}) | "
                             f"{_ci(te['warm'], te['baseline'])} |")
    return out + [""] + rows2


def table_curves(res: Path, targets: list[str], drifts: list[int]) -> list[str]:
    """Held-out accuracy along training, each side at its lr chosen on validation (the runs' eval curves)."""
    out = ["| target | bump | seed | start | step 0 | 20 | 40 | 60 | 80 |", "|---|---|---|---|---|---|---|---|---|"]
    for t in targets:
        for d in drifts:
            for f in _init_files(res, t, d):
                r = _load(f)
                for side, name in (("warm", "v1.1 + Δ"), ("baseline", "v1.1")):
                    c = _load(f.parent / f.stem / f"lr{r['chosen_lr'][side]:g}" / f"{side}.curve.json")
                    if not c:
                        continue
                    acc = {p["step"]: p.get("eval_mc_accuracy") for p in c["points"]}
                    out.append(f"| {NAMES.get(t, t)} | d{d} | {r.get('seed', 0)} | "
                               f"{name} (lr {r['chosen_lr'][side]:g}) | "
                               + " | ".join(_pct(acc.get(s)) for s in (0, 20, 40, 60, 80)) + " |")
    return out


def table_zeroshot(res: Path, drifts: list[int]) -> list[str]:
    """What else the bump changed: tasks neither in its text nor targets."""
    out = ["| task | v1 | " + " | ".join(f"v1.1-d{d} (vs v1, 95% CI)" for d in drifts) + " |",
           "|---|---|" + "---|" * len(drifts)]
    for task_dir in sorted((res / "zeroshot").glob("*")) if (res / "zeroshot").is_dir() else []:
        v1 = _load(task_dir / "v1.json")
        cells = []
        for d in drifts:
            s = _load(task_dir / f"v11-d{d}.json")
            cells.append(f"{_pct(s['accuracy'])} ({_ci(s, v1)})" if s and v1 else "–")
        out.append(f"| {task_dir.name} | {_pct(v1 and v1['accuracy'])} | " + " | ".join(cells) + " |")
    return out


def main(res: Path) -> int:
    bump = _load(res / "bump.json")
    targets = sorted({p.name for p in (res / "scores").iterdir()}) if (res / "scores").is_dir() else []
    drifts = sorted(int(k) for k in (bump or {}).get("saved", {}))
    for title, rows in (("The pair", table_pair(res, bump, targets, drifts)),
                        ("Zero-shot on tasks the bump did not train on", table_zeroshot(res, drifts)),
                        ("Transfer without training", table_notrain(res, targets, drifts)),
                        ("Compatibility report", table_compat(res, targets, drifts)),
                        ("Loss along the line v1 → v1.1", table_line(res, drifts)),
                        ("Transfer as an initialisation", table_init(res, targets, drifts)),
                        ("Accuracy along training", table_curves(res, targets, drifts))):
        print(f"### {title}\n")
        print("\n".join(rows) + "\n")
    return 0
