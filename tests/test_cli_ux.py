"""What a new user trips over (issue 15): references, fast failures, nothing written on failure,
Ctrl-C, thread count, output polish."""

from __future__ import annotations

import pytest

from warmstart.checkpoints import looks_like_path, resolve
from warmstart.errors import CheckpointError

# -- a mistyped local path is not a hub download -----------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything reaches for the network."""
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", boom)
    real = huggingface_hub.snapshot_download

    def local_only(*a, **k):
        if not k.get("local_files_only"):
            boom()
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)


@pytest.mark.parametrize("ref,path", [("./x/model", True), ("../x", True), ("/abs/x", True), ("~/x", True),
                                      ("noslash", True), ("org/name", False), ("org/name@main", False)])
def test_looks_like_path(ref, path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(ref) is path


def test_existing_first_component_makes_a_path(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fulls" / "plurals-full").mkdir(parents=True)
    assert looks_like_path("fulls/plurals-ful")
    with pytest.raises(CheckpointError) as e:
        resolve("fulls/plurals-ful")
    msg = e.value.one_line()
    assert "no such file or directory" in msg and "fulls/plurals-full" in msg  # the near miss is suggested
    assert "hub" not in msg


def test_unknown_hub_id_offline_gives_both_readings(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError) as e:
        resolve("nonexistent/model")
    assert e.value.one_line().startswith("no local directory nonexistent/model; as a hub id: not in the local cache")


def test_unknown_hub_id_without_network_fails_after_one_probe(tmp_path, monkeypatch):
    """Online but unreachable: one metadata probe (short timeout), then both readings; no download attempt."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    probes = []

    def unreachable(self, repo_id, revision=None, timeout=None, **k):
        probes.append(timeout)
        raise ConnectionError("Name or service not known")

    real = huggingface_hub.snapshot_download

    def local_only(*a, **k):
        assert k.get("local_files_only"), "a download was attempted"
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)
    with pytest.raises(CheckpointError, match="no local directory acme/nothing; as a hub id: not in the local "
                                              "cache and no network"):
        resolve("acme/nothing")
    assert len(probes) == 1 and probes[0] is not None and probes[0] <= 10


def test_cli_mistyped_path_is_one_line(cli, models, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fulls").mkdir()
    r = cli("merge", "fulls/plurals-ful", models / "ft_b", "--out", tmp_path / "m")
    assert r.code == 1 and r.err.count("\n") == 1 and "fulls/plurals-ful: no such file or directory" in r.err
    assert not (tmp_path / "m").exists()
