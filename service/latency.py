"""Latency queries: resolve the architecture, find the device's predictor, predict.

Everything slow is cached in the process: loaded predictors by predictor id (loading deserialises
safetensors), traced torchvision architectures by (name, input shape) (tracing on the meta device
takes 0.1-4 s), tensorised networks with their channel groups by content hash (torch-pruning's
analysis takes up to a few seconds), and predictions by (predictor id, network hash), since a
predictor never changes once stored.

Torchvision names are traced in a child process (`service.tracing`): torch.fx patches module calls
for the whole process while it traces, which would break forward passes other threads of the server
run meanwhile. A torchvision name that cannot be traced (unknown, unsupported, beyond the IR's
bounds) fails the same way every time, so its error is cached like a network. At most
`MAX_CONCURRENT_TRACES` traces run at once; a request that would start another is answered 429 with
Retry-After.

A query may also ask for a per-layer bar chart of its answer (`store_latency_plot`): rendered in the
request's thread, stored for the API key that asked and served at the answer's ``plot_url`` to that
key (and admin keys) until it is older than LPNET_LATENCY_PLOT_TTL_SECONDS.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, NoReturn

import torch
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from lpnet.arch.ir import MAX_CHANNELS, Network
from lpnet.errors import InvalidWidthVector, LpnetError
from service.cache import LruCache
from service.config import Settings
from service.db.base import utcnow
from service.db.models import ApiKey, Device, KeyScope, LatencyPlot, Predictor
from service.devices import resolve_device
from service.errors import InvalidInput, NotFound, TooManyRequests
from service.predictors import current_predictor, load_predictor_artifact
from service.schemas.architectures import TorchvisionArchitecture
from service.schemas.common import PredictorRef
from service.schemas.devices import AllocatorRead
from service.schemas.latency import BatchLatencyRead, LatencyRead, LayerLatency
from service.tracing import TraceProcess, shared_trace_process

if TYPE_CHECKING:
    from lpnet.predictor.features import TensorizedNetwork
    from lpnet.predictor.predict import LatencyPredictor, Prediction

logger = logging.getLogger(__name__)

PREDICTION_CACHE_SIZE = 1024
# Traces are CPU-bound Python: more at once than the machine has cores only slows every one of them.
MAX_CONCURRENT_TRACES = 2
# A trace takes up to a few seconds: a client told the tracer is busy may retry that soon.
TRACE_RETRY_SECONDS = 2


class LatencyService:
    """Predicts latencies with per-process caches; one instance per app (or per CLI command)."""

    def __init__(
        self,
        predictor_cache_size: int = 16,
        architecture_cache_size: int = 64,
        max_width_vectors: int = 10_000,
        max_concurrent_traces: int = MAX_CONCURRENT_TRACES,
        tracer: TraceProcess | None = None,
    ) -> None:
        """Set up empty caches.

        Args:
            tracer: The child process torchvision names are traced in; the process's shared one by
                default (started on the first trace).
        """
        self.max_width_vectors = max_width_vectors
        self.predictors: LruCache[int, LatencyPredictor] = LruCache(predictor_cache_size)
        self.torchvision: LruCache[tuple[str, tuple[int, ...]], Network] = LruCache(
            architecture_cache_size, remember_errors=(LpnetError,)
        )
        self.max_concurrent_traces = max_concurrent_traces
        self.trace_slots = threading.BoundedSemaphore(max_concurrent_traces)
        self.tracer = tracer or shared_trace_process()
        self.tensorized: LruCache[str, TensorizedNetwork] = LruCache(architecture_cache_size)
        self.predictions: LruCache[tuple[int, str], Prediction] = LruCache(PREDICTION_CACHE_SIZE)
        # Serialised answers by (device id, device name, predictor id, network hash): a repeated query
        # (the common case: the same model asked about again and again) costs no model building.
        self.answers: LruCache[tuple[int, str, int, str], bytes] = LruCache(PREDICTION_CACHE_SIZE)

    @classmethod
    def from_settings(cls, settings: Settings) -> LatencyService:
        return cls(
            predictor_cache_size=settings.predictor_cache_size,
            architecture_cache_size=settings.architecture_cache_size,
            max_width_vectors=settings.max_width_vectors,
        )

    # Architectures ------------------------------------------------------------------------------

    def network(self, architecture: Network | TorchvisionArchitecture) -> Network:
        """The IR of an architecture given as IR or as a torchvision name and input shape.

        Raises:
            UnknownModel: No such torchvision model.
            UnsupportedOperator: The model uses an operator the IR cannot represent.
            ArchitectureTooLarge: The traced network is beyond one of the IR's bounds.
            TooManyRequests: `max_concurrent_traces` traces are running already.
            TracerUnavailable: The trace child died or overran its timeout (not cached).
        """
        if isinstance(architecture, Network):
            return architecture
        key = (architecture.torchvision, tuple(architecture.input_shape))
        return self.torchvision.get_or_compute(key, lambda: self._trace(architecture))

    def _trace(self, architecture: TorchvisionArchitecture) -> Network:
        if not self.trace_slots.acquire(blocking=False):
            raise TooManyRequests(
                f"the server is tracing {self.max_concurrent_traces} models already; retry in "
                f"{TRACE_RETRY_SECONDS} s",
                {
                    "model": architecture.torchvision,
                    "max_concurrent_traces": self.max_concurrent_traces,
                    "retry_after_seconds": TRACE_RETRY_SECONDS,
                },
                headers={"Retry-After": str(TRACE_RETRY_SECONDS)},
            )
        try:
            return self.tracer.trace(architecture.torchvision, architecture.input_shape)
        finally:
            self.trace_slots.release()

    def network_from_onnx(self, data: bytes, name: str | None, batch_size: int = 1) -> Network:
        """The IR of an ONNX file (not cached: uploads rarely repeat); a symbolic batch is `batch_size`."""
        from lpnet.arch.onnx_io import network_from_onnx

        return network_from_onnx(data, name=name, batch_size=batch_size)

    def tensorized_with_groups(self, network: Network) -> TensorizedNetwork:
        """The network's tensor view with channel groups, for width vectors."""
        from lpnet.arch.groups import layout_key
        from lpnet.predictor.features import tensorize

        return self.tensorized.get_or_compute(layout_key(network), lambda: tensorize(network))

    # Predictors ---------------------------------------------------------------------------------

    def predictor(self, session: Session, predictor_id: int) -> LatencyPredictor:
        """The loaded predictor `predictor_id` (deserialised once per process)."""
        return self.predictors.get_or_compute(
            predictor_id, lambda: load_predictor_artifact(session, predictor_id)
        )

    def prediction(self, session: Session, predictor: Predictor, network: Network) -> Prediction:
        """`predictor`'s prediction for `network` (cached: predictors never change once stored)."""
        model = self.predictor(session, predictor.id)
        return self.predictions.get_or_compute(
            (predictor.id, network.content_hash), lambda: model.predict(network)
        )

    # Queries ------------------------------------------------------------------------------------

    def predict_json(
        self, session: Session, device_ref: int | str, architecture: Network | TorchvisionArchitecture
    ) -> bytes:
        """Latency of one architecture on a device as JSON (a `LatencyRead`), cached per device,
        predictor and network.

        Raises:
            NotFound: Unknown device.
            NoPredictor: The device has no predictor yet.
            LpnetError: The architecture cannot be traced or predicted.
        """
        device = resolve_device(session, device_ref)
        predictor = current_predictor(session, device)
        network = self.network(architecture)
        key = (device.id, device.name, predictor.id, network.content_hash)
        return self.answers.get_or_compute(
            key, lambda: self.predict_network(session, device, predictor, network).model_dump_json().encode()
        )

    def predict(
        self, session: Session, device_ref: int | str, architecture: Network | TorchvisionArchitecture
    ) -> LatencyRead:
        """Latency of one architecture on a device, as `predict_json` answers it but not serialised.

        Raises:
            NotFound: Unknown device.
            NoPredictor: The device has no predictor yet.
            LpnetError: The architecture cannot be traced or predicted.
        """
        device = resolve_device(session, device_ref)
        predictor = current_predictor(session, device)
        return self.predict_network(session, device, predictor, self.network(architecture))

    def predict_onnx(
        self, session: Session, device_ref: int | str, data: bytes, name: str | None
    ) -> LatencyRead:
        """Latency of an uploaded ONNX model on a device."""
        device = resolve_device(session, device_ref)
        predictor = current_predictor(session, device)
        return self.predict_network(
            session, device, predictor, self.network_from_onnx(data, name, device.batch_size)
        )

    def predict_network(
        self, session: Session, device: Device, predictor: Predictor, network: Network
    ) -> LatencyRead:
        prediction = self.prediction(session, predictor, network)
        return LatencyRead(
            device_id=device.id,
            device=device.name,
            allocator=AllocatorRead.of(device.allocator),
            predictor=PredictorRef(id=predictor.id, version=predictor.version),
            network_name=network.name,
            network_hash=network.content_hash,
            total_ms=prediction.total_ms,
            low_ms=prediction.low_ms,
            high_ms=prediction.high_ms,
            overhead_ms=prediction.overhead_ms,
            per_layer=[LayerLatency(name=p.name, op=p.op, ms=p.ms) for p in prediction.per_layer],
            warnings=list(prediction.warnings),
        )

    def predict_batch(
        self,
        session: Session,
        device_ref: int | str,
        architecture: Network | TorchvisionArchitecture,
        widths: list[list[int]],
    ) -> BatchLatencyRead:
        """Latencies of many width vectors of one architecture on a device.

        Raises:
            InvalidInput: More width vectors than the server allows.
            InvalidWidthVector: A vector does not fit the network's channel groups (the first one
                that does not is named).
        """
        if len(widths) > self.max_width_vectors:
            raise InvalidInput(
                f"{len(widths)} width vectors in one request; at most {self.max_width_vectors} "
                "(LPNET_MAX_WIDTH_VECTORS): split the request",
                {"count": len(widths), "max": self.max_width_vectors},
            )
        device = resolve_device(session, device_ref)
        predictor = current_predictor(session, device)
        network = self.network(architecture)
        tn = self.tensorized_with_groups(network)
        batch = _validated_widths(network, tn, widths)
        model = self.predictor(session, predictor.id)
        result = model.predict_widths(tn, batch)
        return BatchLatencyRead(
            device_id=device.id,
            device=device.name,
            allocator=AllocatorRead.of(device.allocator),
            predictor=PredictorRef(id=predictor.id, version=predictor.version),
            network_hash=network.content_hash,
            group_channels=[int(c) for c in tn.full_widths.tolist()],
            count=len(widths),
            total_ms=result.total_ms.tolist(),
            low_ms=result.low_ms.tolist(),
            high_ms=result.high_ms.tolist(),
        )


