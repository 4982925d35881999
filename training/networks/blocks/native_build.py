"""Build a C source shipped with the package into a shared library, once per machine.

The library is compiled with the system's C compiler (``$CC``, else ``cc``) for this CPU
(``-O3 -march=native``) into a cache folder (``$NAPARI_DMOE_CACHE``, else
``$XDG_CACHE_HOME/napari-dmoe`` or ``~/.cache/napari-dmoe``; subfolder ``native``), under a
name that hashes the source (and the headers beside it), the flags, the compiler's version
and the CPU: a changed
source, compiler or machine builds anew, and a cache shared between machines never loads
code built for another CPU. Writes are atomic (a temporary file renamed into place), so
processes building at once (distributed training) cannot load a torn file.

``NAPARI_DMOE_NATIVE_FLAGS`` appends compiler flags. When there is no compiler, the build
fails or ``NAPARI_DMOE_NATIVE=0`` is set,
:func:`load_library` returns None (with one warning naming the reason, unless disabled
on purpose) and callers run their pure-torch path: same results, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-std=gnu11")
"""Compiler flags (no fast-math: results must match the torch path to rounding)."""


def openmp_flags() -> tuple[str, ...]:
    """``("-fopenmp",)`` when torch runs on GNU OpenMP (its own ``libgomp.so.1``, as the
    Linux wheels): the library then shares torch's OpenMP threads (same soname, already
    loaded), which spin between torch's ops, instead of competing with them for the cores
    (2 threads: 15 -> 8 ms at the 65k-token stage). Otherwise none: the kernels then use
    POSIX threads, as a second OpenMP runtime in one process would fight the first."""
    lib = Path(torch.__file__).parent / "lib"
    return ("-fopenmp",) if any(lib.glob("libgomp*.so*")) else ()

DISABLE_VARIABLE = "NAPARI_DMOE_NATIVE"
"""Set to ``0`` (or ``off``, ``false``, ``no``) to never build or load native kernels."""

FLAGS_VARIABLE = "NAPARI_DMOE_NATIVE_FLAGS"
"""Extra compiler flags, appended (e.g. ``-march=x86-64-v3`` for a cache shared by unlike
machines, or ``-mno-avx512f`` to build the 8-lane code on an AVX-512 machine)."""

BUILD_TIMEOUT_S = 300


def native_disabled() -> bool:
    """True when ``NAPARI_DMOE_NATIVE`` turns native kernels off."""
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() in ("0", "off", "false", "no")


def cache_dir() -> Path:
    """Where built libraries are kept (see the module docstring)."""
    root = os.environ.get("NAPARI_DMOE_CACHE")
    if root:
        return Path(root) / "native"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "napari-dmoe" / "native"


def _cpu_identity() -> str:
    """Model and instruction-set flags of this CPU (what ``-march=native`` compiles for)."""
    fields = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    fields.append(line.strip())
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        pass
    return "\n".join(fields)


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown ({err})"
    return result.stdout.strip()


_NO_COMPILER_WARNED: set[str] = set()
"""Compilers already reported missing: one warning per process for all kernels."""


def forget_builds() -> None:
    """Forget the libraries loaded and the missing compilers reported: the next
    :func:`load_library` looks (and warns) afresh, e.g. after ``CC`` or the cache changed."""
    load_library.cache_clear()
    _NO_COMPILER_WARNED.clear()


def _warn(source: Path, reason: str) -> None:
    warnings.warn(
        f"napari-dmoe could not build its native kernel {source.name}: {reason}. The layer "
        "runs its pure-torch path instead (same results, slower). Install a C compiler "
        f"(e.g. apt-get install gcc) to get it, or set {DISABLE_VARIABLE}=0 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )


def _compile(compiler: str, flags: tuple[str, ...], source: Path, target: Path) -> str | None:
    """Build ``source`` into ``target`` atomically; the failure's reason, or None."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, "-o", temp, str(source)],
                                capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                                check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            return f"{compiler} exited with {result.returncode}: " + " | ".join(tail)
        os.replace(temp, target)
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return f"{compiler} failed to run ({err})"
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


