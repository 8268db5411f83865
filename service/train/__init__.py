"""The train mode as `lpnet train` runs it.

- `datasets`: scikit-learn's digits, an ImageFolder tree or CIFAR-10 on disk, as loaders.
- `smallnet`: the small ResNet `lpnet train` prunes by default.
- `model`: the module to prune (the small ResNet or a torchvision model) with its starting weights.
- `run`: `run_train`, from a `TrainRequest` to a pruned, fine-tuned and measured network, and
  `write_results`, what the command leaves in its output directory.

This package's `__init__` names the datasets and the default model without importing torch, so the
command registers its flags cheaply.
"""

DATASETS = ("digits", "imagefolder", "cifar10")
SMALL_RESNET = "small-resnet"