def store_latency_plot(session: Session, answer: LatencyRead, key: ApiKey, ttl_seconds: float) -> LatencyRead:
    """Render the per-layer bar chart of `answer`, keep it for `key`, and return the answer with the
    chart's ``plot_url``; plots older than `ttl_seconds` are deleted first (the caller commits)."""
    from lpnet.gates.chart import latency_bar_chart

    png = latency_bar_chart(
        [(layer.name, layer.ms) for layer in answer.per_layer],
        network=answer.network_name or answer.network_hash[:12],
        total_ms=answer.total_ms,
        low_ms=answer.low_ms,
        high_ms=answer.high_ms,
        device=answer.device,
    )
    now = utcnow()
    session.execute(delete(LatencyPlot).where(LatencyPlot.created_at < now - timedelta(seconds=ttl_seconds)))
    plot = LatencyPlot(id=uuid.uuid4().hex, key_id=key.id, png=png, created_at=now)
    session.add(plot)
    session.flush()
    return answer.model_copy(update={"plot_url": latency_plot_url(plot.id)})


def latency_plot_url(plot_id: str) -> str:
    """Where a stored latency plot is served."""
    return f"/v1/latency/plots/{plot_id}.png"


def latency_plot_png(session: Session, plot_id: str, key: ApiKey, ttl_seconds: float) -> bytes:
    """The PNG of latency plot `plot_id`, for the key it was made for or an admin key.

    Raises:
        NotFound: No such plot, it is older than `ttl_seconds`, or it is another key's and `key` is not
            an admin key (answered alike, so a key learns nothing of other keys' plots).
    """
    query = select(LatencyPlot.png).where(
        LatencyPlot.id == plot_id, LatencyPlot.created_at >= utcnow() - timedelta(seconds=ttl_seconds)
    )
    if key.scope != KeyScope.ADMIN:
        query = query.where(LatencyPlot.key_id == key.id)
    png = session.scalar(query)
    if png is None:
        raise NotFound(
            f"no latency plot {plot_id} for API key {key.prefix}: plots are kept for the key that asked for "
            f'{ttl_seconds:g} s (LPNET_LATENCY_PLOT_TTL_SECONDS); ask POST /v1/latency with "plot": true '
            "again for a new one",
            {"plot_id": plot_id},
        )
    return png


