"""A fingerprint of the machine and software a measurement ran on, and the allocator policy it ran under.

Everything here is read, never changed, except the allocator policy (`apply_allocator_policy`), which
the caller opts into and which the fingerprint then records. The policy is part of what a latency
means: glibc returning freed memory to the kernel moves mobilenet_v2 by over 20 % between processes,
and a memory-heavy network measured 4.4-5.0 ms with glibc's default and 1.8 ms with freed memory kept.

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
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from profiler.errors import AllocatorPolicyUnavailable

logger = logging.getLogger(__name__)

_CPUINFO = Path("/proc/cpuinfo")
_GOVERNOR = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
_MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
_MEMINFO = Path("/proc/meminfo")
_CPU0_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_SIZE_UNITS = {"K": 1, "M": 1024, "G": 1024 * 1024}
# The environment the process started with, which is what glibc read its allocator settings from.
_STARTUP_ENVIRON = Path("/proc/self/environ")
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
_MMAP_THRESHOLD_MAX = 32 * 2**20  # mallopt's ceiling on 64-bit
_TRIM_THRESHOLD = 2**30
_allocator_retains_memory = False


class AllocatorPolicy(StrEnum):
    """How the C library's allocator treats memory a process frees; a device's latencies hold under one."""

    # Freed memory kept by the process: glibc's mmap threshold at its ceiling, trim threshold 1 GiB.
    RETAIN = "retain"
    # The C library's default: large blocks mapped and unmapped, the heap's top returned to the kernel.
    SYSTEM = "system"


# Profiles measure in child processes replaced after this many seconds (profiler.recycling): a
# process that has timed networks for a while runs them slower than the fresh process a label, a
# verification or a deployment runs in. Kept here, free of torch, so that command lines and settings
# can state the default before anything heavy is imported.
DEFAULT_SECONDS_PER_PROCESS = 10.0

# The environment variables that put any process under a policy without code, set before it starts
# (glibc's aliases of its tunables glibc.malloc.mmap_threshold and glibc.malloc.trim_threshold).
ALLOCATOR_ENVIRONMENT: Mapping[AllocatorPolicy, Mapping[str, str]] = MappingProxyType(
    {
        AllocatorPolicy.RETAIN: MappingProxyType(
            {
                "MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD_MAX),
                "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD),
            }
        ),
        AllocatorPolicy.SYSTEM: MappingProxyType({}),
    }
)


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
    # Model name, family, model, stepping and cache size (`cpu_signature`); None where not read.
    cpu_signature: str | None = Field(default=None, max_length=255)
    logical_cores: int = Field(ge=1)
    physical_cores: int = Field(ge=1)
    affinity_cores: int | None = None
    cpu_governor: str | None = None
    cpu_max_mhz: float | None = None
    memory_total_mb: int | None = None
    # The largest data or unified cache of the first core (the last level on most CPUs), in KiB;
    # None where sysfs does not list it. Layers whose weights do not fit in it read them from memory.
    last_level_cache_kb: int | None = None
    # The block size (KiB) past which the C library maps every allocation afresh from the kernel
    # (`fresh_mapping_kb`); None where not known. A convolution whose weights are larger pays page
    # faults for their reordered copy on every call.
    fresh_mapping_kb: int | None = None
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
    # Whether the process kept freed memory: the allocator policy the measurements hold under.
    allocator_retains_memory: bool = False
    backend_settings: dict[str, FiniteJson] = Field(default_factory=dict)

    @property
    def allocator_policy(self) -> AllocatorPolicy:
        """The allocator policy the process ran under."""
        return AllocatorPolicy.RETAIN if self.allocator_retains_memory else AllocatorPolicy.SYSTEM


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


def cpu_signature() -> str:
    """The CPU as latencies depend on it: the first processor's model name, family, model, stepping and
    cache size in /proc/cpuinfo, joined by " / "; the model name alone where those are not listed.

    The model name is not enough: two machines that both report "AMD EPYC", of different
    generations, timed the same networks 25-63 % apart.
    """
    text = _read(_CPUINFO) or ""
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    details = [fields.get(key, "") for key in ("cpu family", "model", "stepping", "cache size")]
    if not any(details):
        return cpu_model()
    return " / ".join([cpu_model(), *details])


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


def last_level_cache_kb(caches: Path | None = None) -> int | None:
    """The size (KiB) of the highest-level data or unified cache the first core sees, from sysfs
    (`caches`: a directory of index*/ entries with level, type and size); None where none is listed."""
    best: tuple[int, int] | None = None
    for index in sorted((caches or _CPU0_CACHES).glob("index*")):
        level, kind, size = (_read(index / name) for name in ("level", "type", "size"))
        if level is None or kind is None or size is None or kind.strip() == "Instruction":
            continue
        text = size.strip()
        digits, unit = (text[:-1], text[-1]) if text[-1:] in _SIZE_UNITS else (text, "K")
        if not (level.strip().isdigit() and digits.isdigit()):
            continue
        entry = (int(level), int(digits) * _SIZE_UNITS[unit])
        best = entry if best is None else max(best, entry)
    return None if best is None else best[1]


def fresh_mapping_kb(environ: Mapping[str, str] | None = None) -> int | None:
    """The block size (KiB) past which this process's C library maps every allocation afresh from the
    kernel and unmaps it when freed, however much freed memory the process holds: glibc's mmap
    threshold rises no higher than `_MMAP_THRESHOLD_MAX` (32 MiB on 64-bit) unless the process started
    with a larger MALLOC_MMAP_THRESHOLD_ (`environ`: the start-up environment). None for another C
    library, whose policy is not known here.

    oneDNN copies a convolution's weights into its own layout on every call, into a block the size of
    the weights: past this size every call page-faults the copy in (wide_resnet50_2's three 36 MB
    3x3 convolutions: 27,651 page faults a forward, 9,216 per layer, on a machine with a 480 MB L3).
    """
    if not _is_glibc():
        return None
    configured = _configured_mmap_threshold(_startup_environment() if environ is None else environ)
    return max(configured, _MMAP_THRESHOLD_MAX) // 1024


def _configured_mmap_threshold(environ: Mapping[str, str]) -> int:
    """The mmap threshold (bytes) `environ` starts glibc with; 0 where it sets none."""
    try:
        return int(environ.get("MALLOC_MMAP_THRESHOLD_", ""), 0)
    except ValueError:
        return 0


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
    a large part of the between-process spread. A larger mmap threshold the process started with
    (MALLOC_MMAP_THRESHOLD_) is kept: mallopt cannot set one past `_MMAP_THRESHOLD_MAX`, and would
    lower it. Returns whether glibc accepted the settings.
    """
    global _allocator_retains_memory
    path = ctypes.util.find_library("c")
    if path is None:
        logger.warning("libc not found; allocator left as it is")
        return False
    try:
        libc = ctypes.CDLL(path)
        started_higher = _configured_mmap_threshold(_startup_environment()) > _MMAP_THRESHOLD_MAX
        ok = started_higher or libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError) as exc:  # not glibc (musl, macOS)
        logger.warning("mallopt unavailable (%s); allocator left as it is", exc)
        return False
    _allocator_retains_memory = ok
    return ok


