"""Latency measurement for lpnet: backends, timing protocol, samplers, sinks and the run loop.

The service builds its `lpnet profile` command and database sink from these names.
"""

from profiler.backends import Backend, Runnable, available_backends, get_backend, registered_backends
from profiler.batch import LayerTime, Measurement, MeasurementKind, ProfileBatch, RunContext
from profiler.budget import BudgetPlanner
from profiler.device import DeviceSpec, local_device_spec
from profiler.environment import Environment, collect_environment
from profiler.protocol import TimingProtocol, TimingResult
from profiler.runner import RunSummary, make_run_context, run_profile
from profiler.sampling import (
    DEFAULT_FAMILIES,
    ListSampler,
    Sample,
    Sampler,
    SamplingConfig,
    StratifiedSampler,
)
from profiler.sinks import HttpSink, JsonlSink, MeasurementSink, MemorySink, read_jsonl
from profiler.tasks import measure_in_context, measure_layer, measure_network, measure_sample

__all__ = [
    "DEFAULT_FAMILIES",
    "Backend",
    "BudgetPlanner",
    "DeviceSpec",
    "Environment",
    "HttpSink",
    "JsonlSink",
    "LayerTime",
    "ListSampler",
    "Measurement",
    "MeasurementKind",
    "MeasurementSink",
    "MemorySink",
    "ProfileBatch",
    "RunContext",
    "RunSummary",
    "Runnable",
    "Sample",
    "Sampler",
    "SamplingConfig",
    "StratifiedSampler",
    "TimingProtocol",
    "TimingResult",
    "available_backends",
    "collect_environment",
    "get_backend",
    "local_device_spec",
    "make_run_context",
    "measure_in_context",
    "measure_layer",
    "measure_network",
    "measure_sample",
    "read_jsonl",
    "registered_backends",
    "run_profile",
]
