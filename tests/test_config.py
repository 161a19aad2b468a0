"""Typed config sections (#12): every problem in one error before any work, round trips, one home per default."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import yaml

from warmstart.config import MergeConfig, MergeOptions, RunConfig, TransferConfig, merge_plan_options
from warmstart.errors import ConfigError
from warmstart.library import Library
from warmstart.select import SelectConfig, select
from warmstart.testing import write_jsonl
from warmstart.train import TrainConfig

THREE_BAD = {"train": {"stpes": 10}, "select": {"k": 0}, "merge": {"method": "tiez"}}


def _target(path):
    return write_jsonl(path, [{"prompt": f"Q{i}: the quick", "completion": " brown fox"} for i in range(12)])


@pytest.fixture
def small_lib(models, tmp_path):
    with Library(tmp_path / "lib.db") as lib:
        for name in ("lora_a", "lora_b"):
            lib.add(models / name, base=str(models / "base"))
    return tmp_path / "lib.db"


# -- one error for every section ----------------------------------------------------------------


def test_three_bad_sections_are_one_error_and_no_run_dir(tmp_path):
    from warmstart.pipeline import run

    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(THREE_BAD)
    msg = e.value.message
    assert "3 problems" in msg
    assert "unknown train option(s) stpes" in msg and "select.k must be a positive integer (at least 1), got 0" in msg
    assert "merge: unknown method 'tiez'" in msg
    # the same config handed to run() (sections typed but unchecked): refused before anything exists
    cfg = RunConfig(**THREE_BAD)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="3 problems"):
        run(tmp_path / "no-target.jsonl", tmp_path / "no-lib.db", tmp_path / "no-base", out, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run dir, no library, nothing


def test_run_cli_config_with_three_bad_sections_is_one_line(cli, models, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(THREE_BAD))
    target = _target(tmp_path / "t.jsonl")
    r = cli("run", "--target", target, "--library", tmp_path / "lib.db", "--base", models / "base",
            "--config", cfg, "--k", 3, "--set", "merge_options.threads=0", "--out", tmp_path / "run")
    assert r.code == 1 and "Traceback" not in r.err and r.err.count("\n") == 1, r.err
    assert r.err.startswith(f"error: {cfg}: invalid run config (3 problems)")  # --k 3 repaired select.k
    assert "stpes" in r.err and "tiez" in r.err and "merge_options.threads must be a positive integer" in r.err
    assert not (tmp_path / "run").exists() and not (tmp_path / "lib.db").exists()


def test_select_cli_errors_are_one_line_in_flag_names(cli, models, tmp_path, small_lib):
    target = _target(tmp_path / "t.jsonl")
    r = cli("select", "--target", target, "--base", models / "base", "--library", small_lib, "--k", 0,
            "--scorer", "lossy", "--batch-size", -1, "--out", tmp_path / "sel.yaml")
    assert r.code == 1 and "Traceback" not in r.err and r.err.count("\n") == 1, r.err
    for part in ("--k must be a positive integer (at least 1), got 0", "--scorer must be one of loss, grad, halving",
                 "--batch-size must be a positive integer (at least 1), got -1"):
        assert part in r.err, part
    assert not (tmp_path / "sel.yaml").exists()
    cfg = tmp_path / "sel-config.yaml"
    cfg.write_text("select: {k: 2, shortlst: 4}\n")  # a run config's select: section, misspelt
    r = cli("select", "--target", target, "--base", models / "base", "--library", small_lib, "--config", cfg)
    assert r.code == 1 and "unknown select option(s) shortlst" in r.err and r.err.count("\n") == 1, r.err


# -- select: checked before anything is scored ------------------------------------------------


@pytest.fixture
def scoring_spy(monkeypatch):
    import warmstart._scoring as S

    calls = []
    for name in ("load_base", "evaluate"):
        real = getattr(S, name)
        monkeypatch.setattr(S, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    return calls


def test_bad_k_is_refused_before_any_scoring(models, tmp_path, small_lib, scoring_spy):
    target = _target(tmp_path / "t.jsonl")
    with Library(small_lib) as lib:
        with pytest.raises(ConfigError, match=r"k must be a positive integer \(at least 1\), got 0"):
            select(target, models / "base", SelectConfig(k=0), library=lib)
        with pytest.raises(ConfigError, match="k must be a positive integer"):
            select(target, models / "base", library=lib, k=-1, n=4)  # the deprecated keywords: checked the same
        assert scoring_spy == []  # no model loaded, no candidate evaluated
        sel = select(target, models / "base", SelectConfig(k=3, n=4), library=lib)
    # k above the candidates is not an error (as before): every candidate that qualifies is a donor
    assert len(sel.donors) == 2 and "evaluate" in scoring_spy  # the spy does see real scoring


def test_select_config_lists_every_bad_field():
    errs = SelectConfig(k=0, n=-1, metric="acc", weights="softmax:x", scorer="grad", dtype="int8",
                        mc_mode="letters", min_own_gain=float("nan")).errors()
    for part in ("k must be", "n must be", "metric: unknown metric 'acc'", "weights: bad temperature",
                 "unknown dtype 'int8'", "mc_mode must be one of", "min_own_gain must be a number",
                 "scorer grad predicts the loss"):
        assert sum(e.startswith(part) for e in errs) == 1, (part, errs)
    assert len(errs) == 8


def test_select_keywords_still_work_deprecated(models, tmp_path, small_lib):
    target = _target(tmp_path / "t.jsonl")
    with Library(small_lib) as lib, pytest.warns(DeprecationWarning, match="SelectConfig"):
        old = select(target, models / "base", library=lib, n=4, k=1)
    with Library(small_lib) as lib:
        new = select(target, models / "base", SelectConfig(n=4, k=1), library=lib)
        with pytest.raises(ConfigError, match="unknown select option"):
            select(target, models / "base", library=lib, sample=4)
    assert [d["ref"] for d in old.donors] == [d["ref"] for d in new.donors]
    assert [r["score"] for r in old.ranking] == [r["score"] for r in new.ranking]


# -- round trips and given fields ---------------------------------------------------------------


def test_run_config_round_trips_through_dict_and_yaml(tmp_path):
    cfg = RunConfig(train=TrainConfig(steps=3, lr=1e-3), select={"k": 3, "scorer": "grad", "n": None},
                    merge={"method": "ties", "params": {"density": 0.5}, "lora_a_norm": None},
                    merge_options={"threads": 4}, eval_max=None, baseline=False).validate()
    d = cfg.to_dict()
    assert d["select"] == {"n": None, "k": 3, "scorer": "grad"}  # only what was given
    assert d["merge"] == {"method": "ties", "params": {"density": 0.5}, "lora_a_norm": None}
    assert d["merge_options"] == {"threads": 4}
    back = RunConfig.from_dict(d)
    assert back == cfg and back.to_dict() == d
    p = tmp_path / "run.yaml"
    p.write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(p).to_dict() == d
    assert "merge_options" not in RunConfig().to_dict()  # as run.json was before the section existed


def test_merge_run_options_in_the_merge_section_move_to_merge_options():
    cfg = RunConfig(merge={"method": "ties", "threads": 3, "shard_size": "1GB"}).validate()
    assert cfg.merge.to_dict() == {"method": "ties"}
    assert cfg.merge_options.to_dict() == {"threads": 3, "shard_size": "1GB"}


def test_left_out_and_given_as_the_default_are_told_apart():
    """A run merges LoRA donors with svd unless lora_mode is given, even given as MergePlan's default."""
    lora = [{"kind": "lora"}, {"kind": "lora"}]
    auto = merge_plan_options(RunConfig(), lora)
    assert auto["lora_mode"] == "svd" and auto["rank"] == TrainConfig().lora_r
    given = merge_plan_options(RunConfig(merge={"lora_mode": MergeConfig().lora_mode}), lora)
    assert given == {"lora_mode": "cat"}
    cfg = RunConfig().with_overrides(["select.seed=0"])
    assert cfg.select.to_dict() == {"seed": 0}
    assert RunConfig(train=TrainConfig(seed=7)).select_config().seed == 7  # the run's seed where not given
    assert cfg.select_config().seed == 0
    assert SelectConfig(k=3).replace(n=8).to_dict() == {"n": 8, "k": 3}


