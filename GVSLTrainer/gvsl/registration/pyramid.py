"""The pair on the working grid at several resolutions, as the features a similarity compares."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import spatial


def smooth_resize(image: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resize with a light blur first when shrinking by more than 1.5 (against aliasing)."""
    factor = max(s / t for s, t in zip(image.shape[2:], shape))
    if factor > 1.5:
        image = F.avg_pool3d(image, 3, 1, 1, count_include_pad=False)
    return spatial.resize(image, shape)


def shrunk_shape(shape: tuple[int, ...], shrink: float, minimum: int = 8) -> tuple[int, ...]:
    return tuple(max(minimum, round(s / shrink)) for s in shape)


@dataclass
class Level:
    """One resolution: the fixed features, the moving features (with the moving mask, then the moving
    image's domain, as last channels where there are, so that one interpolation warps them all) and
    the fixed mask."""
    shape: tuple[int, ...]
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor | None
    masked: bool
    with_domain: bool = False
    _sampled: dict = field(default_factory=dict)

    def _points(self, similarity):
        """(identity coordinates, fixed features, fixed mask) at the similarity's sample points, or None
        for a metric that compares every voxel."""
        points = similarity.sample_points(math.prod(self.shape), self.fixed.device)
        if points is None:
            return None
        if similarity.name not in self._sampled:
            def pick(x):
                return None if x is None else x.flatten(2)[:, :, points, None, None]

            coordinates = spatial.identity_grid(self.shape, self.fixed.device, self.fixed.dtype).reshape(-1, 3)[points]
            self._sampled[similarity.name] = (coordinates, pick(self.fixed), pick(self.fixed_mask))
        return self._sampled[similarity.name]

    def grid(self, similarity, theta: torch.Tensor, field: torch.Tensor | None = None,
             base: torch.Tensor | None = None) -> torch.Tensor:
        """Where ``loss`` samples the moving features: ``spatial.normalised_grid`` of this level, or for a
        metric that samples, that grid at its sample points only. ``base``: this method's result for
        ``theta`` alone, when the caller keeps it."""
        sampled = self._points(similarity)
        if sampled is None:
            return spatial.normalised_grid(self.shape, theta, field, base)
        return spatial.points_grid(sampled[0], theta, field, base)

    def loss(self, similarity, grid: torch.Tensor, per_item: bool = False) -> torch.Tensor:
        """The similarity loss of the moving features sampled at ``grid`` (from this level's ``grid``); a
        batch of grids compares the one pair under as many transforms (``per_item``: a loss each)."""
        fixed, fixed_mask = self.fixed, self.fixed_mask
        sampled = self._points(similarity)
        if sampled is not None:  # a metric that samples: interpolated only there
            _, fixed, fixed_mask = sampled
        warped = spatial.sample(self.moving.expand(grid.shape[0], *self.moving.shape[1:]), grid,
                                padding_mode=similarity.padding)
        weight = domain = None
        if self.with_domain:  # outside the moving image's field of view nothing is compared
            warped, domain = warped[:, :-1], warped[:, -1:]
        if self.masked:
            warped, weight = warped[:, :-1], warped[:, -1:] * fixed_mask
        return similarity.loss(warped, fixed, weight, per_item, domain=domain)

    def overlap(self, similarity, grid: torch.Tensor) -> torch.Tensor:
        """(N, 2) per grid: the warped moving domain's sum (how much of the fields of view the images
        share), then its sum over the fixed mask (how much of what is compared)."""
        if not self.with_domain:
            return torch.full((grid.shape[0], 2), float(math.prod(self.shape)), device=grid.device)
        sampled = self._points(similarity)
        fixed_mask = self.fixed_mask if sampled is None else sampled[2]
        domain = spatial.sample(self.moving[:, -1:].expand(grid.shape[0], 1, *self.moving.shape[2:]), grid)
        weighted = domain if fixed_mask is None else domain * fixed_mask
        return torch.stack([domain.flatten(1).sum(1), weighted.flatten(1).sum(1)], dim=1)


class Pyramid:
    """Levels made on demand and kept: the linear and deformable stages share them."""

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, fixed_mask: torch.Tensor | None = None,
                 moving_mask: torch.Tensor | None = None, moving_domain: torch.Tensor | None = None,
                 finer: tuple | None = None, fixed_levels: dict | None = None):
        """``moving_domain``: where the moving image has data on the working grid (1 inside its field
        of view), for a pair whose fields of view differ; None: it covers the fixed image. ``finer``:
        (moving, its mask or None, its domain or None) on a grid of half the spacing with the same
        corner voxel centres (``geometry.finer_grid``), interpolated instead at full resolution.
        ``fixed_levels``: where the fixed side's features and levels are kept (a dict that lives as long
        as ``fixed`` and ``fixed_mask`` do: a cohort's worker passes the same one for every subject)."""
        self.fixed, self.moving = fixed, moving
        self.masked = fixed_mask is not None or moving_mask is not None
        self.fixed_mask = fixed_mask if fixed_mask is not None else torch.ones_like(fixed)
        self.moving_mask = moving_mask if moving_mask is not None else torch.ones_like(moving)
        self.moving_domain = moving_domain
        self.finer = finer
        self.shape = tuple(fixed.shape[2:])
        self._levels: dict = {}
        self._full: dict = {}
        self._fixed_levels = {} if fixed_levels is None else fixed_levels

    def _fixed(self, key: tuple, compute):
        if key not in self._fixed_levels:
            self._fixed_levels[key] = compute()
        return self._fixed_levels[key]

    def _features(self, similarity) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the full-resolution images, shrunk per level afterwards: a descriptor computed on
        a coarse image (MIND's two-voxel offsets at 10 mm spacing) sees the image border, not anatomy."""
        if similarity.name not in self._full:
            self._full[similarity.name] = (self._fixed(("features", similarity.name),
                                                       lambda: similarity.features(self.fixed)),
                                           similarity.features(self.moving))
        return self._full[similarity.name]

    def level(self, shrink: float, similarity) -> Level:
        key = (shrink, similarity.name)
        if key not in self._levels:
            shape = shrunk_shape(self.shape, shrink)

            def at(x):
                return x if shape == self.shape else smooth_resize(x, shape)

            fixed_features, moving_features = self._features(similarity)
            fixed = self._fixed(("level", shrink, similarity.name), lambda: at(fixed_features))
            moving = at(moving_features)
            moving_mask, domain = at(self.moving_mask), self.moving_domain
            domain = None if domain is None else at(similarity.valid(domain))
            if shape == self.shape and self.finer is not None:  # the finer copy, as it is: no blur to match
                moving = similarity.features(self.finer[0])
                moving_mask = self.finer[1] if self.finer[1] is not None else torch.ones_like(moving[:, :1])
                domain = None if domain is None else similarity.valid(self.finer[2])
            fixed_mask = None
            if self.masked:
                moving = torch.cat([moving, moving_mask], dim=1)
                fixed_mask = self._fixed(("mask", shrink), lambda: at(self.fixed_mask))
            if domain is not None:
                moving = torch.cat([moving, domain], dim=1)
            if moving.shape[1] > 1:  # interpolating many channels gathers each voxel's channels together:
                moving = moving.contiguous(memory_format=torch.channels_last_3d)  # 3x faster on a CPU
            self._levels[key] = Level(shape, fixed, moving, fixed_mask, self.masked, domain is not None)
        return self._levels[key]
