"""Seeded generator of CNN architectures that spans the design space people build from, and of
transformer-style networks for profiling.

`generate_network(seed)` turns one integer into one network: a stem, 2-5 stages of plain, basic
residual, bottleneck, inverted-residual, Inception-style or DenseNet-style blocks (with optional
squeeze-and-excitation), and a classifier that reads the global mean or, as AlexNet and VGG do, a
map pooled to a few positions a side through wide hidden linears; its MACs, feature elements and
weights held inside the design space's bounds.
The same seed gives the same network on every run and Python version: the generator draws only
`random.Random.random()`, whose sequence Python keeps stable.

Seeds come in ranges that never overlap:

- `PROFILING_SEEDS` give networks of family "generated", which devices are profiled on, so a
  predictor learns from layers across the design space rather than from width variants of a few
  families;
- `EVALUATION_SEEDS` give networks of family "generated-eval", which are never profiled: a
  predictor is judged on them as on architectures it has not seen;
- `DEVELOPMENT_SEEDS` give networks of family "generated-dev", never profiled either: design
  decisions about a predictor are judged on them, so the evaluation networks are judged on, never
  tuned to;
- `TRANSFORMER_SEEDS` give transformer-style networks (`transformer`: attention, layer norm and
  tokens as ViT, Swin and MaxViT use them) of family "generated", profiling material only: a
  predictor is judged on torchvision's transformers, never on these.

The CNN ranges draw from the same distribution, so an evaluation network is new to the predictor yet
comes from the space its profiling material covers.

Modules, from the bottom up:

- `space`: the block kinds and the `DesignSpace` (distributions and cost bounds).
- `plan`: the random draws and the plan they make, every choice before widths are fixed.
- `graph_builder`: appends IR layers with consistent names and shapes.
- `blocks`: the blocks of a stage at one width.
- `assembler`: a plan realised as a network (stem, stages, head), rescaled until its cost fits.
- `transformer`: transformer-style networks, drawn and rescaled in one module.
- `seeds`: the seed ranges and families, `generate_network` and `generate_networks`.
"""

from lpnet.arch.generator.seeds import (
    DEVELOPMENT_FAMILY,
    DEVELOPMENT_SEEDS,
    EVALUATION_FAMILY,
    EVALUATION_SEEDS,
    PROFILING_FAMILY,
    PROFILING_SEEDS,
    TRANSFORMER_SEEDS,
    generate_network,
    generate_networks,
    seed_family,
)
from lpnet.arch.generator.space import DEFAULT_SPACE, BlockKind, DesignSpace

__all__ = [
    "DEFAULT_SPACE",
    "DEVELOPMENT_FAMILY",
    "DEVELOPMENT_SEEDS",
    "EVALUATION_FAMILY",
    "EVALUATION_SEEDS",
    "PROFILING_FAMILY",
    "PROFILING_SEEDS",
    "TRANSFORMER_SEEDS",
    "BlockKind",
    "DesignSpace",
    "generate_network",
    "generate_networks",
    "seed_family",
]