def _validated_widths(network: Network, tn: TensorizedNetwork, widths: list[list[int]]) -> torch.Tensor:
    """Width vectors as a (B, G) tensor, checked against the groups in one vectorised pass.

    The error for a bad vector comes from `ChannelLayout.validate`, the one place that words it.
    """
    groups = tn.num_groups
    lengths = {len(vector) for vector in widths}
    if lengths != {groups}:
        index = next(i for i, vector in enumerate(widths) if len(vector) != groups)
        _raise_for(network, index, widths[index])
    try:
        batch = torch.tensor(widths, dtype=torch.float64)  # (B, G); exact for any channel count
    except OverflowError:  # an entry beyond any float, let alone any channel count
        index = next(i for i, vector in enumerate(widths) if any(abs(v) > MAX_CHANNELS for v in vector))
        _raise_for(network, index, widths[index])
    full = tn.full_widths.to(torch.float64)  # (G,)
    divisors = tn.group_divisors.to(torch.float64)  # (G,)
    bad = (batch < divisors) | (batch > full) | (torch.remainder(batch, divisors) != 0)  # (B, G)
    if bool(bad.any()):
        index = int(bad.any(dim=1).nonzero()[0, 0])
        _raise_for(network, index, widths[index])
    return batch.to(torch.float32)


def _raise_for(network: Network, index: int, vector: list[int]) -> NoReturn:
    from lpnet.arch.groups import channel_layout

    try:
        channel_layout(network).validate(vector)
    except InvalidWidthVector as exc:
        raise InvalidWidthVector(f"widths[{index}]: {exc.message}", {"index": index, **exc.details}) from exc
    raise InvalidWidthVector(f"widths[{index}] does not fit the network's channel groups", {"index": index})
