"""MergePlan (merge/plan.py): validation lists every problem at once, YAML round trip, selection files."""

from __future__ import annotations

import pytest
import yaml

from warmstart.errors import ConfigError
from warmstart.merge.plan import MergePlan, ModelSpec, parse_size
from warmstart.rundir import read_selection


def from_selection(f, **kw):
    """A merge plan from a selection file, as `warmstart merge --selection` and `run` build it."""
    return MergePlan.from_dict(read_selection(f).plan_dict(**kw), source=str(f))



def test_every_problem_listed_in_one_error():
    data = {"models": [{"ref": "a", "wieght": 1}], "method": "tise", "dtype": "fp8", "penalty": "high",
            "lora_mode": "dense", "colour": "red", "weighting": "softmax:warm"}
    with pytest.raises(ConfigError) as e:
        MergePlan.from_dict(data, source="plan.yaml")
    msg = e.value.message
    for bit in ("unknown key(s) ['colour']", "unknown key(s) ['wieght'] in model 'a'", "penalty must be a number"):
        assert bit in msg, msg
    assert str(e.value.path) == "plan.yaml"
    # with the types right, every value problem comes in the same one message
    data["penalty"] = 1.0
    with pytest.raises(ConfigError) as e:
        MergePlan.from_dict(data)
    for bit in ("unknown key(s) ['colour']", "unknown method 'tise'", "dtype must be one of",
                "lora_mode must be one of", "bad temperature in 'softmax:warm'"):
        assert bit in e.value.message, e.value.message


def test_unknown_method_parameter_named_before_any_work():
    with pytest.raises(ConfigError, match=r"method 'ties' has no parameter\(s\) \['densty'\] \(known: density"):
        MergePlan(models=["a", "b"], method="ties", base="b0", params={"densty": 0.5})
    with pytest.raises(ConfigError, match=r"no parameter\(s\) \['lambda_'\]"):  # the plan name is `lambda`
        MergePlan(models=["a"], method="task_arithmetic", base="b0", params={"lambda_": 0.5})
    MergePlan(models=["a"], method="task_arithmetic", base="b0", params={"lambda": 0.5})


def test_facts_not_names_decide_base_rules():
    with pytest.raises(ConfigError, match="include_base applies to linear merges only"):
        MergePlan(models=["a"], method="ties", base="b0", include_base=True)
    MergePlan(models=["a"], method="linear", base="b0", include_base=True, base_weight=0.5)
    with pytest.raises(ConfigError, match="sum to zero"):
        MergePlan(models=[ModelSpec("a", 1.0), ModelSpec("b", -1.0)], method="linear")
    MergePlan(models=[ModelSpec("a", 1.0), ModelSpec("b", -1.0)], method="task_arithmetic", base="b0")


def test_yaml_round_trip(tmp_path):
    plan = MergePlan(models=[ModelSpec("a", 0.3, {"density": 0.4}), ModelSpec("b", 0.7)], method="ties", base="b0",
                     params={"lambda": 1.5}, dtype="bfloat16", weighting="softmax:0.5", shard_size="2GB")
    f = tmp_path / "p.yaml"
    f.write_text(plan.to_yaml())
    assert MergePlan.from_yaml(f) == plan


@pytest.mark.parametrize("metric,field,want", [("loss", None, False), ("accuracy", None, True),
                                               ("mc-accuracy", None, True), ("mc_accuracy_norm", None, True),
                                               ("loss", True, True)])
def test_selection_direction_from_the_metric_table(tmp_path, metric, field, want):
    sel = {"base": "b0", "metric": metric, "donors": [{"ref": "a", "weight": 1.0}]}
    if field is not None:
        sel["higher_is_better"] = field  # select writes it; optimize's files name the metric only
    f = tmp_path / "sel.yaml"
    f.write_text(yaml.safe_dump(sel))
    assert from_selection(f).higher_is_better is want


def test_selection_with_an_unknown_metric_names_the_file(tmp_path):
    f = tmp_path / "sel.yaml"
    f.write_text(yaml.safe_dump({"base": "b0", "metric": "bleu", "donors": [{"ref": "a"}]}))
    with pytest.raises(ConfigError, match="unknown metric 'bleu'") as e:
        from_selection(f)
    assert str(e.value.path) == str(f)


def test_mergekit_yaml_lists_every_problem(tmp_path):
    f = tmp_path / "mk.yaml"
    f.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": "b0", "dtype": "fp8", "colour": 1,
                                 "models": [{"model": "a", "parameters": {"densty": 0.5}}]}))
    with pytest.raises(ConfigError) as e:
        MergePlan.from_yaml(f)
    for bit in ("unsupported mergekit key(s) ['colour']", "dtype must be one of", "no parameter(s) ['densty']"):
        assert bit in e.value.message, e.value.message


def test_cli_config_with_several_problems_fails_at_once(tmp_path, cli):
    f = tmp_path / "plan.yaml"
    f.write_text(yaml.safe_dump({"models": ["a", "b"], "method": "tise", "dtype": "fp8", "missing": "ignore",
                                 "colour": "red"}))
    r = cli("merge", "--config", f, "--out", tmp_path / "o")
    assert r.code == 1 and "Traceback" not in r.err
    for bit in ("colour", "unknown method 'tise'", "dtype must be one of", "missing must be one of", "plan.yaml"):
        assert bit in r.err, r.err
    assert r.err.count("invalid merge plan") == 1
    assert not (tmp_path / "o").exists()


def test_parse_size_decimal_units():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="bad size"):
        parse_size("lots")
