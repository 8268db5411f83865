"""The public Python API: build a network, load a predictor, predict, plan and prune, with no server.

Every function here is a thin entry point over the library's own builders, predictor and planner:

- `network`: a torchvision name, an nn.Module and its input shape, ONNX bytes or an ``.onnx`` file,
  or the IR as JSON (a dict, a string, bytes or a ``.json`` file) -> `lpnet.arch.ir.Network`.
- `load_predictor`: a predictor artifact (``lpnet fit`` writes one) -> `LatencyPredictor`.
- `latency`: a network's predicted total, interval and per-layer times (`Prediction`).
- `plan`: per-group widths meeting a latency budget (`lpnet.gates.planner.plan`).
- `prune`: the physically pruned nn.Module of a plan (`lpnet.pruning.prune_module`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lpnet.arch.from_torch import DEFAULT_INPUT_SHAPE, network_from_module, network_from_torchvision
from lpnet.arch.ir import Network
from lpnet.arch.onnx_io import network_from_onnx
from lpnet.errors import InvalidArchitecture, InvalidPlanOptions, PruningFailed
from lpnet.gates.options import PlanMode
from lpnet.gates.planner import PlanOptions
from lpnet.gates.planner import plan as plan_widths
from lpnet.gates.result import PlanResult
from lpnet.measurement import MeasureFn
from lpnet.predictor.artifact import load_predictor as load_predictor_bytes
from lpnet.predictor.predict import LatencyPredictor, Prediction
from lpnet.pruning import ir_state_dict, prune_module

NetworkSource = str | bytes | os.PathLike[str] | Mapping[str, Any] | nn.Module | Network
"""Anything `network` accepts."""

_PLAN_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(PlanOptions) if f.name != "mode")


def network(
    source: NetworkSource,
    *,
    input_shape: Sequence[int] | None = None,
    name: str | None = None,
    batch_size: int = 1,
) -> Network:
    """The IR of a network, from whichever form it comes in.

    Args:
        source: One of
            - a torchvision classification model name, e.g. ``"resnet50"`` (traced on the meta
              device: nothing is allocated at the model's size);
            - an ``nn.Module`` (``input_shape`` required), traced with torch.fx;
            - ONNX bytes, or a path (``str`` ending in ``.onnx`` or a path-like) to an ONNX file;
            - the IR as JSON: a dict, a JSON string or bytes, or a path to a ``.json`` file;
            - a `Network`, returned as it is (renamed when ``name`` is given).
        input_shape: ``(N, C, H, W)``, or ``(C, H, W)`` with ``N = batch_size``. Required for a
            module; for a torchvision name it defaults to ``(batch_size, 3, 224, 224)``.
        name: The network's name (defaults to the model name, the graph name or the JSON's name).
        batch_size: The batch of a ``(C, H, W)`` shape, and of a symbolic batch in an ONNX file.

    Raises:
        InvalidArchitecture: The source cannot be read as a network (the message says why).
        UnknownModel: No torchvision model of that name.
        UnsupportedOperator: The module or graph uses an operator the IR cannot represent.
        TypeError: A source of none of the kinds above.
    """
    built = _build_network(source, input_shape, name, batch_size)
    if name is not None and built.name != name:
        built = Network.model_validate({**built.model_dump(), "name": name})
    return built


def _build_network(
    source: NetworkSource, input_shape: Sequence[int] | None, name: str | None, batch_size: int
) -> Network:
    if isinstance(source, Network):
        return source
    if isinstance(source, nn.Module):
        if input_shape is None:
            raise InvalidArchitecture(
                "lpnet.network(module) needs input_shape=(N, C, H, W) or (C, H, W) to trace the module"
            )
        return network_from_module(source, _full_shape(input_shape, batch_size), name=name)
    if isinstance(source, Mapping):
        return Network.from_dict(dict(source))
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if _looks_like_json(data):
            return Network.from_json(data)
        return network_from_onnx(data, name=name, batch_size=batch_size)
    if isinstance(source, os.PathLike):
        return _network_from_file(Path(source), name, batch_size)
    if isinstance(source, str):
        if _looks_like_json(source.encode()):
            return Network.from_json(source)
        if source.lower().endswith((".onnx", ".json")) or os.sep in source or "/" in source:
            return _network_from_file(Path(source), name, batch_size)
        shape = DEFAULT_INPUT_SHAPE[1:] if input_shape is None else input_shape
        return network_from_torchvision(source, _full_shape(shape, batch_size))
    raise TypeError(
        f"lpnet.network cannot read a {type(source).__name__}: pass a torchvision name, an nn.Module "
        "with input_shape, ONNX bytes, a path to an .onnx or .json file, or the IR as a dict or JSON"
    )


def _network_from_file(path: Path, name: str | None, batch_size: int) -> Network:
    """A network from an ``.onnx`` or ``.json`` file on the caller's own machine."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArchitecture(f"cannot read network file {str(path)!r}: {exc.strerror or exc}") from exc
    if path.suffix.lower() == ".json" or (path.suffix.lower() != ".onnx" and _looks_like_json(data)):
        return Network.from_json(data)
    return network_from_onnx(data, name=name or path.stem, batch_size=batch_size)


