"""Image similarities for registration of any pair of modalities: local NCC, MIND-SSC, mutual information.

Each similarity has the same three calls, so the optimiser never needs to know which one it runs:

* ``features(image)``: what is warped and compared, computed once per resolution level (MIND's
  12-channel descriptors; the image itself for NCC and MI). Warping the moving image's features
  instead of recomputing them from the warped image is what ConvexAdam does, and it is cheaper.
* ``loss(warped, fixed, weight=None, per_item=False, domain=None)``: a scalar to minimise (with
  ``per_item``, one per pair of the batch, as a search scores many candidates at once); ``weight``
  (N, 1, D, H, W) is a per-voxel weight (the product of the fixed mask and the warped moving mask);
  ``domain``, where the warped moving image has data (its field of view, warped with it; None: all
  of it): only voxels inside it count, and the mean is over them, so a smaller overlap is no gain.
* ``valid(domain)``: the part of a domain where the features are sound (MIND's descriptors reach
  a few voxels out; near the edge of a field of view they describe the edge).
* ``score(loss)``: the figure a person reads (local NCC and MI: higher is better; MIND: a mean
  squared descriptor difference, lower is better).

All are written in torch, batched and device-agnostic. Intensities are expected in [0, 1]
(``gvsl.volumes.normalise``).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .choices import SIMILARITIES
from .losses import box_mean, local_moments, local_ncc, masked_local_ncc

# auto: a Wasserstein-1 distance between the two images' normalised foreground intensity
# distributions above this means different contrasts (T1 vs T2, MR vs CT). Measured (Otsu
# foregrounds): 0.008-0.021 between MNI T1 templates (a known warp of one, the FSL and ICBM
# templates), 0.007-0.014 for a noisy T1 on a smaller oblique grid, 0.062 between the nibabel T1 head
# (with skull) and the MNI template, 0.17 between T1 and the pseudo-CT both normalised as MR, 0.47
# between T1 and an inverted (T2-like) contrast.
HISTOGRAM_DISTANCE_THRESHOLD = 0.1


def weighted_mean(x: torch.Tensor, weight: torch.Tensor | None, per_item: bool = False) -> torch.Tensor:
    """Mean of ``x`` (N, C, ...) over voxels and channels, each voxel weighted by ``weight`` (N or 1, 1, ...);
    with ``per_item``, one mean per item of the batch, (N,)."""
    if not per_item:
        if weight is None:
            return x.mean()
        return (x * weight).sum() / (weight.sum() * x.shape[1]).clamp_min(1e-8)
    if weight is None:
        return x.flatten(1).mean(1)
    weight = weight.expand(x.shape[0], *weight.shape[1:])
    return (x * weight).flatten(1).sum(1) / (weight.flatten(1).sum(1) * x.shape[1]).clamp_min(1e-8)


INSIDE = 0.99  # an interpolated domain's value from which a voxel counts as inside the field of view


def inside(domain: torch.Tensor) -> torch.Tensor:
    """1 where a (warped, interpolated) domain is wholly inside the field of view, else 0. It carries no
    gradient: moving the edge of a field of view is not a way to improve a match. A soft edge would
    let the half-covered voxels along it, which mix image and nothing, count: on slabs that biased
    rigid results by 0.4-1 mm; counted only whole, 0.1 mm."""
    return (domain.detach() >= INSIDE).to(domain.dtype)


def _within(weight: torch.Tensor | None, domain: torch.Tensor | None) -> torch.Tensor | None:
    """The weight restricted to the domain."""
    if domain is None:
        return weight
    return inside(domain) if weight is None else weight * inside(domain)


def kept_per_fixed(owner, name: str, fixed: torch.Tensor, compute):
    """``compute()`` for a fixed image that does not change, kept on ``owner`` per fixed tensor: an
    optimiser compares hundreds of warps with one fixed image."""
    cache = owner.__dict__.setdefault(name, {})
    hit = cache.get(id(fixed))
    if hit is None or hit[0] is not fixed:  # an id can be reused once its tensor is gone
        hit = cache[id(fixed)] = (fixed, compute())
    return hit[1]


class _Sampled:
    """A per-voxel metric may be estimated on a fixed random subset of voxels: above ``max_samples``
    voxels only those are interpolated, as elastix and ITK sample their metrics."""
    max_samples = 0

    def sample_points(self, n: int, device) -> torch.Tensor | None:
        """Flat voxel indices to compare, or None for all."""
        if n <= self.max_samples:
            return None
        cache = self.__dict__.setdefault("_subsets", {})
        key = (n, str(device))
        if key not in cache:
            g = torch.Generator().manual_seed(n)
            cache[key] = torch.randperm(n, generator=g)[:self.max_samples].to(device)
        return cache[key]


class LocalNCC:
    """Local normalised cross-correlation (squared), for images of the same modality."""
    name, higher_is_better, padding = "ncc", True, "zeros"
    smooth_scale = 1.0  # the field's smoothness weight relative to this loss's size

    def __init__(self, window: int = 7, floor: float | None = None):
        """``floor``: of the local variances' product (intensities in [0, 1]); None: pre-training's (the
        reference's 1e-5 in window sums, 8.5e-11 for a 7^3 window). See FIELD_NCC_FLOOR."""
        self.window, self.floor = window, floor

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def sample_points(self, n: int, device) -> None:
        return None  # a local window needs every voxel

    def valid(self, domain: torch.Tensor) -> torch.Tensor:
        return domain  # the masked correlation keeps each window to its valid part

    def loss(self, warped: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor | None = None,
             per_item: bool = False, domain: torch.Tensor | None = None) -> torch.Tensor:
        eps = {} if self.floor is None else {"eps": self.floor * self.window ** 6}  # local_ncc's: window sums
        if domain is None:
            cc = local_ncc(warped, fixed, self.window, reduce=False, b_moments=self._moments(fixed), **eps)
        else:
            cc = masked_local_ncc(warped, fixed, inside(domain), self.window, **eps)
        return weighted_mean(cc, _within(weight, domain), per_item)  # 1 - cc, per voxel

    def _moments(self, fixed: torch.Tensor):
        """The fixed image's local moments, computed once per fixed image (None for one being optimised)."""
        if fixed.requires_grad:
            return None
        return kept_per_fixed(self, "_moments_of", fixed, lambda: local_moments(fixed, self.window))

    def score(self, loss: float) -> float:
        return 1 - loss


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors (Heinrich et al., MICCAI 2013): (N, 12, D, H, W) for an (N, 1, D, H, W) image.

    For the six neighbours at ``dilation`` voxels along +-x, +-y, +-z, the twelve pairs of them that
    are sqrt(2) * dilation apart are compared by a patch distance (a (2 * radius + 1)^3 box mean of
    squared differences). Distances are shifted to a minimum of 0 and divided by their mean (a local
    variance estimate), then mapped through exp(-d): a descriptor of local structure that does not
    depend on the modality's contrast.
    """
    d = dilation
    padded = F.pad(image.float(), (d,) * 6, mode="replicate")
    size = image.shape[2:]
    directions = [(0, 0, 1), (0, 0, -1), (0, 1, 0), (0, -1, 0), (1, 0, 0), (-1, 0, 0)]

    def shifted(o):
        return padded[:, :, d + o[0] * d: d + o[0] * d + size[0], d + o[1] * d: d + o[1] * d + size[1],
                      d + o[2] * d: d + o[2] * d + size[2]]

    pairs = [(a, b) for i, a in enumerate(directions) for b in directions[i + 1:]
             if sum((x - y) ** 2 for x, y in zip(a, b)) == 2]
    diffs = torch.cat([(shifted(a) - shifted(b)) ** 2 for a, b in pairs], dim=1)
    dist = box_mean(diffs, 2 * radius + 1)
    dist = dist - dist.min(dim=1, keepdim=True).values
    variance = dist.mean(dim=1, keepdim=True)
    overall = variance.mean()
    variance = variance.clamp(overall * 1e-3, overall * 1e3).clamp_min(1e-12)
    return torch.exp(-dist / variance)


class MIND(_Sampled):
    """Mean squared difference of MIND-SSC descriptors: the multi-modal loss of ConvexAdam and uniGradICON."""
    name, higher_is_better, padding = "mind", False, "border"  # outside the image: no new structure
    # the field's smoothness weight relative to this loss: a descriptor difference is several times smaller
    # than 1 - local NCC for the same misalignment, and a multi-modal match is less certain
    smooth_scale = 20.0

    def __init__(self, radius: int = 1, dilation: int = 2, max_samples: int = 65_536):
        self.radius, self.dilation, self.max_samples = radius, dilation, max_samples

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return mind_ssc(image, self.radius, self.dilation)

    def valid(self, domain: torch.Tensor) -> torch.Tensor:
        reach = 2 * (self.dilation + self.radius) + 1  # a descriptor's support
        return -F.max_pool3d(-domain, reach, 1, reach // 2)

    def loss(self, warped: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor | None = None,
             per_item: bool = False, domain: torch.Tensor | None = None) -> torch.Tensor:
        return weighted_mean((warped - fixed) ** 2, _within(weight, domain), per_item)

    def score(self, loss: float) -> float:
        return loss


class MutualInformation(_Sampled):
    """Mattes-style mutual information (Mattes et al., 2003): a joint histogram with cubic B-spline Parzen
    windows on both intensities, differentiable; one histogram per pair of a batch, all in one pass."""
    name, higher_is_better, padding = "mi", True, "zeros"
    smooth_scale = 1.0

    def __init__(self, bins: int = 32, max_samples: int = 16_384):
        self.bins, self.max_samples = bins, max_samples

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def valid(self, domain: torch.Tensor) -> torch.Tensor:
        return domain

    def _parzen(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin indices, weights), each (..., 4): a cubic B-spline touches the four nearest bins only.
        The weights are the B-spline's four pieces at the fractional position t (a few polynomials,
        not the spline evaluated at four offsets)."""
        u = values.clamp(0, 1) * (self.bins - 1)
        floor = u.detach().floor()
        t = u - floor
        t2, t3, s = t * t, t * t * t, 1 - t
        weights = torch.stack([s * s * s, 3 * t3 - 6 * t2 + 4, 3 * (t2 - t3 + t) + 1, t3], dim=-1) / 6
        idx = floor.long()[..., None] + torch.arange(-1, 3, device=u.device)
        return idx.clamp(0, self.bins - 1), weights

    def _histogram_rows(self, values: torch.Tensor) -> torch.Tensor:
        """(..., samples, bins): each sample's Parzen weights spread over the bins (four non-zero)."""
        idx, weights = self._parzen(values)
        return torch.zeros(*values.shape, self.bins, device=values.device, dtype=weights.dtype).scatter_add(
            -1, idx, weights)

    def _fixed_rows(self, fixed: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """``_histogram_rows`` of the fixed image's samples, computed once per fixed image."""
        def rows():
            b = fixed[:, 0].reshape(fixed.shape[0], -1).float()
            return self._histogram_rows(b if idx is None else b[:, idx])

        return rows() if fixed.requires_grad else kept_per_fixed(self, "_rows_of", fixed, rows)

    def loss(self, warped: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor | None = None,
             per_item: bool = False, domain: torch.Tensor | None = None) -> torch.Tensor:
        """The joint histogram is a matrix product of the two images' Parzen rows (samples x bins each),
        a weight scaling the moving rows: the same sums as scattering every sample's 4 x 4 cells, 1.5x
        faster forward and backward on a CPU, and the fixed rows are computed once."""
        weight = _within(weight, domain)
        n = warped.shape[0]  # fixed and weight: a batch of n, or one for all
        a = warped[:, 0].reshape(n, -1).float()
        idx = self.sample_points(a.shape[1], a.device)
        rows_a = self._histogram_rows(a if idx is None else a[:, idx])
        if weight is not None:
            w = weight[:, 0].reshape(weight.shape[0], -1).float()
            rows_a = rows_a * (w if idx is None else w[:, idx])[..., None]
        joint = rows_a.transpose(1, 2) @ self._fixed_rows(fixed, idx)  # (n, bins of moving, bins of fixed)
        joint = joint / joint.sum((1, 2), keepdim=True).clamp_min(1e-12)
        pa, pb = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
        losses = -(joint * (torch.log(joint + 1e-10) - torch.log(pa * pb + 1e-10))).sum((1, 2))
        return losses if per_item else losses.mean()

    def score(self, loss: float) -> float:
        return -loss


def equalise(image: torch.Tensor, background: float = 0.05, levels: int = 256) -> torch.Tensor:
    """Map a [0, 1] image through the distribution of its own foreground: monotonic, so what MI measures
    is unchanged, but every tissue gets a share of the range in proportion to its volume.

    A CT through its Hounsfield window puts all of the brain within 2 % of the range (grey and white
    matter 15 HU apart in a window of 2048): one bin of a mutual-information histogram, and noise to
    MIND next to the bone. Background (below ``background``) keeps [0, 0.1]; the foreground gets (0.1, 1].
    Each image of a batch by its own distribution.
    """
    if image.shape[0] > 1:
        return torch.cat([equalise(x[None], background, levels) for x in image])
    flat = image.reshape(-1)
    fg = flat[flat > background]
    if fg.numel() < levels:
        return image
    qs = torch.quantile(fg[torch.linspace(0, fg.numel() - 1, min(fg.numel(), 200_000), device=fg.device).long()],
                        torch.linspace(0, 1, levels, device=image.device, dtype=image.dtype))
    ranks = torch.searchsorted(qs.contiguous(), flat.contiguous()).clamp(1, levels - 1)
    lo, hi = qs[ranks - 1], qs[ranks]
    frac = ((flat - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    cdf = ((ranks - 1).to(image.dtype) + frac) / (levels - 1)
    out = torch.where(flat > background, 0.1 + 0.9 * cdf, 0.1 * flat / background)
    return out.reshape(image.shape)


def foreground(image: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """1 where a [0, 1] image holds more than background, closed by one voxel (float mask)."""
    mask = (image > threshold).float()
    return -F.max_pool3d(-F.max_pool3d(mask, 3, 1, 1), 3, 1, 1)


def prepare(name: str, fixed: torch.Tensor, moving: torch.Tensor, fixed_mask: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """(fixed, moving, fixed weight, whether the weight is the automatic foreground) as ``name`` compares them.

    For a multi-modal similarity every tissue gets its share of the intensity range (a CT's brain is
    2 % of its Hounsfield window), and where the fixed image shows nothing (background, or a structure
    its modality does not show, such as bone in a skull-stripped MR) it cannot vouch for a match: with
    no fixed mask given, the similarity counts only inside the fixed image's foreground.
    """
    fixed, weight, automatic = prepare_fixed(name, fixed, fixed_mask)
    return fixed, prepare_moving(name, moving), weight, automatic


def prepare_fixed(name: str, fixed: torch.Tensor, fixed_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``prepare``'s fixed side alone (a cohort's worker keeps it from one subject to the next)."""
    if name == "ncc":
        return fixed, fixed_mask, False
    fixed = equalise(fixed)
    if fixed_mask is not None:
        return fixed, fixed_mask, False
    return fixed, foreground(fixed), True


def prepare_moving(name: str, moving: torch.Tensor) -> torch.Tensor:
    """``prepare``'s moving side alone."""
    return moving if name == "ncc" else equalise(moving)


# Local NCC's floor in a deformable registration. The reference's 8.5e-11 lets nearly flat windows turn
# rounding noise into gradients: a 1e-14 mm change of the input geometry moved the affine by 0.003 mm,
# which the field's optimisation amplified to 0.1 mm at the 99th percentile of points (0.2-0.6 mm at
# worst). At 1e-8 in both stages: p99 0.002 mm, end-point errors +0.002-0.005 mm. The rigid and affine
# modes, whose output is the linear result, keep the reference's floor: at 1e-8 their coarse levels'
# small variances cost 0.02-0.05 mm of end-point error.
FIELD_NCC_FLOOR = 1e-8


def make(name: str, ncc_window: int = 7, ncc_floor: float | None = None):
    """The similarity called ``name`` (not ``auto``: see ``choose``); ``ncc_floor``: see LocalNCC."""
    if name == "ncc":
        return LocalNCC(ncc_window, ncc_floor)
    if name == "mind":
        return MIND()
    if name == "mi":
        return MutualInformation()
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {name!r}")


def histogram_distance(a: np.ndarray, b: np.ndarray, foreground: float = 0.05) -> float:
    """Wasserstein-1 distance between the intensity distributions of two [0, 1]-normalised images,
    over each one's foreground (above its Otsu threshold, and above ``foreground``): 0 for identical
    contrasts. Otsu, not a fixed level: an MR's background noise and a different field of view
    changed the share of near-background voxels enough to call two noisy T1 heads different
    modalities (0.18-0.45 with a fixed 0.05; 0.007-0.009 with Otsu, the pseudo-CT 0.17)."""
    qs = np.linspace(0.01, 0.99, 99)
    fa, fb = (x[x > max(foreground, _otsu(x))] for x in (a, b))
    if fa.size < 10 or fb.size < 10:
        return 0.0
    return float(np.abs(np.quantile(fa, qs) - np.quantile(fb, qs)).mean())


def _otsu(values: np.ndarray) -> float:
    values = values.ravel()
    if values.size < 2 or values.min() == values.max():
        return float(values.min()) if values.size else 0.0
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(values.astype(np.float32).reshape(1, -1)))
    return float(otsu.GetThreshold())


def choose(presets: tuple[str, str], fixed: np.ndarray, moving: np.ndarray, fixed_mask: np.ndarray | None = None,
           moving_mask: np.ndarray | None = None) -> tuple[str, str]:
    """(similarity, why) for ``auto``: MIND when the images look like different modalities, else NCC.

    ``presets`` are the normalisations picked for (fixed, moving): ``ct`` means Hounsfield units.
    ``fixed`` and ``moving`` are the normalised images; only voxels inside their masks count.
    """
    if presets[0] != presets[1]:
        return "mind", (f"different modalities: the fixed image holds {_modality(presets[0])}, the moving image "
                        f"{_modality(presets[1])}")
    distance = histogram_distance(fixed if fixed_mask is None else fixed[fixed_mask],
                                  moving if moving_mask is None else moving[moving_mask])
    if distance > HISTOGRAM_DISTANCE_THRESHOLD:
        return "mind", (f"different contrasts: the normalised intensity histograms differ by {distance:.3f} "
                        f"(Wasserstein-1; above {HISTOGRAM_DISTANCE_THRESHOLD} means different modalities)")
    return "ncc", (f"same modality: both hold {_modality(presets[0])} and their normalised intensity histograms "
                   f"differ by {distance:.3f} (at most {HISTOGRAM_DISTANCE_THRESHOLD})")


def _modality(preset: str) -> str:
    return "Hounsfield units (CT)" if preset == "ct" else "non-CT intensities (MR-like)"