@functools.cache
def load_library(source: Path) -> ctypes.CDLL | None:
    """The shared library built from ``source`` (built on first use), or None (see the
    module docstring)."""
    if native_disabled():
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        if compiler not in _NO_COMPILER_WARNED:  # the same for every kernel: said once
            _NO_COMPILER_WARNED.add(compiler)
            warnings.warn(
                f"napari-dmoe could not build its native kernels: no C compiler {compiler!r} "
                "on PATH. The dMoE layers run their pure-torch path instead (same results, "
                "slower). Install a C compiler (e.g. apt-get install gcc) to get them, or set "
                f"{DISABLE_VARIABLE}=0 to silence this.", RuntimeWarning, stacklevel=3)
        return None
    try:
        code = source.read_bytes()
    except OSError as err:
        _warn(source, f"its source could not be read ({err})")
        return None
    flags = FLAGS + openmp_flags() + tuple(shlex.split(os.environ.get(FLAGS_VARIABLE, "")))
    try:  # the headers it may include sit beside it
        headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    except OSError as err:
        _warn(source, f"a header beside it could not be read ({err})")
        return None
    key = hashlib.sha256()
    for part in (code, *headers, " ".join(flags).encode(), _compiler_version(compiler).encode(),
                 _cpu_identity().encode()):
        key.update(part)
        key.update(b"\0")
    name = f"{source.stem}-{key.hexdigest()[:20]}.so"
    folders = [cache_dir(), Path(tempfile.gettempdir()) / f"napari-dmoe-native-{os.getuid()}"
               if hasattr(os, "getuid") else Path(tempfile.gettempdir()) / "napari-dmoe-native"]
    reasons = []
    for folder in folders:
        target = folder / name
        if not target.exists():
            try:
                reason = _compile(compiler, flags, source, target)
            except OSError as err:  # folder not writable
                reason = f"{folder} is not writable ({err})"
            if reason is not None:
                reasons.append(reason)
                if "exited with" in reason:  # the code itself does not build: stop here
                    break
                continue
        try:
            return ctypes.CDLL(str(target))
        except OSError as err:
            reasons.append(f"{target} could not be loaded ({err})")
    _warn(source, "; ".join(reasons))
    return None


def load_kernel(source: Path, args_type: type[ctypes.Structure], prefix: str,
                entry_points: Sequence[str]) -> ctypes.CDLL | None:
    """:func:`load_library` for a kernel whose entry points take one ``Args *`` and return
    an int status: each is declared so, and the C ``Args`` layout (``{prefix}_args_size``)
    is checked against ``args_type``. None when the library cannot be built."""
    lib = load_library(source)
    if lib is None:
        return None
    size = getattr(lib, f"{prefix}_args_size")
    size.restype = ctypes.c_int64
    if size() != ctypes.sizeof(args_type):
        raise RuntimeError(f"{source.name}: Args layout differs between C and Python")
    for name in entry_points:
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctypes.POINTER(args_type)]
    return lib


def require_cpu(source: Path, dtype: torch.dtype, **tensors: torch.Tensor) -> None:
    """Refuse (ValueError naming the tensor) any of ``tensors`` that is not ``dtype`` on CPU:
    the kernels read raw memory through the pointers :func:`pointers` hands them."""
    want = str(dtype).removeprefix("torch.")
    for name, t in tensors.items():
        if t.dtype != dtype or t.device.type != "cpu":
            got = str(t.dtype).removeprefix("torch.")
            raise ValueError(f"{source.name}: {name} must be {want} on CPU, got {got} on "
                             f"{t.device}")


def pointers(**tensors: torch.Tensor | None) -> dict[str, int | None]:
    """Each tensor's data pointer (None stays None), for a ctypes ``Args`` struct. The
    caller keeps the tensors alive until the kernel has returned."""
    return {name: None if t is None else t.data_ptr() for name, t in tensors.items()}


def run_kernel(lib: ctypes.CDLL, source: Path, name: str, args: ctypes.Structure) -> None:
    """Call entry point ``name`` with ``args``; its status: 0 done, -1 out of memory
    (MemoryError), anything else arguments it refused (ValueError)."""
    status = getattr(lib, name)(ctypes.byref(args))
    if status == -1:
        raise MemoryError(f"{source.name}: {name} could not allocate its scratch memory")
    if status != 0:
        raise ValueError(f"{source.name}: {name} refused its arguments (status {status})")
