"""A fingerprint of the machine and software a measurement ran on.

Everything here is read, never changed, except `retain_freed_memory`, which the caller opts into
and which the fingerprint then records: the design notes show glibc returning memory to the
kernel moves mobilenet_v2 by over 20 % between processes.

A fingerprint holds finite numbers only: it is stored as JSON, which has no NaN or infinity (SQLite
would keep a non-standard document, PostgreSQL refuses it). `collect_environment` records a value it
reads as NaN or infinite as None; `Environment` refuses one it is given, naming where it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import platform
import socket
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

_CPUINFO = Path("/proc/cpuinfo")
_GOVERNOR = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
_MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
_MEMINFO = Path("/proc/meminfo")
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "KMP_AFFINITY",
    "GOMP_CPU_AFFINITY",
)
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD")
_PACKAGES = ("torch", "torchvision", "onnxruntime", "onnx", "numpy")

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit
_allocator_retains_memory = False


def non_finite_path(value: object) -> str | None:
    """Where the first NaN or infinite float inside nested mappings and sequences is, or None.

    The path joins keys and list indices with dots (``"gpu.clocks.0"``); ``""`` is `value` itself.
    """
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return path
            continue
        if isinstance(item, Mapping):
            children = [(str(key), child) for key, child in item.items()]
        elif isinstance(item, list | tuple):
            children = [(str(index), child) for index, child in enumerate(item)]
        else:
            continue
        # Reversed onto the stack, so the first child is looked at first.
        stack.extend((f"{path}.{key}" if path else key, child) for key, child in reversed(children))
    return None


def require_finite(value: Any) -> Any:
    """`value` unchanged if every float inside it is finite (the body of a pydantic validator).

    Raises:
        ValueError: Naming the path to a NaN or infinity; JSON cannot store one.
    """
    path = non_finite_path(value)
    if path is not None:
        where = f"{path} is not a finite number" if path else "not a finite number"
        raise ValueError(f"{where}: NaN and infinity cannot be stored as JSON; send a number or null")
    return value


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinite float inside nested dicts, lists and tuples replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [finite_or_none(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


# Free-form JSON (backend settings, extra keys) that may hold only finite numbers.
FiniteJson = Annotated[Any, AfterValidator(require_finite)]


class Environment(BaseModel):
    """Machine and software state at measurement time. Pure data; extra keys are kept.

    Every number in it, extra keys and backend settings included, must be finite.
    """

    model_config = ConfigDict(frozen=True, extra="allow", allow_inf_nan=False)

    __pydantic_extra__: dict[str, FiniteJson] = Field(init=False)

    hostname: str = Field(max_length=255)
    cpu_model: str = Field(max_length=255)
    logical_cores: int = Field(ge=1)
    physical_cores: int = Field(ge=1)
    affinity_cores: int | None = None
    cpu_governor: str | None = None
    cpu_max_mhz: float | None = None
    memory_total_mb: int | None = None
    load_average: tuple[float, float, float] | None = None
    os: str
    kernel: str
    machine: str
    python: str
    packages: dict[str, str] = Field(default_factory=dict)
    torch_threads: int | None = None
    torch_interop_threads: int | None = None
    thread_env: dict[str, str] = Field(default_factory=dict)
    malloc_env: dict[str, str] = Field(default_factory=dict)
    allocator_retains_memory: bool = False
    backend_settings: dict[str, FiniteJson] = Field(default_factory=dict)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or platform's guess elsewhere."""
    text = _read(_CPUINFO) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo; the logical count if they are not listed."""
    text = _read(_CPUINFO) or ""
    cores: set[tuple[str, str]] = set()
    package = core = ""
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip():
            if core:
                cores.add((package, core))
            package = core = ""
    return len(cores) or (os.cpu_count() or 1)


def _memory_total_mb() -> int | None:
    for line in (_read(_MEMINFO) or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def retain_freed_memory() -> bool:
    """Tell glibc to keep freed memory instead of returning it to the kernel (mallopt).

    Repeated forwards then reuse the same pages rather than faulting in fresh ones, which removes
    a large part of the between-process spread. Returns whether glibc accepted the settings.
    """
    global _allocator_retains_memory
    path = ctypes.util.find_library("c")
    if path is None:
        logger.warning("libc not found; allocator left as it is")
        return False
    try:
        libc = ctypes.CDLL(path)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1 and ok
    except (OSError, AttributeError) as exc:  # not glibc (musl, macOS)
        logger.warning("mallopt unavailable (%s); allocator left as it is", exc)
        return False
    _allocator_retains_memory = ok
    return ok


def collect_environment(backend_settings: dict[str, Any] | None = None) -> Environment:
    """Read the fingerprint of this machine now (load average included).

    A number read as NaN or infinity (in the load average or `backend_settings`) is recorded as None;
    a load average with such a value is left out whole.
    """
    import torch

    try:
        load = os.getloadavg()
        load_average: tuple[float, float, float] | None = (load[0], load[1], load[2])
    except OSError:
        load_average = None
    if load_average is not None and non_finite_path(load_average) is not None:
        load_average = None
    governor = _read(_GOVERNOR)
    max_freq = _read(_MAX_FREQ)
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return Environment(
        hostname=socket.gethostname()[:255],
        cpu_model=cpu_model()[:255],
        logical_cores=os.cpu_count() or 1,
        physical_cores=physical_cores(),
        affinity_cores=affinity,
        cpu_governor=governor.strip() if governor else None,
        cpu_max_mhz=int(max_freq) / 1000
        if max_freq and max_freq.strip().isascii() and max_freq.strip().isdigit()
        else None,
        memory_total_mb=_memory_total_mb(),
        load_average=load_average,
        os=platform.system(),
        kernel=platform.release(),
        machine=platform.machine(),
        python=sys.version.split()[0],
        packages=_package_versions(),
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        thread_env={k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
        malloc_env={k: os.environ[k] for k in _MALLOC_ENV if k in os.environ},
        allocator_retains_memory=_allocator_retains_memory,
        backend_settings=finite_or_none(dict(backend_settings or {})),
    )
