"""CI smoke run of the recycle-bench protocol: a tiny Llama, three tiny generated tasks."""

from __future__ import annotations

import json
import random

import pytest

from warmstart.bench import protocol as P
from warmstart.bench import tasks as T
from warmstart.errors import ConfigError


def _tiny(word: str):
    def build(rng: random.Random):
        labels = ["red", "blue", "green", "gold", "gray"]
        return [T.Item(f"{word} {i}?", labels[i % 5], tuple(l for l in labels if l != labels[i % 5]))
                for i in range(30)]

    build.__doc__ = f"tiny task {word}"
    return build


@pytest.fixture
def tiny_tasks(monkeypatch):
    monkeypatch.setattr(T, "TASKS", dict(T.TASKS))
    for name in ("ta", "tb", "tc"):
        T.task(name, "test")(_tiny(name))
    return ["ta", "tb", "tc"]


def _cfg(tasks, **kw):
    return P.BenchConfig(tasks=tasks, steps=2, eval_every=1, batch_size=2, lora_r=2, lora_alpha=4,
                         test_limit=4, select_n=4, eval_batch_size=8, **kw)


def test_protocol_smoke_and_resume(tiny_tasks, models, tmp_path):
    out = tmp_path / "bench"
    cfg = _cfg(tiny_tasks, targets=["tc"], variants=list(P.VARIANTS), ablation_steps=1)
    res = P.run_bench(out, cfg, base=models / "base", log=lambda s: None)
    rows = res["rows"]
    # every variant runs; ablations train ablation_steps (1): only budget 1 is compared for them
    assert {(r["variant"], r["budget"]) for r in rows} == {("main", 1), ("main", 2)} | {
        (v, 1) for v in P.VARIANTS if v != "main"}
    assert json.loads((out / "runs" / "tc" / "k1-s0" / "warm" / "curve.json").read_text())["points"][-1]["step"] == 1
    # k1 read every score from main's cache: its wall clock is charged main's scoring time
    main_select = json.loads((out / "runs" / "tc" / "main-s0" / "select" / "stage.done.json").read_text())["wall_s"]
    k1 = next(r for r in rows if r["variant"] == "k1")
    assert k1["overhead_s"] >= main_select > 0
    sel = (out / "runs" / "tc" / "optimized-s0" / "select" / "selection.yaml").read_text()
    assert "scheme: optimized" in sel and "method: task_arithmetic" in sel
    main2 = next(r for r in rows if r["variant"] == "main" and r["budget"] == 2)
    # leave-one-out: the target's own adapter is never a donor
    assert sorted(main2["donors"]) == ["ta", "tb"]
    assert next(r for r in rows if r["variant"] == "k1")["donors"][0] in ("ta", "tb")
    for r in rows:
        assert abs(r["delta"] - (r["warm"] - r["scratch"])) < 1e-12
        assert 0 <= r["scratch"] <= 1 and 0 <= r["merged_zero_shot"] <= 1
    # the scratch baseline is the target's own source run, evaluated on the same rows
    scratch = json.loads((out / "source" / "tc-s0" / "curve.json").read_text())["points"]
    assert main2["scratch"] == scratch[-1]["eval_mc_accuracy"]
    assert (out / "results.md").is_file() and (out / "curves.png").is_file()
    md = (out / "results.md").read_text()
    assert "budget 2 steps" in md and "Ablations against main" in md and "| optimized |" in md

    # resume: everything is skipped (no file rewritten), the same results come back
    before = {p: p.stat().st_mtime_ns for p in (out / "source").rglob("adapter_model.safetensors")}
    again = P.run_bench(out, cfg, base=models / "base", log=lambda s: None)
    assert again["rows"] == rows
    assert before == {p: p.stat().st_mtime_ns for p in (out / "source").rglob("adapter_model.safetensors")}

    # the demo is the same protocol plus the standard report: on this directory it only reports
    from warmstart.demo import format_table, run_demo

    row = run_demo(out, config=cfg, base=models / "base", log=lambda s: None)
    assert row["delta"] == main2["delta"] and row["budget"] == 2
    assert (out / "report" / "report.md").is_file() and "Δ" in format_table(row)

    # a different recipe in the same directory is refused
    with pytest.raises(ConfigError, match="steps"):
        P.run_bench(out, P.BenchConfig(tasks=tiny_tasks, steps=4, eval_every=1), base=models / "base",
                    log=lambda s: None)


def test_config_validation(tiny_tasks):
    with pytest.raises(ConfigError) as e:
        P.BenchConfig(tasks=["ta"], targets=["nope"], variants=["zzz"], steps=5, eval_every=2).resolved()
    msg = str(e.value)
    for part in ("unknown task 'nope'", "unknown variant", "at least two tasks", "multiple of eval_every"):
        assert part in msg
    with pytest.raises(ConfigError, match="ablation_steps"):
        P.BenchConfig(tasks=["ta", "tb"], steps=4, eval_every=2, ablation_steps=3).resolved()
    with pytest.raises(ConfigError, match="order must be"):
        P.BenchConfig(tasks=["ta", "tb"], order="random").resolved()


