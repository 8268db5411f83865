"""Weight-dependent gates (W-Gates): filter scores computed from the filters' own weights.

Each prunable channel group gets one `WeightGate`: a small MLP applied to every output filter of the
group (its weights, flattened and concatenated across the coupled layers) giving one score per
channel. Scores are binarised to {0, 1} in the forward pass; the backward pass uses the derivative of
a sigmoid as a straight-through estimator, so the task loss and the latency loss both reach the MLP.

`GateSet` holds the gates of a whole network and applies them to a module with forward hooks: every
channel of a group is multiplied by its gate after each layer that produces it (after the BatchNorm
that follows a conv, so the BN shift cannot leak a "removed" channel). With these gate points a gated
module computes exactly what the physically pruned module computes (tests check it), and the kept
count of a group is the sum of its gates: a tensor LPNet can differentiate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lpnet.arch.groups import ChannelLayout, channel_layout
from lpnet.arch.ir import Network, Op
from lpnet.errors import NoPrunableGroups
from lpnet.pruning import layer_modules

logger = logging.getLogger(__name__)

_GATEABLE_OPS = frozenset({Op.CONV2D, Op.LINEAR, Op.BATCHNORM2D})


@dataclass(frozen=True)
class WGateConfig:
    """Shape and initialisation of the gate networks.

    Attributes:
        hidden: hidden units of each gate MLP.
        max_filter_dim: filters longer than this (C_in * k * k) are pooled to this length per layer.
        init_score: initial mean score of the filters; positive, so gates start mostly open.
        init_spread: standard deviation of the initial scores across filters (random head weights),
            so the filters of a group do not all cross zero at the same step.
        score_spread: standard deviation the scores of a group's filters are rescaled to around
            their mean (0 leaves them raw). The MLP's mean output sets how many filters stay, its
            deviations which ones; without the rescaling, filters of one group score nearly alike
            and a whole group switches off within a few steps.
        temperature: slope of the sigmoid whose derivative the straight-through estimator uses.
        noise: scale of the logistic noise added to scores while the gate set is in training mode.
            The output-matching loss is flat at the unpruned network (its gradient is zero there);
            only by seeing channels dropped at random does it learn which ones matter (the same reason
            hard-concrete and Gumbel gates sample). Evaluation mode is deterministic.
        magnitude_prior: initial weight of a learnt term on each filter's log L2 norm (standardised
            across its group) added to the MLP's score, so the gates start by ranking filters as
            magnitude pruning does and training moves them from there; 0 leaves the score to the
            MLP alone, whose random initialisation ranks filters at random.
    """

    hidden: int = 32
    max_filter_dim: int = 128
    init_score: float = 2.0
    init_spread: float = 0.5
    score_spread: float = 1.5
    temperature: float = 1.0
    noise: float = 1.0
    magnitude_prior: float = 0.0


class _BinarizeSTE(torch.autograd.Function):
    """Forward: 1 where score > 0 else 0. Backward: the derivative of sigmoid(score / T)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return (scores > 0).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scores,) = ctx.saved_tensors
        sig = torch.sigmoid(scores / ctx.temperature)
        return grad * sig * (1 - sig) / ctx.temperature, None


