"""LPNet: a layer-level latency network whose per-layer predictions plus a learned overhead sum to
the network latency. An ensemble of members gives an interval."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from lpnet.predictor.features import NUMERIC_FEATURES, OPS, TensorizedNetwork, channel_basis

# Channel counts are packed into 16-bit fields of one int64 key by the fast batch path.
_CHANNEL_BITS = 16
# Below this many (vector, layer) rows the plain batched path is faster than deduplication.
_GENERAL_PATH_ROWS = 20_000


@dataclass(frozen=True)
class LPNetConfig:
    """Shape of each member and of the ensemble."""

    hidden: int = 64
    depth: int = 1
    op_embedding: int = 8
    members: int = 5

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class LayerLatencyMLP(nn.Module):
    """One ensemble member: per-layer log-latency from op type and numeric features."""

    first: nn.Linear
    head: nn.Linear

    def __init__(self, config: LPNetConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(OPS), config.op_embedding)
        self.first = nn.Linear(len(NUMERIC_FEATURES) + config.op_embedding, config.hidden)
        deeper: list[nn.Module] = []
        for _ in range(config.depth - 1):
            deeper += [nn.SiLU(), nn.Linear(config.hidden, config.hidden)]
        self.deeper = nn.Sequential(*deeper)
        self.head = nn.Linear(config.hidden, 1)
        # Per-node framework overhead (ms) by op, and a per-network constant: the part of a
        # network's latency that its layers, timed in context, do not account for.
        self.node_overhead = nn.Parameter(torch.zeros(len(OPS)))
        self.network_overhead = nn.Parameter(torch.zeros(()))

    def layer_log_ms(self, features: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Per-layer log-milliseconds; features (..., F) normalised, ops (...,) -> (...)."""
        x = torch.cat([features, self.embed(ops)], dim=-1)  # (..., F + E)
        hidden = self.deeper(self.first(x))
        return self.head(torch.nn.functional.silu(hidden)).squeeze(-1)

    def overhead_ms(self, ops: torch.Tensor) -> torch.Tensor:
        """Per-layer share of the framework overhead (...,) in ms."""
        return self.node_overhead[ops]


