"""Datasets for the train mode: scikit-learn's digits, an ImageFolder tree, CIFAR-10 on disk.

Nothing is downloaded: digits ship with scikit-learn, and the others read files the caller already has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from service.errors import DatasetUnavailable, InvalidInput
from service.train import DATASETS

# Per-channel statistics of CIFAR-10's training set, the usual normalisation.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataLoaders:
    """Train and validation loaders with the input shape (C, H, W) and class count they imply."""

    train: DataLoader
    val: DataLoader
    input_chw: tuple[int, int, int]
    num_classes: int


def load_dataset(
    name: str, root: Path | None, image_size: int | None, batch_size: int, seed: int = 0
) -> DataLoaders:
    """The dataset `name` (one of `DATASETS`), read from `root` unless it is digits.

    `image_size` defaults to 16 for digits and 224 for an image folder; CIFAR-10 is 32 only.

    Raises:
        InvalidInput: an unknown dataset, no `root` for one read from disk, or another size for CIFAR-10.
        DatasetUnavailable: the files are not under `root`.
    """
    if name not in DATASETS:
        raise InvalidInput(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}", {"dataset": name})
    if name == "digits":
        return digits_loaders(batch_size=batch_size, image_size=image_size or 16, seed=seed)
    if root is None:
        raise InvalidInput(f"the {name} dataset is read from disk: give its data folder", {"dataset": name})
    if name == "imagefolder":
        return image_folder_loaders(root, image_size=image_size or 224, batch_size=batch_size, seed=seed)
    if image_size not in (None, 32):
        raise InvalidInput(f"CIFAR-10 images are 32x32, not {image_size}", {"image_size": image_size})
    return cifar10_loaders(root, batch_size=batch_size, seed=seed)


def digits_loaders(
    batch_size: int = 64,
    image_size: int = 8,
    val_share: float = 0.2,
    seed: int = 0,
    distortion: float = 0.0,
) -> DataLoaders:
    """scikit-learn's 8x8 handwritten digits (1,797 images), optionally upsampled, stratified split.

    Args:
        batch_size: training batch size (validation uses 256).
        image_size: side of the (bilinearly upsampled) images; 8 keeps them native.
        val_share: share of images held out, stratified by class.
        seed: split, shuffling and distortion seed.
        distortion: strength in [0, 1] of a fixed random distortion of every image (`distort_digits`);
            plain digits are so easy that any reasonable network scores 99 % on them, distorted
            ones leave room to tell pruning methods apart. 0 keeps the images as they are.

    Raises:
        ValueError: `distortion` outside [0, 1] or `val_share` outside (0, 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if not 0.0 <= distortion <= 1.0:
        raise ValueError(f"distortion must be in [0, 1], got {distortion}")
    if not 0.0 < val_share < 1.0:
        raise ValueError(f"val_share must be in (0, 1), got {val_share}")
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if distortion > 0:
        images = distort_digits(images, distortion, torch.Generator().manual_seed(10_007 + seed))
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=val_share, random_state=seed, stratify=digits.target
    )
    train_images = images[train_idx]
    mean, std = train_images.mean(), train_images.std()
    images = (images - mean) / std  # statistics of the training split only
    train = TensorDataset(images[train_idx], labels[train_idx])
    val = TensorDataset(images[val_idx], labels[val_idx])
    generator = torch.Generator().manual_seed(seed)
    return DataLoaders(
        train=DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        val=DataLoader(val, batch_size=256),
        input_chw=(1, image_size, image_size),
        num_classes=10,
    )


def distort_digits(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Each image (N, 1, H, W) in [0, 1] rotated, scaled, sheared and shifted at random, plus pixel noise.

    At strength 1: rotation up to +-30 degrees, scale 0.75-1.25, shear up to +-0.3, shift up to
    +-15 % of the side, and Gaussian noise of standard deviation 0.35 (pixels are in [0, 1]). The
    draws are fixed by `generator`, so the distorted dataset is the same on every call.
    """
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)  # (N,)

    angle = uniform(-1.0, 1.0) * math.radians(30.0) * strength
    scale = 1.0 + uniform(-0.25, 0.25) * strength
    shear = uniform(-0.3, 0.3) * strength
    shift = torch.stack([uniform(-0.3, 0.3), uniform(-0.3, 0.3)], dim=1) * strength  # (N, 2), grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # (N, 2, 3): output -> input sampling coordinates
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    noise = torch.randn(images.shape, generator=generator) * 0.35 * strength
    return (warped + noise).clamp(0.0, 1.0)


def image_folder_loaders(
    root: str | Path,
    image_size: int = 224,
    batch_size: int = 32,
    val_share: float = 0.1,
    seed: int = 0,
    workers: int = 0,
) -> DataLoaders:
    """An ImageFolder tree (`root/<class>/<image>`), resized and centre-cropped, split at random.

    Raises:
        DatasetUnavailable: the folder does not exist or holds no images.
    """
    from torchvision import datasets, transforms

    path = Path(root)
    if not path.is_dir():
        raise DatasetUnavailable(f"image folder {str(path)!r} does not exist", {"root": str(path)})
    transform = transforms.Compose(
        [
            transforms.Resize(int(image_size * 1.14)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ]
    )
    try:
        dataset = datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetUnavailable(f"no images under {str(path)!r}: {exc}", {"root": str(path)}) from exc
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    n_val = max(1, int(round(val_share * len(dataset))))
    return DataLoaders(
        train=DataLoader(
            Subset(dataset, order[n_val:]),
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            generator=generator,
        ),
        val=DataLoader(Subset(dataset, order[:n_val]), batch_size=batch_size, num_workers=workers),
        input_chw=(3, image_size, image_size),
        num_classes=len(dataset.classes),
    )


def cifar10_loaders(root: str | Path, batch_size: int = 128, workers: int = 0, seed: int = 0) -> DataLoaders:
    """CIFAR-10 from a local copy (torchvision's `cifar-10-batches-py` under `root`); never downloads.

    Raises:
        DatasetUnavailable: the files are not there.
    """
    from torchvision import datasets, transforms

    normalise = transforms.Normalize(_CIFAR_MEAN, _CIFAR_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalise,
        ]
    )
    val_tf = transforms.Compose([transforms.ToTensor(), normalise])
    try:
        train = datasets.CIFAR10(str(root), train=True, download=False, transform=train_tf)
        val = datasets.CIFAR10(str(root), train=False, download=False, transform=val_tf)
    except RuntimeError as exc:  # torchvision raises RuntimeError("Dataset not found or corrupted...")
        raise DatasetUnavailable(
            f"CIFAR-10 is not under {str(root)!r} ({exc}); put the extracted 'cifar-10-batches-py' folder there",
            {"root": str(root)},
        ) from exc
    generator = torch.Generator().manual_seed(seed)
    return DataLoaders(
        train=DataLoader(
            train, batch_size=batch_size, shuffle=True, num_workers=workers, generator=generator
        ),
        val=DataLoader(val, batch_size=256, num_workers=workers),
        input_chw=(3, 32, 32),
        num_classes=10,
    )
