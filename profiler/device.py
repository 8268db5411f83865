"""What a measurement was taken on: hardware, backend and the settings that change latency."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from profiler.backends.base import DTYPES, Backend, get_backend, registered_backends
from profiler.errors import InvalidDeviceSpec

_HARDWARE_PATTERN = re.compile(r"^[\w .:@()+/,-]{1,200}$")
MAX_BATCH_SIZE = 4096
MAX_THREADS = 1024


@dataclass(frozen=True)
class DeviceSpec:
    """A device as measured: hardware name, backend, thread count, batch size and dtype.

    Validation here is machine-independent (the service validates specs from other machines);
    whether `threads` fits this machine is checked when the backend is built.
    """

    hardware: str
    backend: str = "torch-cpu"
    threads: int = 1
    batch_size: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.hardware, str) or not _HARDWARE_PATTERN.match(self.hardware):
            raise InvalidDeviceSpec(
                f"hardware {self.hardware!r} must be 1-200 characters of letters, digits, spaces and ._:@()+/,-",
                {"field": "hardware", "value": self.hardware},
            )
        if self.backend not in registered_backends():
            raise InvalidDeviceSpec(
                f"unknown backend {self.backend!r}; valid choices: {', '.join(registered_backends())}",
                {"field": "backend", "value": self.backend, "valid": registered_backends()},
            )
        for field, upper in (("threads", MAX_THREADS), ("batch_size", MAX_BATCH_SIZE)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
                raise InvalidDeviceSpec(
                    f"{field}={value!r} must be an integer in 1..{upper}",
                    {"field": field, "value": value, "min": 1, "max": upper},
                )
        if self.dtype not in DTYPES:
            raise InvalidDeviceSpec(
                f"dtype {self.dtype!r} is not supported; valid choices: {', '.join(DTYPES)}",
                {"field": "dtype", "value": self.dtype, "valid": list(DTYPES)},
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> str:
        """A stable hash of every field; part of each sample key."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def create_backend(self, **options: Any) -> Backend:
        """Instantiate this spec's backend, checking threads and dtype against this machine."""
        return get_backend(self.backend, threads=self.threads, dtype=self.dtype, **options)


def local_device_spec(
    backend: str = "torch-cpu", threads: int = 1, batch_size: int = 1, dtype: str = "float32"
) -> DeviceSpec:
    """A spec named after this machine's CPU model (/proc/cpuinfo), or its GPU for CUDA backends."""
    from profiler.environment import cpu_model

    name = cpu_model()
    if backend == "torch-cuda":
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
    hardware = re.sub(r"[^\w .:@()+/,-]", "", name)[:200].strip() or "unknown-cpu"
    return DeviceSpec(hardware=hardware, backend=backend, threads=threads, batch_size=batch_size, dtype=dtype)