class LPNet(nn.Module):
    """An ensemble of LayerLatencyMLP members sharing one feature normalisation."""

    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    interval_scale: torch.Tensor
    layer_log_ms_bounds: torch.Tensor

    def __init__(self, config: LPNetConfig) -> None:
        super().__init__()
        self.config = config
        self._members = nn.ModuleList(LayerLatencyMLP(config) for _ in range(config.members))
        self.register_buffer("feature_mean", torch.zeros(len(NUMERIC_FEATURES)))
        self.register_buffer("feature_std", torch.ones(len(NUMERIC_FEATURES)))
        # Multiplier on the ensemble's log-space spread so intervals reach their stated coverage.
        self.register_buffer("interval_scale", torch.tensor(2.0))
        # Per-layer log-ms predictions are clamped to a margin around what training saw: far from
        # its data an exponential output can otherwise explode by orders of magnitude.
        self.register_buffer("layer_log_ms_bounds", torch.tensor([-30.0, 30.0]))

    def bounded(self, layer_log_ms: torch.Tensor) -> torch.Tensor:
        return layer_log_ms.clamp(float(self.layer_log_ms_bounds[0]), float(self.layer_log_ms_bounds[1]))

    @property
    def members(self) -> list[LayerLatencyMLP]:
        return [m for m in self._members if isinstance(m, LayerLatencyMLP)]

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_std

    def member_layer_ms(self, features: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Per-layer ms of every member: features (B, L, F) raw, ops (L,) -> (K, B, L)."""
        x = self.normalise(features)
        if self.config.depth == 1:
            return torch.exp(self.bounded(self._stacked_layer_log_ms(x, ops)))
        ops_b = ops.expand(x.shape[:-1])
        return torch.stack([torch.exp(self.bounded(m.layer_log_ms(x, ops_b))) for m in self.members])

    def _stacked_layer_log_ms(self, x: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """`layer_log_ms` of every one-hidden-layer member at once: x (B, L, F) normalised -> (K, B, L).

        The same arithmetic as the members one by one, as a few batched products instead of five
        small forwards each: what keeps one prediction of a new network within a couple of ms.
        """
        members = self.members
        n_feat = x.shape[-1]
        weight = torch.stack([m.first.weight for m in members])  # (K, H, F + E)
        embedded = torch.stack([m.embed(ops) for m in members])  # (K, L, E)
        per_layer = torch.einsum("kle,khe->klh", embedded, weight[:, :, n_feat:])  # (K, L, H)
        per_layer = per_layer + torch.stack([m.first.bias for m in members])[:, None, :]
        hidden = torch.einsum("blf,khf->kblh", x, weight[:, :, :n_feat]) + per_layer[:, None]  # (K, B, L, H)
        head = torch.stack([m.head.weight[0] for m in members])  # (K, H)
        bias = torch.stack([m.head.bias[0] for m in members])  # (K,)
        return torch.einsum("kblh,kh->kbl", torch.nn.functional.silu(hidden), head) + bias[:, None, None]

    def member_overhead_ms(self, ops: torch.Tensor) -> torch.Tensor:
        """Network overhead of every member for a layer list (L,) -> (K,)."""
        return torch.stack([m.overhead_ms(ops).sum() + m.network_overhead for m in self.members])

    def member_network_ms(self, features: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Network ms of every member: (K, B). Differentiable with respect to the features."""
        layer_ms = self.member_layer_ms(features, ops)  # (K, B, L)
        return layer_ms.sum(-1) + self.member_overhead_ms(ops)[:, None]

    def batch_network_ms(self, tn: TensorizedNetwork, widths: torch.Tensor) -> torch.Tensor:
        """Network ms of every member for many integer width vectors (B, G) -> (K, B), no gradient.

        Each layer's latency depends only on its (input, output) channel counts, so it is computed
        once per distinct (layer, in, out) triple; with one hidden layer the first layer's
        pre-activation splits into an input-channel part and an output-channel part, each computed
        once per distinct (layer, count) pair. Exact, and much faster than the general path.
        """
        in_c, out_c = tn.channels(widths)  # (B, L)
        in_i = in_c.round().long()
        out_i = out_c.round().long()
        limit = 1 << _CHANNEL_BITS
        small = widths.shape[0] * tn.num_layers <= _GENERAL_PATH_ROWS
        if small or self.config.depth != 1 or int(in_i.max()) >= limit or int(out_i.max()) >= limit:
            with torch.no_grad():
                return self.member_network_ms(tn.features_from_channels(in_i.float(), out_i.float()), tn.ops)
        batch, num_layers = in_i.shape
        layer = torch.arange(num_layers).expand(batch, num_layers)
        keys = (layer << (2 * _CHANNEL_BITS)) | (in_i << _CHANNEL_BITS) | out_i  # (B, L)
        triples, triple_of = torch.unique(keys.reshape(-1), return_inverse=True)  # (U,), (B*L,)
        u_layer = triples >> (2 * _CHANNEL_BITS)
        u_in = (triples >> _CHANNEL_BITS) & (limit - 1)
        u_out = triples & (limit - 1)
        # (U, 2K): basis of each triple's input and output counts. Triples come sorted by layer.
        basis = torch.cat([channel_basis(u_in.float()), channel_basis(u_out.float())], dim=-1)
        rows_per_layer = torch.bincount(u_layer, minlength=num_layers).tolist()
        basis_by_layer = torch.split(basis, rows_per_layer)
        inv_std = 1.0 / self.feature_std
        n_feat = len(NUMERIC_FEATURES)
        coef = torch.cat([tn.in_coef, tn.out_coef], dim=-1)  # (L, F, 2K)
        results = []
        with torch.no_grad():
            for member in self.members:
                w_feat = member.first.weight[:, :n_feat] * inv_std  # (H, F): normalisation folded in
                w_emb = member.first.weight[:, n_feat:]  # (H, E)
                base = (tn.const - self.feature_mean) @ w_feat.T + member.embed(tn.ops) @ w_emb.T
                base = base + member.first.bias  # (L, H)
                per_layer_map = torch.einsum("hf,lfk->lkh", w_feat, coef)  # (L, 2K, H)
                # First layer of the MLP, layer by layer: a (rows, 2K) @ (2K, H) product each.
                pre = torch.cat(
                    [
                        torch.addmm(base[i], rows, per_layer_map[i])
                        for i, rows in enumerate(basis_by_layer)
                        if len(rows)
                    ]
                )  # (U, H)
                layer_log = member.head(torch.nn.functional.silu(pre, inplace=True)).squeeze(-1)  # (U,)
                layer_ms = torch.exp(self.bounded(layer_log))
                results.append(layer_ms[triple_of].reshape(batch, num_layers).sum(-1))  # (B,)
            return torch.stack(results) + self.member_overhead_ms(tn.ops)[:, None]
