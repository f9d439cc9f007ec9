"""llama.cpp, the CPU peer of `bench.py long` and `bench.py serve`.

Built once from the copy of llama.cpp vendored in the llama-cpp-python sdist (`pip download --no-binary :all:`,
then cmake; about 10 minutes on 2 cores) into $TINYLORA_CACHE/llama.cpp/VERSION (default ~/.cache/tinylora).
Its Python conversion requirements are not installed (they pin another torch): `convert_lora_to_gguf.py`
runs on this venv's torch, transformers and the gguf-py it ships.

The model llama.cpp runs is the embedded default's own Q4_K_M GGUF requantized to F32 (`llama-quantize
--allow-requantize`): the same dequantized weights tinylora runs in fp32; or to BF16, those weights rounded as
tinylora rounds them for `--dtype bf16`. Adapters reach it as LoRA GGUFs:
`tinylora export` (exact rank-2 PEFT LoRA), then llama.cpp's `convert_lora_to_gguf.py`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tinylora.cache import cache_root
from tinylora.embedded import ensure_embedded, join_and_verify, lookup

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors llama.cpp
TOOLS = ("llama-server", "llama-batched-bench", "llama-quantize")


def home() -> Path:
    return cache_root() / "llama.cpp" / VERSION


def source() -> Path:
    """llama.cpp's source tree, from the sdist (downloaded once)."""
    src = home() / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={VERSION}", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        src.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"), src)
    return src


def binaries() -> Path:
    """The folder holding llama-server, llama-batched-bench and llama-quantize, built on first use."""
    build = home() / "build"
    bin_dir = build / "bin"
    if all((bin_dir / t).is_file() for t in TOOLS):
        return bin_dir
    src = source()
    print(f"building llama.cpp {VERSION} (once, about 10 minutes on 2 cores) in {build}", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DGGML_NATIVE=ON"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(os.cpu_count() or 2)],
                   check=True)
    return bin_dir


def model_gguf(model: str, kind: str = "F32") -> Path:
    """The embedded model `model` as an F32 or BF16 GGUF (made once)."""
    if not model.startswith("embedded:"):
        raise SystemExit(f"the llama.cpp peer runs an embedded model (its GGUF), not {model!r}")
    entry = lookup(model)
    out = home() / "models" / f"{entry.name}-{kind.lower()}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        q4 = join_and_verify(entry, Path(tmp) / "q4_k_m.gguf")
        part = Path(tmp) / "out.gguf"
        subprocess.run([str(binaries() / "llama-quantize"), "--allow-requantize", str(q4), str(part), kind],
                       check=True, stdout=subprocess.DEVNULL)
        os.replace(part, out)
    return out


def lora_gguf(peft_dir: Path, model: str, out: Path) -> Path:
    """A PEFT LoRA folder (from `tinylora export`) as a llama.cpp LoRA GGUF in F32."""
    base = ensure_embedded(model)  # config.json and tokenizer for the converter
    subprocess.run([sys.executable, str(source() / "convert_lora_to_gguf.py"), "--base", str(base),
                    "--outtype", "f32", "--outfile", str(out), str(peft_dir)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out