def binarize(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hard 0/1 gates from scores, with a sigmoid straight-through gradient."""
    out: torch.Tensor = _BinarizeSTE.apply(scores, temperature)
    return out


def top_k_gates(scores: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """Gates (C,) open on the `k` highest scores, with the gradient of sigmoid((score - t) / T).

    t is the midpoint between the k-th and (k+1)-th scores, so a filter near the cut gets the
    largest gradient: the task loss moves it in or out of the kept set, and the MLP learns from
    the weights which filters earn their place. The count itself does not move.
    """
    k = max(0, min(k, scores.numel()))
    if k == scores.numel():
        soft = torch.sigmoid(scores / temperature)
        return soft - soft.detach() + 1.0
    ordered, order = torch.sort(scores.detach(), descending=True)
    threshold = 0.5 * (ordered[k - 1] + ordered[k]) if k > 0 else ordered[0] + 1.0
    soft = torch.sigmoid((scores - threshold) / temperature)  # (C,)
    hard = torch.zeros_like(scores)
    hard[order[:k]] = 1.0
    return hard + soft - soft.detach()


def filter_vectors(weights: Sequence[torch.Tensor], max_dim: int) -> torch.Tensor:
    """Per-filter input of a gate: (C, D) from the weights (C, ...) of a group's coupled layers.

    Each layer's weights are scaled by their layer-wide standard deviation (so one MLP works across
    initialisations while filters keep their relative magnitudes). Filters longer than `max_dim` are
    average-pooled: half of the length from the signed weights and half from their absolute values,
    because signed averages cancel and would hide a filter's magnitude.
    """
    parts = []
    for weight in weights:
        flat = weight.detach().flatten(1).float()  # (C, K)
        flat = flat / flat.std().clamp_min(1e-8)
        if flat.shape[1] > max_dim:
            half = max(1, max_dim // 2)
            signed = F.adaptive_avg_pool1d(flat[:, None, :], half)[:, 0, :]  # (C, half)
            magnitude = F.adaptive_avg_pool1d(flat.abs()[:, None, :], max_dim - half)[:, 0, :]
            flat = torch.cat([signed, magnitude], dim=1)  # (C, max_dim)
        parts.append(flat)
    return torch.cat(parts, dim=1)  # (C, D)


class WeightGate(nn.Module):
    """Scores the filters of one channel group from their weights with a shared MLP."""

    def __init__(self, in_dim: int, config: WGateConfig) -> None:
        super().__init__()
        self.temperature = config.temperature
        self.spread = config.score_spread
        self.body = nn.Sequential(nn.Linear(in_dim, config.hidden), nn.ReLU())
        self.head = nn.Linear(config.hidden, 1)
        self.magnitude = (
            nn.Parameter(torch.tensor(float(config.magnitude_prior))) if config.magnitude_prior else None
        )
        # Scale the head so the initial scores spread by about `init_spread` (the body's ReLU outputs
        # have a second moment of roughly half their fan-in-normalised input's).
        with torch.no_grad():
            self.head.weight.normal_(0.0, config.init_spread * (2.0 / config.hidden) ** 0.5)
            self.head.bias.fill_(config.init_score)

    def scores(self, filters: torch.Tensor) -> torch.Tensor:
        """Scores (C,) of filters (C, D)."""
        raw = self.head(self.body(filters)).squeeze(-1)  # (C,)
        if self.magnitude is not None and raw.numel() > 1:
            log_norm = filters.norm(dim=1).clamp_min(1e-8).log()  # (C,)
            raw = raw + self.magnitude * (log_norm - log_norm.mean()) / log_norm.std().clamp_min(1e-6)
        if self.spread <= 0 or raw.numel() < 2:
            return raw
        # Keep the spread across a group's filters fixed: the group's count then moves smoothly
        # with the mean score, instead of every gate of a group flipping within a few steps.
        mean = raw.mean()
        return mean + self.spread * (raw - mean) / raw.std().clamp_min(1e-6)

    def forward(self, filters: torch.Tensor) -> torch.Tensor:
        """Binary gates (C,) with a straight-through gradient."""
        return binarize(self.scores(filters), self.temperature)


def gate_points(network: Network, layout: ChannelLayout | None = None) -> list[list[str]]:
    """Per group, the layers after which its gates multiply the output.

    A gate point is a conv, linear or batch-norm layer whose output channels are exactly the group's
    channels; a conv or linear whose only consumer is a batch norm is skipped in favour of that batch
    norm, because gating before a BN would leave the BN's shift in a removed channel.
    """
    layout = layout or channel_layout(network)
    points: list[list[str]] = [[] for _ in layout.groups]
    for layer in network.layers:
        if layer.op not in _GATEABLE_OPS:
            continue
        expr = layout.out_expr[layer.name]
        if expr.constant != 0 or len(expr.terms) != 1 or expr.terms[0][1] != 1:
            continue
        users = network.consumers[layer.name]
        if (
            layer.op is not Op.BATCHNORM2D
            and len(users) == 1
            and network.by_name[users[0]].op is Op.BATCHNORM2D
        ):
            continue
        points[expr.terms[0][0]].append(layer.name)
    return points


class GateSet(nn.Module):
    """One `WeightGate` per prunable group of a network, applied to a module by forward hooks.

    Args:
        module: the module whose weights the gates read and whose outputs they gate.
        network: its IR.
        config: gate network settings.
        track_weights: recompute filter vectors at every forward (the weights are being trained);
            otherwise they are computed once (frozen weights, the data-free mode).
        min_kept: per group, how many of the highest-scoring filters always stay open (default 1).
    """

    def __init__(
        self,
        module: nn.Module,
        network: Network,
        config: WGateConfig | None = None,
        track_weights: bool = False,
        min_kept: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config or WGateConfig()
        self.layout = channel_layout(network)
        if not self.layout.groups:
            raise NoPrunableGroups(
                f"network {network.name or network.content_hash[:12]!r} has no prunable channel groups"
            )
        self.track_weights = track_weights
        # Current scale of the training-mode noise; the train mode anneals it to zero.
        self.noise_scale = self.config.noise
        self.min_kept = list(min_kept) if min_kept is not None else [1] * len(self.layout.groups)
        modules = layer_modules(module, network)
        self._group_weights: list[list[torch.Tensor]] = [
            [modules[name].weight for name in group.out_layers]  # type: ignore[misc]
            for group in self.layout.groups
        ]
        self._filters = [filter_vectors(ws, self.config.max_filter_dim) for ws in self._group_weights]
        self.gates = nn.ModuleList(WeightGate(int(f.shape[1]), self.config) for f in self._filters)
        self.points = gate_points(network, self.layout)
        self._point_modules = [[modules[name] for name in names] for names in self.points]
        self.current: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # Per group, how many gates are open when the counts are set from outside (`set_counts`);
        # None lets each gate's score decide on its own.
        self.fixed_counts: list[int] | None = None

    @property
    def num_groups(self) -> int:
        return len(self.gates)

    def filters(self) -> list[torch.Tensor]:
        """Per-group filter vectors (C_g, D_g), recomputed when the weights are tracked."""
        if self.track_weights:
            self._filters = [filter_vectors(ws, self.config.max_filter_dim) for ws in self._group_weights]
        return self._filters

    def scores(self) -> list[torch.Tensor]:
        """Per-group filter scores (C_g,)."""
        return [gate.scores(f) for gate, f in zip(self._gate_list(), self.filters(), strict=True)]

    def set_counts(self, counts: Sequence[int] | None) -> None:
        """Open exactly `counts[g]` gates of group g, the highest-scoring ones (None: scores decide)."""
        if counts is not None and len(counts) != self.num_groups:
            raise ValueError(f"{len(counts)} counts for {self.num_groups} channel groups")
        self.fixed_counts = [int(c) for c in counts] if counts is not None else None

    def compute(self) -> list[torch.Tensor]:
        """Compute (and keep, for the hooks) the binary gates (C_g,) of every group.

        In training mode the scores get logistic noise. The `min_kept` highest-scoring filters of a
        group are always on (value 1, gradient unchanged): a group with no channel left would cut
        the network in two and leave every gate before it without a gradient. With `fixed_counts`
        the top-k scores of each group are open (`top_k_gates`).
        """
        gates = []
        for g, scores in enumerate(self.scores()):
            if self.training and self.noise_scale > 0:
                u = torch.rand_like(scores).clamp(1e-6, 1 - 1e-6)
                scores = scores + self.noise_scale * (torch.log(u) - torch.log1p(-u))  # logistic noise
            if self.fixed_counts is not None:
                gates.append(top_k_gates(scores, self.fixed_counts[g], self.config.temperature))
                continue
            gate = binarize(scores, self.config.temperature)  # (C,)
            floor = min(self.min_kept[g], gate.numel())
            if floor > 0:
                top = torch.zeros_like(gate, dtype=torch.bool)
                top[torch.topk(scores.detach(), floor).indices] = True
                gate = torch.where(top, gate - gate.detach() + 1.0, gate)
            gates.append(gate)
        self.current = gates
        return self.current

    def kept_counts(self) -> torch.Tensor:
        """Kept channels per group (G,) from the gates of the last forward; differentiable."""
        if not self.current:
            self.compute()
        return torch.stack([g.sum() for g in self.current])  # (G,)

    def expected_counts(self, scores: Sequence[torch.Tensor] | None = None) -> list[float]:
        """Kept channels per group the training-mode gates keep on average, at least `min_kept`.

        With logistic noise of scale b (`noise_scale`) a gate is open with probability
        sigmoid(score / b); the latency constraint was enforced on these noisy gates, so their
        expectation (not the deterministic threshold) is the count the optimisation settled on. With
        the noise annealed to zero it is the deterministic count.
        """
        with torch.no_grad():
            scores = list(scores) if scores is not None else self.scores()
            counts = []
            for s, floor in zip(scores, self.min_kept, strict=True):
                if self.noise_scale > 0:
                    kept = float(torch.sigmoid(s / self.noise_scale).sum())
                else:
                    kept = float((s > 0).sum())
                counts.append(max(kept, float(min(floor, s.numel()))))
        return counts

    def _gate_list(self) -> list[WeightGate]:
        return [g for g in self.gates if isinstance(g, WeightGate)]

    @contextmanager
    def attached(self, module: nn.Module) -> Iterator[GateSet]:
        """Gate `module` while the context is open: each forward recomputes the gates first."""

        def refresh(_module: nn.Module, _inputs: Any) -> None:
            self.compute()

        self._handles.append(module.register_forward_pre_hook(refresh))
        for g, modules in enumerate(self._point_modules):
            for point in modules:
                self._handles.append(point.register_forward_hook(self._make_hook(g)))
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def _make_hook(self, group: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            gate = self.current[group]  # (C,)
            shape = (1, gate.shape[0]) + (1,) * (output.dim() - 2)
            return output * gate.view(shape)  # (N, C, ...) channels switched on or off

        return hook
