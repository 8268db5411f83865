"""Predictor artifacts: safetensors bytes (never pickle) with a versioned JSON header."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from lpnet.errors import LpnetError
from lpnet.predictor.features import FEATURE_SCHEMA_VERSION, NUMERIC_FEATURES, OPS, RATE_KINDS
from lpnet.predictor.model import BASE_TERMS, LPNet, LPNetConfig
from lpnet.predictor.predict import LatencyPredictor, TrainingDomain

ARTIFACT_FORMAT = "lpnet-predictor"
# Bump when the layout of the tensors or the header changes; readers say which versions they read.
ARTIFACT_VERSION = 7
# Version 4 kept one feature range for all layers and lacks the per-kind work ranges of the training
# domain; it still loads, its range given to every rate kind, and warns without the work ranges.
# Versions 4 and 5 lack the interval's cross-validation residuals; they keep their scaled-spread
# interval (`LPNet.interval_bounds`). Versions 4 to 6 have four base rates per rate kind and no
# spill point: they load with no price for weights past it, which never applies to them.
READABLE_ARTIFACT_VERSIONS = frozenset({4, 5, 6, 7})
# The log rate a base rate that does not apply is stored with (`initial_log_rates`' floor).
_ABSENT_LOG_RATE = math.log(1e-12)


class ArtifactError(LpnetError):
    """A predictor artifact that this version of lpnet cannot read."""

    code = "predictor_artifact_unreadable"


def dump_predictor(predictor: LatencyPredictor, extra: dict[str, Any] | None = None) -> bytes:
    """Serialise a predictor to safetensors bytes; `extra` goes into the header as JSON."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in predictor.model.state_dict().items()}
    tensors["domain.feature_min"] = predictor.domain.feature_min.contiguous()
    tensors["domain.feature_max"] = predictor.domain.feature_max.contiguous()
    if predictor.domain.work_min is not None and predictor.domain.work_max is not None:
        tensors["domain.work_min"] = predictor.domain.work_min.contiguous()
        tensors["domain.work_max"] = predictor.domain.work_max.contiguous()
    header = {
        "format": ARTIFACT_FORMAT,
        "artifact_version": str(ARTIFACT_VERSION),
        "feature_schema_version": str(FEATURE_SCHEMA_VERSION),
        "features": json.dumps(list(NUMERIC_FEATURES)),
        "ops": json.dumps([op.value for op in OPS]),
        "config": json.dumps(predictor.model.config.to_dict()),
        "domain_ops": json.dumps(sorted(predictor.domain.ops)),
        "extra": json.dumps(extra or {}),
    }
    if predictor.domain.spilled_kinds is not None:
        header["domain_spilled_kinds"] = json.dumps(sorted(predictor.domain.spilled_kinds))
    return save_tensors(tensors, metadata=header)


def read_header(data: bytes) -> dict[str, str]:
    """The JSON metadata of a safetensors file, without loading its tensors."""
    if len(data) < 8:
        raise ArtifactError("predictor artifact is truncated (no safetensors header)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ArtifactError("predictor artifact is truncated (header longer than the file)")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as exc:
        raise ArtifactError(f"predictor artifact header is not JSON: {exc}") from exc
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ArtifactError("predictor artifact metadata is malformed")
    return {str(k): str(v) for k, v in metadata.items()}


def check_readable(header: dict[str, str]) -> None:
    """Refuse an artifact header of a format, version, feature schema or operator vocabulary that this
    lpnet cannot use (cheap: the tensors are not read).

    Raises:
        ArtifactError: naming what differs and what this build reads.
    """
    if header.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"not an lpnet predictor artifact (format={header.get('format')!r})")
    version = int(header.get("artifact_version", "0"))
    if version not in READABLE_ARTIFACT_VERSIONS:
        raise ArtifactError(
            f"predictor artifact version {version} cannot be read by this lpnet, which reads versions "
            f"{sorted(READABLE_ARTIFACT_VERSIONS)}; refit the predictor (lpnet fit) or upgrade lpnet",
            {"artifact_version": version, "readable": sorted(READABLE_ARTIFACT_VERSIONS)},
        )
    schema = int(header.get("feature_schema_version", "0"))
    if schema != FEATURE_SCHEMA_VERSION or json.loads(header["features"]) != list(NUMERIC_FEATURES):
        raise ArtifactError(
            f"predictor was trained on feature schema {schema}; this lpnet computes schema "
            f"{FEATURE_SCHEMA_VERSION}; refit the predictor (lpnet fit)",
            {"feature_schema_version": schema, "expected": FEATURE_SCHEMA_VERSION},
        )
    if json.loads(header["ops"]) != [op.value for op in OPS]:
        raise ArtifactError(
            "predictor was trained with a different operator vocabulary; refit it (lpnet fit)"
        )


def load_predictor(data: bytes) -> LatencyPredictor:
    """Load a predictor, checking format and versions first.

    Raises:
        ArtifactError: naming the version found and the versions this build reads.
    """
    header = read_header(data)
    check_readable(header)
    config = LPNetConfig(**json.loads(header["config"]))
    tensors = load_tensors(data)
    model = LPNet(config)
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    for name in ("feature_low", "feature_high"):
        if name in state and state[name].dim() == 1:
            # Version 4 kept one feature range for every layer: every rate kind gets it.
            state[name] = state[name].expand(len(RATE_KINDS), -1).clone()
    for name, rates in state.items():
        if name.endswith("log_rates") and rates.dim() == 2 and rates.shape[1] < BASE_TERMS:
            # Versions 4 to 6: no price per weight past the spill point.
            absent = torch.full((rates.shape[0], BASE_TERMS - rates.shape[1]), _ABSENT_LOG_RATE)
            state[name] = torch.cat([rates, absent.to(rates.dtype)], dim=1)
    if "interval_residuals" in state and "interval_member" in state:
        model.set_interval_residuals(state["interval_residuals"], state["interval_member"])
    else:
        state["interval_residuals"] = model.interval_residuals
        state["interval_member"] = model.interval_member
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"predictor tensors do not match its config: missing {missing}, unexpected {unexpected}"
        )
    domain = TrainingDomain(
        ops=set(json.loads(header["domain_ops"])),
        feature_min=tensors["domain.feature_min"],
        feature_max=tensors["domain.feature_max"],
        work_min=tensors.get("domain.work_min"),
        work_max=tensors.get("domain.work_max"),
        spilled_kinds=frozenset(json.loads(header["domain_spilled_kinds"]))
        if "domain_spilled_kinds" in header
        else None,
    )
    return LatencyPredictor(model, domain)
