"""Architecture IR: layers, graphs, channel groups, costs, and conversion from PyTorch and ONNX."""

from lpnet.arch.ir import NETWORK_INPUT, Layer, Network, Op

__all__ = ["NETWORK_INPUT", "Layer", "Network", "Op"]
