"""Label fusion: several atlases' label maps, registered onto one target, made into one label map.

Majority voting counts each atlas's label at each voxel. Locally weighted voting (in the spirit of
joint label fusion, Wang et al. 2013, without its correlation term) weighs each atlas's vote by how
well its warped image matches the target around that voxel: the local normalised cross-correlation
in a small window, squared (a contrast-free measure), to the power ``beta``. Where an atlas was
misregistered, its image disagrees with the target there, and its vote counts for little.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

METHODS = ("weighted", "majority")
WINDOW_RADIUS = 2  # voxels: a 5^3 window for the local similarity
BETA = 2.0  # the weights' power (joint label fusion's default)
FLOOR = 1e-3  # the least weight, so that a voxel every atlas mismatches still gets a label


@dataclass
class Fused:
    labels: sitk.Image  # on the target's grid, the atlases' label values
    values: list[int]  # every label value, the background (0) first
    probabilities: list[sitk.Image]  # per value, the share of the (weighted) votes (on request)
    agreement: list[float]  # per atlas, its mean Dice with the fused labels over the labels present


@dataclass
class Local:
    """An image (float64) with its local mean and variance in a (2 radius + 1)^3 window: computed once for
    an image compared with many (a target with every atlas, a template with every subject)."""
    image: sitk.Image
    mean: np.ndarray
    var: np.ndarray
    radius: int

    @classmethod
    def of(cls, image: sitk.Image, radius: int = WINDOW_RADIUS) -> "Local":
        image = sitk.Cast(image, sitk.sitkFloat64)
        mean = _box_mean(image, radius)
        return cls(image, mean, _box_mean(image * image, radius) - mean ** 2, radius)


def _box_mean(image: sitk.Image, radius: int) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.BoxMean(image, [radius] * 3))


def local_similarity(target: sitk.Image | Local, warped: sitk.Image | Local, radius: int = WINDOW_RADIUS) -> np.ndarray:
    """The squared local normalised cross-correlation of two images on one grid, per voxel, in [0, 1].
    Either image may come as its ``Local`` (of the same ``radius``)."""
    f, g = (x if isinstance(x, Local) else Local.of(x, radius) for x in (target, warped))
    if (f.radius, g.radius) != (radius, radius):
        raise ValueError(f"local moments of radius {f.radius} and {g.radius} compared at radius {radius}")
    cov = _box_mean(f.image * g.image, radius) - f.mean * g.mean
    return np.clip(cov ** 2 / np.maximum(f.var * g.var, 1e-12), 0.0, 1.0)


def fuse(target: sitk.Image, atlas_images: list[sitk.Image], atlas_labels: list[sitk.Image],
         method: str = "weighted", probabilities: bool = False, beta: float = BETA,
         radius: int = WINDOW_RADIUS) -> Fused:
    """Fuse ``atlas_labels`` (on ``target``'s grid, each with its warped image in ``atlas_images``).
    One label at a time, so that memory does not grow with the number of labels (116 AAL regions on
    a 1 mm head would need 6 GB of votes at once); ``probabilities``: also each label's vote share."""
    if method not in METHODS:
        raise ValueError(f"label fusion method must be one of {', '.join(METHODS)}, got {method!r}")
    if not atlas_labels:
        raise ValueError("label fusion needs at least one atlas")
    labels = [sitk.GetArrayFromImage(x).astype(np.int64) for x in atlas_labels]
    values = sorted({0, *(int(v) for x in labels for v in np.unique(x))})
    # the squared correlation to the power beta / 2: the correlation to the power beta
    if method == "majority":
        weights = [np.ones(labels[0].shape, np.float32) for _ in labels]
    else:
        local = Local.of(target, radius)  # the target's side once for every atlas
        weights = [(np.maximum(local_similarity(local, image, radius), FLOOR) ** (beta / 2)).astype(np.float32)
                   for image in atlas_images]
    total = np.sum(weights, axis=0)
    best, best_votes = np.zeros(labels[0].shape, np.int64), np.full(labels[0].shape, -1.0, np.float32)
    shares = []
    for value in values:
        votes = np.zeros(labels[0].shape, np.float32)
        for lab, weight in zip(labels, weights):
            votes += np.where(lab == value, weight, np.float32(0))
        better = votes > best_votes
        best[better], best_votes[better] = value, votes[better]
        if probabilities:
            shares.append(_image(votes / total, target))
    dtype = np.uint8 if values[-1] < 256 else np.uint16 if values[-1] < 65536 else np.uint32
    agreement = [_mean_dice(lab, best, values) for lab in labels]
    return Fused(_image(best.astype(dtype), target), values, shares, agreement)


def _image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _mean_dice(a: np.ndarray, b: np.ndarray, values: list[int]) -> float:
    scores = []
    for v in values[1:]:
        x, y = a == v, b == v
        if x.any() or y.any():
            scores.append(2 * (x & y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores)) if scores else 1.0