def test_merge_sections_match_merge_plan():
    """MergeConfig + MergeOptions are MergePlan's fields (but the run's models) with the same defaults."""
    from warmstart.merge.plan import MergePlan

    def defaults(cls):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls) if f.name not in ("models", "source")}

    assert {**defaults(MergeConfig), **defaults(MergeOptions)} == defaults(MergePlan)
    assert not set(MergeConfig.field_names()) & set(MergeOptions.field_names())


# -- one home per default: the flags read them from the dataclasses -------------------------------


@pytest.mark.parametrize("command", ["run", "select"])
def test_flag_defaults_are_the_dataclass_defaults(command):
    from typer.testing import CliRunner

    from warmstart.cli import app
    from warmstart.cli._options import shown
    from warmstart.cli.run import run_cmd
    from warmstart.cli.select import select_cmd

    classes = {"train": TrainConfig(), "select": SelectConfig(), "merge": MergeConfig(), "run": RunConfig(),
               "transfer": TransferConfig()}
    fn = {"run": run_cmd, "select": select_cmd}[command]
    checked = 0
    text = " ".join(CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"}).output.split())
    for p in inspect.signature(fn).parameters.values():
        field = getattr(p.default, "config_field", None)
        if field is None:
            continue
        section, name, rule = field
        want = rule if rule is not None else shown(getattr(classes[section], name))
        assert p.default.default is None  # "not given": the config's value stays unless the flag is given
        assert p.default.help.endswith(rf"\[default: {want}]"), (p.name, p.default.help)
        flag = p.default.param_decls[0]
        assert re.search(re.escape(flag) + r"\b.*?\[default: " + re.escape(want) + r"\]", text), flag
        checked += 1
    assert checked >= {"run": 30, "select": 18}[command]
