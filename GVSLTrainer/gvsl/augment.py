"""Batched, vectorised augmentations on the training device, driven by one ``torch.Generator``.

Appearance transforms damage the fixed image for the restoration head (Models Genesis style:
local pixel shuffling, a non-linear Bézier intensity curve, in-/out-painting). The spatial
transform (random affine + smooth elastic field) is applied identically to every view.
Images are (N, C, D, H, W) with intensities in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import spatial


@dataclass
class AugmentConfig:
    local_rate: float = 0.8
    nonlinear_rate: float = 0.9
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2
    rotation: float = spatial.MAX_ROTATION  # radians, each axis uniform in [-r, r]
    scale: float = spatial.MAX_SCALE_CHANGE  # each axis uniform in [1 - s, 1 + s]
    translation: float = 0.1  # fraction of the crop size
    shear: float = spatial.MAX_SHEAR
    elastic_magnitude: float = 2.0  # largest standard deviation of the elastic field, voxels
    elastic_spacing: int = 16  # voxels between the elastic field's random control points


# Spatial augmentation strengths for fine-tuning (``--augment``): none, half the bounds, or the
# paper's bounds (those of pre-training).
SPATIAL_LEVELS = ("none", "light", "default")


def spatial_config(level: str) -> AugmentConfig | None:
    if level not in SPATIAL_LEVELS:
        raise ValueError(f"augment must be one of {', '.join(SPATIAL_LEVELS)}, got {level!r}")
    if level == "none":
        return None
    full = AugmentConfig()
    if level == "default":
        return full
    return AugmentConfig(rotation=full.rotation / 2, scale=full.scale / 2, translation=full.translation / 2,
                         shear=full.shear / 2, elastic_magnitude=full.elastic_magnitude / 2)


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=gen.device)


def chosen(gen: torch.Generator, n: int, rate: float) -> torch.Tensor:
    return _rand(gen, n) < rate


def local_pixel_shuffle(x: torch.Tensor, gen: torch.Generator, rate: float, coverage: float = 5000 / 20 ** 3
                        ) -> torch.Tensor:
    """Shuffle the voxels inside many small random blocks: size/20 per axis (at least 2), and as
    many blocks as cover ``coverage`` of the volume (the reference's 5000 blocks of (n/20)³)."""
    n, c, *size = x.shape
    block = [max(2, s // 20) for s in size]
    k = max(1, round(coverage * size[0] * size[1] * size[2] / (block[0] * block[1] * block[2])))
    starts = [(_rand(gen, n, k) * (s - b + 1)).long().clamp_max(s - b) for s, b in zip(size, block)]
    offsets = torch.stack(torch.meshgrid(*[torch.arange(b, device=x.device) for b in block], indexing="ij"), -1)
    offsets = offsets.reshape(-1, 3)  # (V, 3) in (d, h, w)
    d = starts[0][..., None] + offsets[:, 0]
    h = starts[1][..., None] + offsets[:, 1]
    w = starts[2][..., None] + offsets[:, 2]
    index = ((d * size[1] + h) * size[2] + w).reshape(n, 1, -1).expand(n, c, -1)  # (N, C, K*V)
    flat = x.reshape(n, c, -1)
    values = flat.gather(2, index).reshape(n, c, k, -1)
    perm = _rand(gen, n, 1, k, values.shape[-1]).argsort(-1).expand_as(values)
    shuffled = flat.clone().scatter_(2, index, values.gather(-1, perm).reshape(n, c, -1)).reshape_as(x)
    return torch.where(chosen(gen, n, rate).reshape(n, 1, 1, 1, 1), shuffled, x)


def bezier_curves(gen: torch.Generator, n: int, points: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Monotone intensity curves through (0,0) and (1,1) with two random control points: (N, points) x, y."""
    ctrl = _rand(gen, n, 2, 2)  # (N, [P1, P2], [x, y])
    t = torch.linspace(0, 1, points, device=gen.device).reshape(1, -1, 1)
    p1, p2 = ctrl[:, None, 0], ctrl[:, None, 1]
    curve = 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3  # P0 = 0, P3 = 1
    return curve[..., 0].sort(-1).values.contiguous(), curve[..., 1].sort(-1).values.contiguous()


def nonlinear_intensity(x: torch.Tensor, gen: torch.Generator, rate: float) -> torch.Tensor:
    n = x.shape[0]
    xs, ys = bezier_curves(gen, n)
    v = x.reshape(n, -1).clamp(0, 1).contiguous()
    hi = torch.searchsorted(xs, v).clamp(1, xs.shape[1] - 1)
    x0, x1 = xs.gather(1, hi - 1), xs.gather(1, hi)
    y0, y1 = ys.gather(1, hi - 1), ys.gather(1, hi)
    mapped = y0 + (v - x0) / (x1 - x0).clamp_min(1e-12) * (y1 - y0)
    return torch.where(chosen(gen, n, rate).reshape(n, 1, 1, 1, 1), mapped.reshape_as(x).to(x.dtype), x)


def _box_union(gen: torch.Generator, n: int, size: list[int], count: int, lo: list[int], hi: list[int],
               active: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) bool mask: union of the ``active`` boxes among ``count`` random boxes per sample."""
    indicators = []
    for s, a, b in zip(size, lo, hi):
        length = a + (_rand(gen, n, count) * max(b - a, 1)).long()
        length = length.clamp(1, s)
        margin = min(3, max(0, (s - int(length.max())) // 2))
        room = (s - length - 2 * margin).clamp_min(0)
        start = margin + (_rand(gen, n, count) * (room + 1)).long().clamp_max(room + margin)
        axis = torch.arange(s, device=gen.device)
        indicators.append(((axis >= start[..., None]) & (axis < (start + length)[..., None])).float())
    counts = torch.einsum("nk,nkd,nkh,nkw->ndhw", active.float(), *indicators)
    return counts > 0


def _continuing(gen: torch.Generator, n: int, count: int, p: float = 0.95) -> torch.Tensor:
    """Reference-style 'while random() < p' loops, as a mask: box i is drawn if the first i+1 draws pass."""
    return (_rand(gen, n, count) < p).long().cumprod(1).bool()


def paint(x: torch.Tensor, gen: torch.Generator, paint_rate: float, inpaint_rate: float) -> torch.Tensor:
    """In-painting (noise boxes) or out-painting (noise everywhere but a few boxes)."""
    n, c, *size = x.shape
    in_mask = _box_union(gen, n, size, 30, [s // 10 for s in size], [s // 5 for s in size], _continuing(gen, n, 30))
    keep_first = torch.ones(n, 1, dtype=torch.bool, device=x.device)
    out_active = torch.cat([keep_first, _continuing(gen, n, 4)], dim=1)
    out_lo = [s - 4 * s // 7 for s in size]
    out_hi = [s - 3 * s // 7 for s in size]
    out_keep = _box_union(gen, n, size, 5, out_lo, out_hi, out_active)
    noise = _rand(gen, *x.shape).to(x.dtype)
    painted = chosen(gen, n, paint_rate)
    inpaint = chosen(gen, n, inpaint_rate)
    noise_where = torch.where(inpaint.reshape(n, 1, 1, 1), in_mask, ~out_keep) & painted.reshape(n, 1, 1, 1)
    return torch.where(noise_where.unsqueeze(1), noise, x)


def appearance(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """The damaged copy that the restoration head learns to undo."""
    x = local_pixel_shuffle(x, gen, cfg.local_rate)
    x = nonlinear_intensity(x, gen, cfg.nonlinear_rate)
    return paint(x, gen, cfg.paint_rate, cfg.inpaint_rate)


def random_affine(gen: torch.Generator, n: int, shape: tuple[int, ...], cfg: AugmentConfig) -> torch.Tensor:
    """(N, 3, 4) voxel matrices within the configured bounds."""
    def uniform(bound: float, k: int) -> torch.Tensor:
        return (2 * _rand(gen, n, k) - 1) * bound

    extent = torch.tensor(shape[::-1], dtype=torch.float32, device=gen.device)  # x, y, z
    return spatial.affine_from_parameters(uniform(cfg.rotation, 3), 1 + uniform(cfg.scale, 3),
                                          uniform(cfg.translation, 3) * extent, uniform(cfg.shear, 6))


def random_elastic(gen: torch.Generator, n: int, shape: tuple[int, ...], cfg: AugmentConfig) -> torch.Tensor:
    """(N, 3, D, H, W) smooth displacement in voxels: random control points, trilinear upsampling."""
    coarse = [max(2, -(-s // cfg.elastic_spacing) + 1) for s in shape]
    magnitude = _rand(gen, n, 1, 1, 1, 1) * cfg.elastic_magnitude
    control = torch.randn((n, 3, *coarse), generator=gen, device=gen.device) * magnitude
    return spatial.resize(control, tuple(shape))


def spatial_augment(images: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Warp all channels of ``images`` by one random affine + elastic transform per sample."""
    n, shape = images.shape[0], tuple(images.shape[2:])
    matrix = random_affine(gen, n, shape, cfg)
    return spatial.warp(images, matrix, random_elastic(gen, n, shape, cfg).to(images.dtype))


def pretraining_views(fixed: torch.Tensor, moving: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fixed, damaged fixed, moving), all three warped by the same spatial transform in one pass."""
    damaged = appearance(fixed, gen, cfg)
    views = spatial_augment(torch.cat([fixed, damaged, moving], dim=1), gen, cfg)
    return views[:, 0:1], views[:, 1:2], views[:, 2:3]
