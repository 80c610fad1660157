"""Decode attention on a CPU that reads the paged KV memory in place (csrc/paged_decode_cpu.cpp).

Why hand-written: SDPA needs each row's context gathered out of its blocks first, and on a CPU that
gather costs more than the attention (gpt2-small, 32 rows of 256 tokens, one layer, this 2-CPU machine:
gather + SDPA 6.9 ms fp32 and 15.1 ms bf16; flex attention compiled with a paged block mask 6.4 ms fp32;
this kernel 2.0 ms fp32 and 1.2 ms bf16). No maintained package offers it for the torch we run: vLLM's
CPU attention ships inside vLLM with its own torch pin, Intel's extension is Intel-only and retired.
It is one op, checked against the gathered SDPA path in tests/test_paged_decode_cpu.py.

Why built here rather than with torch.utils.cpp_extension.load: that holds a lock file in its build
directory while it runs, and an engine process killed meanwhile leaves it behind for every later start
to wait on. Here each process compiles to a file of its own and renames it into place (atomic), so a
killed build leaves nothing in the way. The library's name carries a hash of the source, the flags and
the torch version (and, when built for this CPU's own instructions, the CPU), so a change builds anew.
`python -m modelserve.engine.paged_decode_cpu` builds it ahead (`make` and the Docker image do);
MODELSERVE_KERNEL_DIR says where (default ~/.cache/modelserve/kernels). Without a compiler the engine
logs why and gathers instead.

-fopenmp because at::parallel_for is inline OpenMP: without it the op runs on one thread (measured: 12
layers 42 ms against 24 ms with both CPUs). The library needs libgomp.so.1, and the process already has
torch's own loaded under that name, so both share one OpenMP runtime and its thread pool.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode_cpu.cpp"
_FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-fPIC", "-shared"]


def _march() -> str:
    """The -march to build for: this CPU's own instructions by default (about 20% faster here than the
    baseline x86-64 build); MODELSERVE_KERNEL_MARCH="" builds for the compiler's baseline, for an image
    built on one machine and run on others."""
    return os.environ.get("MODELSERVE_KERNEL_MARCH", "native")


def _flags() -> list[str]:
    march = _march()
    return _FLAGS + ([f"-march={march}"] if march else [])


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and instruction-set flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def kernel_dir() -> Path:
    configured = os.environ.get("MODELSERVE_KERNEL_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelserve" / "kernels"


def _command(output: Path) -> list[str]:
    from torch.utils import cpp_extension  # imports setuptools (0.13 s): only when there is something to build

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    libraries = [f"-L{path}" for path in cpp_extension.library_paths()]
    return [
        os.environ.get("CXX", "c++"),
        *_flags(),
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *includes,
        str(SOURCE),
        "-o",
        str(output),
        *libraries,
        "-lc10",
        "-ltorch_cpu",
    ]


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([*_flags(), torch.__version__, str(torch._C._GLIBCXX_USE_CXX11_ABI)]).encode())
    if _march() == "native":
        digest.update(_cpu_identity().encode())
    return kernel_dir() / f"paged_decode_cpu-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the library unless it is there; its path. Raises RuntimeError saying why it could not."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=target.stem + "-", suffix=".so.tmp", dir=target.parent)
    os.close(handle)
    partial = Path(name)
    try:
        started = time.monotonic()
        try:
            done = subprocess.run(_command(partial), capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"could not run the C++ compiler: {exc}") from exc
        if done.returncode != 0:
            raise RuntimeError(f"the C++ compiler failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        partial.replace(target)
        log.info("paged decode kernel built in %.1f s: %s", time.monotonic() - started, target)
        return target
    finally:
        partial.unlink(missing_ok=True)


@cache
def load() -> str | None:
    """Load the op once per process: None when it is there (torch.ops.modelserve.paged_decode), else why not."""
    try:
        torch.ops.load_library(str(build()))  # type: ignore[no-untyped-call]
    except (RuntimeError, OSError) as exc:
        return str(exc)
    return None


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    problem = load()
    if problem is not None:
        print(f"paged decode kernel not built: {problem}", file=sys.stderr)
        print("the engine will gather each row's context for SDPA instead (slower decode on a CPU)", file=sys.stderr)
        return 0  # optional: `make` goes on without it
    print(f"paged decode kernel ready: {library_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
