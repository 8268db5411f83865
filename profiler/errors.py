"""Domain errors of the profiler. The service maps them to HTTP status codes with lpnet's errors."""

from __future__ import annotations

from collections.abc import Iterable

from lpnet.errors import LpnetError


class ProfilerError(LpnetError):
    """Base of every error the profiler raises on purpose."""

    code = "profiler_error"


class UnknownBackend(ProfilerError):
    """A backend name that is not registered."""

    code = "unknown_backend"

    def __init__(self, name: str, valid: Iterable[str], available: Iterable[str] = ()) -> None:
        valid_list = sorted(valid)
        available_list = sorted(available)
        message = f"unknown backend {name!r}; valid choices: {', '.join(valid_list)}"
        if available_list:
            message += f" (usable on this machine: {', '.join(available_list)})"
        super().__init__(message, {"backend": name, "valid": valid_list, "available": available_list})
        self.name = name
        self.valid = valid_list


class BackendUnavailable(ProfilerError):
    """A registered backend that cannot run here (no GPU, missing package)."""

    code = "backend_unavailable"


class InvalidDeviceSpec(ProfilerError, ValueError):
    """A device spec with a bad field (threads, batch size, dtype, backend).

    It is also a ValueError so that pydantic turns it into a validation error when a device spec
    arrives inside a JSON document.
    """

    code = "invalid_device_spec"


class UnsupportedMeasurement(ProfilerError):
    """A measurement kind the chosen backend cannot make (e.g. per-layer timing on onnxruntime)."""

    code = "unsupported_measurement"


class UnknownFamily(ProfilerError):
    """A model family the sampler cannot build."""

    code = "unknown_family"


class InvalidBatch(ProfilerError):
    """A profile batch that fails schema validation."""

    code = "invalid_batch"

    @classmethod
    def from_validation_error(cls, exc: object) -> InvalidBatch:
        errors_fn = getattr(exc, "errors", None)
        raw = errors_fn(include_url=False) if callable(errors_fn) else []
        errors = [
            {"field": ".".join(str(p) for p in err["loc"]) or "(root)", "message": err["msg"]} for err in raw
        ]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return cls(f"invalid profile batch: {summary}", {"errors": errors})


class SinkError(ProfilerError):
    """A measurement sink that cannot store what it was given."""

    code = "sink_error"


class AllocatorPolicyUnavailable(ProfilerError):
    """This process cannot run under the allocator policy a device's measurements need."""

    code = "allocator_policy_unavailable"
