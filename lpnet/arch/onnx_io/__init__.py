"""ONNX in and out: read an ONNX graph into the IR (onnx shape inference), export a module to ONNX.

A file given to `network_from_onnx` is untrusted. Before anything else reads it, one pass over the whole
model (`scan`) refuses tensors that keep their data in external files (onnx would read those from this
machine's disk) and models above the size limits of `limits`, opening no file; then the opsets, the
operators and the input are checked (`checks`), and only then does shape inference run. Every problem
with a file comes out as an `lpnet.errors` error.

Reading runs in four steps (`reader`): the data of large constants (weights) is dropped, keeping their
type and shape, which is all the IR needs of them; shape inference runs on what is left; nodes
computing only on constants (weights stored as ConstantOfShape or Cast of an initializer, shape
arithmetic on the static input shape, Swin's masks and position biases) are folded into constants
(`folding`); and the remaining graph is converted node by node (`converter`), by the rules of each
operator family (`windows`, `affine`, `elementwise`, `normalisation`, `views`, `tokens`). Subgraphs
torch.onnx.export writes for one module are found first (`subgraphs`) and read as one layer or view
each: the self-attention of nn.MultiheadAttention (`attention`), Swin's shifted-window attention and
patch merging (`shifted_windows`), MaxViT's partitions and attention (`partitions`), the IR's own
attention module as `export_onnx` writes a built network (`built_attention`), and the IR's own patch
merging and read-out of a map's first position (`shifted_windows`, `tokens`).
"""

from lpnet.arch.onnx_io.export import export_onnx
from lpnet.arch.onnx_io.reader import network_from_onnx

__all__ = ["export_onnx", "network_from_onnx"]
