"""A profiling run's options, its sampler, and the run itself into any sink.

The standalone agent (`profiler.agent.standalone`), the agent's campaigns and the service's
`lpnet profile` command all build their runs from these pieces; the two commands read their flags
into options with `options_from_args`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from profiler.batch import MeasurementKind
from profiler.device import DeviceSpec, local_device_spec
from profiler.environment import DEFAULT_SECONDS_PER_PROCESS, AllocatorPolicy
from profiler.protocol import TimingProtocol
from profiler.runner import RunSummary, run_profile
from profiler.sampling import DEFAULT_FAMILIES, SamplingConfig, StratifiedSampler
from profiler.sinks import MeasurementSink


@dataclass
class AgentOptions:
    """Everything a profiling run needs besides the sink."""

    families: list[str] = field(default_factory=lambda: list(DEFAULT_FAMILIES))
    kinds: list[MeasurementKind] = field(default_factory=lambda: list(MeasurementKind))
    backend: str = "torch-cpu"
    threads: int = 1
    batch_size: int = 1
    dtype: str = "float32"
    hardware: str | None = None
    image_size: int = 224
    budget_minutes: float | None = None
    network_samples: int | None = None
    in_context_samples: int | None = None
    isolated_samples: int | None = None
    seed: int = 0
    quick_protocol: bool = False
    # The device's allocator policy: the process is put under it (`apply_allocator_policy`) before the
    # run's context is fingerprinted.
    allocator: AllocatorPolicy = AllocatorPolicy.RETAIN
    # Measure in child processes replaced after this many seconds (profiler.recycling); None: in this one.
    seconds_per_process: float | None = DEFAULT_SECONDS_PER_PROCESS
    progress: bool = True

    def device(self) -> DeviceSpec:
        spec = local_device_spec(self.backend, self.threads, self.batch_size, self.dtype)
        if self.hardware:
            spec = DeviceSpec(self.hardware, self.backend, self.threads, self.batch_size, self.dtype)
        return spec

    def protocol(self) -> TimingProtocol:
        """Quick when asked; under a time budget, the budgeted protocol (more samples, each less precise)."""
        if self.quick_protocol:
            return TimingProtocol.quick()
        return TimingProtocol() if self.budget_minutes is None else TimingProtocol.budgeted()

    def sampling_config(self) -> SamplingConfig:
        """Per-family counts as given; unset ones default to SamplingConfig's, or unbounded under a budget."""
        base = SamplingConfig.for_budget() if self.budget_minutes is not None else SamplingConfig()
        return SamplingConfig(
            kinds=tuple(self.kinds),
            seed=self.seed,
            network_samples=_given_or(self.network_samples, base.network_samples),
            in_context_samples=_given_or(self.in_context_samples, base.in_context_samples),
            isolated_samples=_given_or(self.isolated_samples, base.isolated_samples),
        )


def _given_or(value: int | None, default: int) -> int:
    return default if value is None else value


def options_from_args(args: argparse.Namespace) -> AgentOptions:
    """The options a profiling command's flags give.

    `python -m profiler.agent.standalone` and `lpnet profile` define the same flags: `--families` and
    `--kinds` (comma-separated names; unset: `DEFAULT_FAMILIES` and every kind), the device spec
    (`--backend`, `--threads`, `--batch-size`, `--dtype`, `--hardware`, and `--allocator`, unset:
    retain), the per-family counts, `--image-size`, `--budget-minutes`, `--seed`, `--quick` and
    `--no-progress`.

    Raises:
        ValueError: an unknown kind, or a list of families or kinds with no name in it.
    """
    families = list(DEFAULT_FAMILIES) if args.families is None else _names(args.families, "families")
    kinds = list(MeasurementKind) if args.kinds is None else [_kind(k) for k in _names(args.kinds, "kinds")]
    return AgentOptions(
        families=families,
        kinds=kinds,
        backend=args.backend,
        threads=args.threads,
        batch_size=args.batch_size,
        dtype=args.dtype,
        hardware=args.hardware,
        image_size=args.image_size,
        budget_minutes=args.budget_minutes,
        network_samples=args.network_samples,
        in_context_samples=args.in_context_samples,
        isolated_samples=args.isolated_samples,
        seed=args.seed,
        quick_protocol=args.quick,
        allocator=AllocatorPolicy(args.allocator or AllocatorPolicy.RETAIN),
        seconds_per_process=args.seconds_per_process or None,
        progress=not args.no_progress,
    )


def _names(text: str, what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"no {what} in {text!r}: give comma-separated names")
    return names


def _kind(name: str) -> MeasurementKind:
    try:
        return MeasurementKind(name)
    except ValueError:
        known = ", ".join(kind.value for kind in MeasurementKind)
        raise ValueError(f"unknown kind {name!r}; choose from {known}") from None


def build_sampler(options: AgentOptions, device: DeviceSpec) -> StratifiedSampler:
    """The stratified sampler over the requested families (unsupported ones are skipped)."""
    size = options.image_size
    return StratifiedSampler.for_families(
        options.families, device, options.sampling_config(), (1, 3, size, size)
    )


def run_agent(options: AgentOptions, sink: MeasurementSink) -> RunSummary:
    """Profile with `options` into `sink` (not closed here), in a process under `options.allocator`."""
    device = options.device()
    backend = device.create_backend()
    sampler = build_sampler(options, device)
    return run_profile(
        device,
        sampler,
        sink,
        options.protocol(),
        budget_minutes=options.budget_minutes,
        progress=options.progress,
        backend=backend,
        seconds_per_process=options.seconds_per_process,
    )
