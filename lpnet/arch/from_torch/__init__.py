"""Build the IR from PyTorch: any nn.Module by torch.fx tracing, or a torchvision model by name.

Modules, from the bottom up:

- `nodes`: reading fx nodes (a node's tensor shape, a call's arguments by name).
- `state`: what one graph's conversion has built, and what each fx node stands for.
- `views`: views and shapes (permutes, reshapes, chunks, slices, flattens, channel shuffles).
- `conv_pool_linear`, `norm_activation`, `merges`, `attention`: the layers of each family of modules,
  functions and methods.
- `converter`: a shape-propagated fx graph to IR layers, each call through its family's mapper.
- `tracing`: `network_from_module`, any nn.Module traced with torch.fx.
- `torchvision_models`: `torchvision_model` and `network_from_torchvision`, torchvision models by name.
"""

from lpnet.arch.from_torch.torchvision_models import network_from_torchvision, torchvision_model
from lpnet.arch.from_torch.tracing import DEFAULT_INPUT_SHAPE, network_from_module

__all__ = ["DEFAULT_INPUT_SHAPE", "network_from_module", "network_from_torchvision", "torchvision_model"]
