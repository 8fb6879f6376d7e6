"""llama.cpp's command-line tools (llama-imatrix, llama-quantize, llama-perplexity) for the opt-in `llamacpp`
tests. The llama-cpp-python wheel ships only the shared library, so the tools are built once from the llama.cpp
tree vendored in the llama-cpp-python source distribution, into ~/.cache/herd/llama.cpp-tools/.

Tests never download: they call `llamacpp_tools()`, which returns the built tools or skips. Build them once with

    python tests/llamacpp_tools.py            # fetches the llama-cpp-python sdist with pip, then cmake (slow)

or point HERD_LLAMACPP_SRC at an unpacked llama.cpp source tree to build from it instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the version in the venv: tools and bindings share one llama.cpp commit
TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")
CACHE = Path(os.environ.get("HERD_LLAMACPP_TOOLS", Path.home() / ".cache" / "herd" / "llama.cpp-tools"))


def tool_paths(cache: Path = CACHE) -> dict[str, Path]:
    return {name: cache / "bin" / name for name in TOOLS}


def llamacpp_tools() -> dict[str, Path]:
    """{tool name: path} when built; otherwise skips the calling test with the command that builds them."""
    import pytest

    paths = tool_paths()
    missing = [n for n, p in paths.items() if not p.is_file()]
    if missing:
        pytest.skip(f"llama.cpp tools not built ({', '.join(missing)}): run `python tests/llamacpp_tools.py`")
    return paths


def _fetch_source(workdir: Path) -> Path:
    """Unpack the llama-cpp-python sdist (downloaded with pip) and return its vendored llama.cpp tree."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    "--dest", str(workdir), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], check=True)
    (sdist,) = workdir.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    (tree,) = workdir.glob("llama_cpp_python-*/vendor/llama.cpp")
    return tree


def build_llamacpp_tools(cache: Path = CACHE, jobs: int = 2) -> dict[str, Path]:
    """Build the tools once (a no-op when they exist); the binaries are linked statically to ggml so the
    cache directory is all they need."""
    paths = tool_paths(cache)
    if all(p.is_file() for p in paths.values()):
        return paths
    with tempfile.TemporaryDirectory(prefix="herd-llamacpp-") as tmp:
        work = Path(tmp)
        src = Path(os.environ["HERD_LLAMACPP_SRC"]) if os.environ.get("HERD_LLAMACPP_SRC") else _fetch_source(work)
        build = work / "build"
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
        subprocess.run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs),
                        "--target", *TOOLS], check=True)
        staging = cache.with_name(cache.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "bin").mkdir(parents=True)
        for name in TOOLS:
            shutil.copy2(build / "bin" / name, staging / "bin" / name)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(staging, cache)  # all three tools appear at once, never a half-built set
    return paths


if __name__ == "__main__":
    for tool, path in build_llamacpp_tools().items():
        print(f"{tool}: {path}")
