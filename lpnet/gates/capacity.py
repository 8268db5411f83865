"""The capacity proxy the planner keeps as large as the latency budget allows.

    capacity(w) = sum over conv and linear layers l of  log MACs_l(w) - log MACs_l(full)

i.e. the log of each layer's remaining share of its compute, summed. It is 0 for the unpruned network
and negative otherwise. The log makes it concave: halving one layer costs log 2 whatever its size,
so the optimiser spreads a cut over many layers instead of gutting one (a layer at 10 % width is a
bottleneck for every layer after it), and it buys capacity where LPNet says latency is cheap. Its
derivative for group g is (number of layer ends in g) / w_g: groups read or written by many layers
are worth more per channel. Without weights this is the best a planner can say about accuracy;
with weights, the W-Gates' output-matching loss replaces it during optimisation, and it only breaks
ties when widths are rounded.
"""

from __future__ import annotations

import torch

from lpnet.arch.ir import Network, Op
from lpnet.predictor.features import TensorizedNetwork


class CapacityProxy:
    """Differentiable capacity of width vectors (B, G) -> (B,) for one tensorised network.

    Only `tn.channels` (the width -> channel-count map) is used from the tensorised network; layer
    attributes come from the IR, so the proxy does not depend on the predictor's feature set.
    """

    def __init__(self, network: Network, tn: TensorizedNetwork) -> None:
        if tn.layer_names != [layer.name for layer in network.layers]:
            raise ValueError("the tensorised network does not list the IR's layers in order")
        self.tn = tn
        dtype = tn.full_widths.dtype
        layers = network.layers
        self.mask = torch.tensor(
            [float(lay.op in (Op.CONV2D, Op.LINEAR)) for lay in layers], dtype=dtype
        )  # (L,)
        self.depthwise = torch.tensor([lay.is_depthwise for lay in layers])  # (L,) bool
        self.fixed_groups = torch.tensor(
            [1.0 if lay.is_depthwise else float(lay.groups) for lay in layers], dtype=dtype
        )  # (L,)
        self.full = self.log_macs(tn.full_widths[None])  # (1, L)

    def log_macs(self, widths: torch.Tensor) -> torch.Tensor:
        """log MACs per layer up to a per-layer constant (spatial size and kernel cancel): (B, L)."""
        in_c, out_c = self.tn.channels(widths)  # (B, L) each
        in_c = in_c.clamp_min(1.0)
        out_c = out_c.clamp_min(1.0)
        # Depthwise filters read one channel whatever the width; dense and grouped ones read in_c/groups.
        reads = torch.where(self.depthwise, torch.ones_like(in_c), in_c / self.fixed_groups)
        return torch.log(out_c) + torch.log(reads)  # (B, L)

    def __call__(self, widths: torch.Tensor) -> torch.Tensor:
        return ((self.log_macs(widths) - self.full) * self.mask).sum(-1)  # (B,)

    def per_layer(self, widths: torch.Tensor) -> torch.Tensor:
        """Capacity (B,) divided by the number of conv and linear layers.

        The capacity of an L-layer network is O(L); per layer it is O(1), like a latency penalty.
        """
        return self(widths) / float(self.mask.sum().clamp_min(1.0))
