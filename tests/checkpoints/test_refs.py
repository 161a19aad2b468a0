"""References: hub ids, what counts as a path, and resolving to a directory."""

from __future__ import annotations

import pytest

from warmstart.checkpoints.refs import is_hub_id, looks_like_path, resolve
from warmstart.errors import CheckpointError


@pytest.mark.parametrize("ref,hub", [("org/name", True), ("org/name@main", True), ("org/na.me-2@v1.0/x", True),
                                     ("name", False), ("a/b/c", False), ("../x/y", False), ("org/..", False),
                                     ("/abs/path", False), ("org/name@", False), ("-org/name", False)])
def test_hub_ids(ref, hub):
    assert is_hub_id(ref) is hub


def test_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_like_path("./x") and looks_like_path("~/x") and looks_like_path("plain")
    assert looks_like_path("runs/typo")  # its first component exists here: a path, not a hub id
    assert not looks_like_path("org/name")


def test_resolve_a_directory_and_refuse_a_file(tmp_path):
    assert resolve(tmp_path) == tmp_path.resolve()
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory") as e:
        resolve(f)
    assert str(f) in str(e.value)


def test_a_typo_gets_the_near_names(tmp_path):
    (tmp_path / "model_a").mkdir()
    with pytest.raises(CheckpointError) as e:
        resolve(tmp_path / "modle_a")
    assert "no such file or directory" in str(e.value) and str(tmp_path / "model_a") in str(e.value)


def test_a_missing_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the local cache"):
        resolve("no-such-org-x/no-such-model-y")