def _startup_environment() -> Mapping[str, str]:
    """The variables this process started with (os.environ where /proc does not tell)."""
    try:
        raw = _STARTUP_ENVIRON.read_bytes()
    except OSError:
        return os.environ
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw.split(b"\0") if entry)
    return {name: value for name, _, value in pairs}


def _is_glibc() -> bool:
    """Whether the C library is glibc, the one that reads `ALLOCATOR_ENVIRONMENT`'s variables."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # no such name: not glibc
        return False


def _retains_by_environment(environ: Mapping[str, str]) -> bool:
    """Whether glibc started with at least `ALLOCATOR_ENVIRONMENT`'s retain thresholds.

    From the environment glibc takes an mmap threshold above the 32 MiB that mallopt is limited to;
    a larger threshold keeps even more.
    """
    try:
        trim_threshold = int(environ.get("MALLOC_TRIM_THRESHOLD_", ""), 0)
    except ValueError:
        return False
    mmap_threshold = _configured_mmap_threshold(environ)
    return _is_glibc() and mmap_threshold >= _MMAP_THRESHOLD_MAX and trim_threshold >= _TRIM_THRESHOLD


def process_allocator_policy() -> AllocatorPolicy:
    """The allocator policy this process runs under.

    ``retain`` once `retain_freed_memory` set it, or when the process started with the variables of
    `ALLOCATOR_ENVIRONMENT` (glibc reads them at start-up only); ``system`` otherwise.
    """
    if _allocator_retains_memory or _retains_by_environment(_startup_environment()):
        return AllocatorPolicy.RETAIN
    return AllocatorPolicy.SYSTEM


def apply_allocator_policy(policy: AllocatorPolicy) -> None:
    """Put this process under `policy` from now on: before measuring, and before fingerprinting.

    ``retain`` sets the mallopt thresholds (`retain_freed_memory`). ``system`` changes nothing and holds
    only in a process that does not keep freed memory already: glibc's settings cannot be reliably
    undone (once its mmap threshold is set, glibc stops adapting it for good).

    Raises:
        AllocatorPolicyUnavailable: ``retain`` where glibc's mallopt is missing or refused the settings,
            or ``system`` in a process that keeps freed memory already.
    """
    if policy == AllocatorPolicy.RETAIN:
        if not retain_freed_memory():
            raise AllocatorPolicyUnavailable(
                "this process cannot keep freed memory (allocator policy 'retain' needs glibc's mallopt); "
                "measure here for a device registered with allocator 'system'",
                {"wanted": AllocatorPolicy.RETAIN.value, "process": process_allocator_policy().value},
            )
        return
    if process_allocator_policy() is AllocatorPolicy.RETAIN:
        variables = ", ".join(ALLOCATOR_ENVIRONMENT[AllocatorPolicy.RETAIN])
        raise AllocatorPolicyUnavailable(
            "the device's allocator policy is 'system', but this process keeps freed memory already "
            "('retain'), which cannot be undone; measure in a fresh process started without "
            f"{variables}, or in one that measured no 'retain' device before",
            {"wanted": AllocatorPolicy.SYSTEM.value, "process": AllocatorPolicy.RETAIN.value},
        )


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
        cpu_signature=cpu_signature()[:255],
        logical_cores=os.cpu_count() or 1,
        physical_cores=physical_cores(),
        affinity_cores=affinity,
        cpu_governor=governor.strip() if governor else None,
        cpu_max_mhz=int(max_freq) / 1000
        if max_freq and max_freq.strip().isascii() and max_freq.strip().isdigit()
        else None,
        memory_total_mb=_memory_total_mb(),
        last_level_cache_kb=last_level_cache_kb(),
        fresh_mapping_kb=fresh_mapping_kb(),
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
        allocator_retains_memory=process_allocator_policy() is AllocatorPolicy.RETAIN,
        backend_settings=finite_or_none(dict(backend_settings or {})),
    )