def _looks_like_json(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"


def _full_shape(shape: Sequence[int], batch_size: int) -> tuple[int, ...]:
    values = tuple(int(v) for v in shape)
    if len(values) == 3:
        return (batch_size, *values)
    if len(values) != 4:
        raise InvalidArchitecture(
            f"input_shape must be (N, C, H, W) or (C, H, W), got {list(values)}",
            {"input_shape": list(values)},
        )
    return values


def load_predictor(source: str | os.PathLike[str] | bytes) -> LatencyPredictor:
    """Load a fitted latency predictor from a safetensors artifact (a path, or its bytes).

    Raises:
        ArtifactError: The file is not a predictor artifact, or one of a version this lpnet cannot read
            (the message says which versions it reads).
        OSError: The file cannot be read.
    """
    data = bytes(source) if isinstance(source, bytes | bytearray) else Path(source).read_bytes()
    return load_predictor_bytes(data)


def latency(net: Network, predictor: LatencyPredictor) -> Prediction:
    """The predicted latency of `net`: ``total_ms``, the interval ``low_ms``..``high_ms``, ``per_layer``
    times (name, op, ms), the framework overhead and any extrapolation warnings."""
    return predictor.predict(net)


def plan(
    net: Network,
    predictor: LatencyPredictor,
    budget_ms: float,
    *,
    mode: str | None = None,
    weights: nn.Module | Mapping[str, torch.Tensor] | None = None,
    measure: MeasureFn | None = None,
    **options: Any,
) -> PlanResult:
    """Plan per-group widths so that `net` meets `budget_ms` on the predictor's device.

    Args:
        net: The unpruned network.
        predictor: A predictor fitted on the target device.
        budget_ms: The latency budget (ms).
        mode: ``"architecture-only"`` (or ``"architecture"``) or ``"weights"``; by default
            ``"weights"`` when weights are given, else ``"architecture-only"``.
        weights: The trained module `net` was built from, or its IR-keyed state dict
            (``"<layer>.<tensor>"``, a torchvision state dict as it is): the weights mode also picks
            which filters stay.
        measure: Measures a network in ms on the device; turns on the plan-and-measure verification.
        options: Fields of `lpnet.gates.planner.PlanOptions` (``round_to``, ``min_keep_ratio``,
            ``steps``, ``safety_margin``, ``max_rounds``, ``seed``, ...).

    Raises:
        InvalidPlanOptions: An unknown option or mode, or options the planner refuses.
        BudgetInfeasible: The budget is below the latency of the narrowest network.
        NoPrunableGroups: Nothing in the network can be pruned.
        WeightsMismatch: Weights that do not fit the network.
    """
    unknown = sorted(set(options) - set(_PLAN_OPTION_NAMES))
    if unknown:
        raise InvalidPlanOptions(
            f"unknown plan option(s) {', '.join(unknown)}; the options are {', '.join(_PLAN_OPTION_NAMES)}",
            {"unknown": unknown},
        )
    plan_options = PlanOptions(mode=None if mode is None else PlanMode.named(mode), **options)
    state = ir_state_dict(weights, net) if isinstance(weights, nn.Module) else weights
    return plan_widths(net, predictor, budget_ms, plan_options, weights=state, measure=measure)


def prune(module: nn.Module, plan: PlanResult, *, selection: str = "l1") -> nn.Module:
    """A physically pruned copy of `module` with the plan's widths (`module` itself is left as it is).

    The module is traced at the plan's input shape and must compute the network the plan was made for.
    A weights-mode plan names the filters that stay; otherwise `selection` picks them: ``"l1"`` keeps
    the largest filters, ``"first"`` the first ones.

    Raises:
        PruningFailed: The module is not the planned network, or the pruned module does not match the plan.
    """
    traced = network_from_module(module, plan.pruned_network.input_shape)
    if traced.content_hash != plan.network_hash:
        raise PruningFailed(
            "the module does not compute the network this plan was made for (its architecture hash "
            f"{traced.content_hash[:12]} differs from the plan's {plan.network_hash[:12]}); pass the "
            "module the planned network was built from",
            {"module_hash": traced.content_hash, "plan_hash": plan.network_hash},
        )
    return prune_module(module, traced, plan.widths, plan.kept_indices, selection).module
