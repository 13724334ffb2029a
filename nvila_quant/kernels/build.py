"""Build native kernel libraries (C with the system compiler, CUDA with nvcc) into a cache, once.

Libraries are cached under ``$NVILA_QUANT_CACHE/kernels`` (default ``~/.cache/nvila_quant/kernels``) in a folder named
by the hash of the sources, the compiler command and the target (CPU flags or CUDA arch), so an edit or a
new machine rebuilds and concurrent processes never see a half-written file (build to a temp name, rename).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from nvila_quant.kernels.settings import kernel_settings

__all__ = ["BuildError", "build_shared_library", "cache_dir", "cpu_fingerprint"]

logger = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """A native library could not be compiled (compiler missing or failing)."""


def cache_dir() -> Path:
    return kernel_settings().cache_dir()


def cpu_fingerprint() -> str:
    """The CPU's ISA flags (``-march=native`` code is only valid on a CPU with the same flags)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}:{flags}"


def build_shared_library(
    name: str, sources: Sequence[Path], compiler: str, flags: Sequence[str], target: str, timeout: float = 600,
    depends: Sequence[Path] = (),
) -> Path:
    """Compile ``sources`` into ``<cache>/<name>-<hash>/lib<name>.so`` unless already there; return its path.
    ``depends``: headers the sources include (hashed, not compiled). A cached library needs no compiler; a failed
    build leaves its command and compiler output in ``build.log`` beside it, named in the :class:`BuildError`."""
    digest = hashlib.sha256()
    for src in (*sources, *depends):
        digest.update(Path(src).read_bytes())
    digest.update(" ".join([compiler, *flags, target]).encode())
    folder = cache_dir() / f"{name}-{digest.hexdigest()[:16]}"
    lib = folder / f"lib{name}.so"
    if lib.is_file():
        return lib
    exe = shutil.which(compiler)
    if exe is None:
        raise BuildError(f"the compiler {compiler!r} is not on PATH (needed once to build {name})")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".lib{name}-", suffix=".so", dir=folder)
    os.close(fd)
    cmd = [exe, *flags, "-o", tmp, *(str(s) for s in sources)]
    logger.info("building %s: %s", name, " ".join(cmd))
    log = folder / "build.log"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        Path(tmp).unlink(missing_ok=True)
        log.write_text(f"{' '.join(cmd)}\n{e}\n")
        raise BuildError(f"building {name} failed: {e} (log: {log})") from e
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        log.write_text(f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        raise BuildError(f"building {name} failed: {last} (full log: {log})")
    os.replace(tmp, lib)
    return lib