def test_target_order_runs_every_ablation_on_a_target_first(tiny_tasks, models, tmp_path, monkeypatch):
    done = []
    monkeypatch.setattr(P, "warm_run", lambda cfg, bd, base, t, v, seed, *a: done.append((seed, t, v)))
    monkeypatch.setattr(P, "source_run", lambda *a: None)
    monkeypatch.setattr(P, "write_results", lambda *a: {})
    for order, want in (("target", [(0, "ta", "main"), (0, "tb", "main"), (0, "ta", "k1"), (0, "ta", "cat"),
                                    (0, "tb", "k1"), (0, "tb", "cat")]),
                        ("variant", [(0, "ta", "main"), (0, "tb", "main"), (0, "ta", "k1"), (0, "tb", "k1"),
                                     (0, "ta", "cat"), (0, "tb", "cat")])):
        done.clear()
        cfg = _cfg(tiny_tasks, targets=["ta", "tb"], variants=["main", "k1", "cat"], order=order)
        P.run_bench(tmp_path / order, cfg, base=models / "base", log=lambda s: None)
        assert done == want, order


def test_bench_dir_written_before_a_recipe_field_resumes(tiny_tasks, tmp_path):
    """A bench.json without ablation_steps (older version) accepts it; a recorded value must match."""
    bd = P.BenchDir(tmp_path / "b")
    cfg = P.BenchConfig(tasks=tiny_tasks, steps=4, eval_every=2).resolved()
    old = cfg.to_dict()
    del old["ablation_steps"]
    bd.root.mkdir()
    (bd.root / "bench.json").write_text(json.dumps({"config": old}))
    newer = P.BenchConfig(tasks=tiny_tasks, steps=4, eval_every=2, ablation_steps=2).resolved()
    P._claim(bd, newer)
    assert json.loads((bd.root / "bench.json").read_text())["config"]["ablation_steps"] == 2
    with pytest.raises(ConfigError, match="ablation_steps"):
        P._claim(bd, cfg)


def test_ablation_table_pairs_with_main():
    from warmstart.bench.results import ablation_by_target, ablation_table

    def row(v, t, seed, warm, scratch=0.5):
        return {"variant": v, "target": t, "seed": seed, "budget": 10, "warm": warm, "scratch": scratch,
                "delta": warm - scratch, "merged_zero_shot": warm - 0.1, "overhead_s": 60.0 if v == "main" else 5.0,
                "parity_status": "never" if warm < scratch else "reached", "parity_wall_pct": 50.0 + 100 * warm}

    rows = [row("main", "x", 0, 0.60), row("main", "y", 0, 0.70), row("main", "y", 1, 0.80),
            row("k1", "x", 0, 0.65), row("k1", "y", 1, 0.70)]  # k1 has no (y, 0): main's (y, 0) is left out
    table = ablation_table(rows, [10])
    k1 = next(line for line in table.splitlines() if line.startswith("| k1 "))
    cells = [c.strip() for c in k1.split("|")[1:-1]]
    assert cells[2] == "2"  # pairs
    assert cells[3] == "+17.5"  # mean Δ vs scratch: (0.15 + 0.20) / 2
    assert cells[4] == "-2.5"  # mean of (0.65 - 0.60) and (0.70 - 0.80)
    assert cells[6] == "5 (60)"
    assert cells[7] == "118% (2/2) (120% (2/2))"  # k1: 115 and 120; main on the same pairs: 110 and 130
    by_t = ablation_by_target(rows, 10)
    # main restricted to the seeds the ablations ran (0 and 1 here; both for y)
    assert "| k1 | +15.0 | +20.0 |" in by_t and "| main | +10.0 | +25.0 |" in by_t
    only_seed0 = [r for r in rows if r["seed"] == 0] + [row("k1", "y", 0, 0.72), row("main", "y", 1, 0.99)]
    assert "| main | +10.0 | +20.0 |" in ablation_by_target(only_seed0, 10)  # main's seed 1 left out


def test_summary_mean_and_std():
    rows = [{"variant": "main", "budget": 2, "target": "x", "seed": s, "base_zero_shot": 0.25, "scratch": sc,
             "merged_zero_shot": 0.4, "warm": w, "delta": w - sc, "parity_status": "reached",
             "parity_steps_pct": 50.0, "parity_wall_pct": 70.0, "donors": ["a"]}
            for s, sc, w in ((0, 0.5, 0.6), (1, 0.7, 0.6))]
    (s,) = P.summarize(rows)
    assert s["n_seeds"] == 2 and abs(s["delta"] - 0.0) < 1e-12
    assert abs(s["delta_std"] - 0.1414213562) < 1e-6  # stdev of (+0.1, -0.1)
    assert abs(s["scratch"] - 0.6) < 1e-12


def test_a_run_held_by_another_worker_is_left_to_it(tiny_tasks, models, tmp_path):
    """Two workers on one directory: a run whose lock another process holds is skipped, then resumed."""
    import fcntl
    import subprocess
    import sys

    out = tmp_path / "bench"
    cfg = _cfg(tiny_tasks, targets=["ta", "tb"])
    lock = out / "locks" / "run-ta-main-s0.lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        logs = []
        res = P.run_bench(out, cfg, base=models / "base", log=logs.append)
        assert {r["target"] for r in res["rows"]} == {"tb"}
        assert any("ta/main/s0: another worker is running it" in line for line in logs)
        assert not (out / "runs" / "ta" / "main-s0").exists()
    finally:
        holder.kill()
        holder.wait()
    res = P.run_bench(out, cfg, base=models / "base", log=lambda s: None)  # the lock died with its holder
    assert {r["target"] for r in res["rows"]} == {"ta", "tb"}
    with open(lock, "a") as f:  # and nobody holds it now
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
