"""The GVSL network: a 3D U-Net backbone with the Z-matching (affine + deformable) and restoration heads.

Module and parameter names equal the reference implementation's, so official checkpoints
(``unet.inc.double_conv.0.weight``, ``fc_rot.weight``, ...) load with ``strict=True``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import spatial
from .choices import NORMS

BASE_CHANNELS = (32, 64, 128, 256, 512, 256, 128, 64, 32)
DEFAULT_WIDTH = 32
PAD_MULTIPLE = 16  # four 2x poolings


def channels(width: int = DEFAULT_WIDTH) -> tuple[int, ...]:
    """The nine U-Net channel counts; ``width`` is the first one (32 in the paper)."""
    if width < 2 or width % 2:
        raise ValueError(f"width must be an even number >= 2, got {width}")
    return tuple(c * width // DEFAULT_WIDTH for c in BASE_CHANNELS)


def norm_layer(num_channels: int, per_group: int, norm: str = "group") -> nn.GroupNorm:
    """GroupNorm as the reference (channels // per_group groups, kept valid for tiny widths), or with one
    channel per group for ``norm="instance"``: the same parameters, so state dicts load either way."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    groups = num_channels if norm == "instance" else math.gcd(max(1, num_channels // per_group), num_channels)
    return nn.GroupNorm(groups, num_channels)


def check_input_size(shape: tuple[int, ...], norm: str) -> None:
    """Instance normalisation needs more than one value per channel at the bottleneck, 1/16 of the
    input (padded to a multiple of 16): refused before training, not at its first step."""
    if norm == "instance" and math.prod(-(-s // PAD_MULTIPLE) for s in shape) < 2:
        raise ValueError(f"instance normalisation needs inputs over {PAD_MULTIPLE} voxels along at least one "
                         f"axis (the bottleneck is 1/{PAD_MULTIPLE} of each), got {' x '.join(map(str, shape))}: "
                         "a larger --crop, or --norm group")


class DoubleConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: str = "group"):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
            norm_layer(out_channels, 8, norm),
            nn.LeakyReLU(0.2),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1),
            norm_layer(out_channels, 8, norm),
            nn.LeakyReLU(0.2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: str = "group"):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool3d(2), DoubleConv(in_channels, out_channels, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: str = "group"):
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, spatial.resize(x, skip.shape[2:])], dim=1))


class UNet(nn.Module):
    """Backbone. Returns the bottleneck ("global") and last-decoder ("local") features."""

    def __init__(self, in_channels: int = 1, width: int = DEFAULT_WIDTH, norm: str = "group"):
        super().__init__()
        ch = channels(width)
        self.channels = ch
        self.inc = DoubleConv(in_channels, ch[0], norm)
        self.down1 = Down(ch[0], ch[1], norm)
        self.down2 = Down(ch[1], ch[2], norm)
        self.down3 = Down(ch[2], ch[3], norm)
        self.down4 = Down(ch[3], ch[4], norm)
        self.up1 = Up(ch[4] + ch[3], ch[5], norm)
        self.up2 = Up(ch[5] + ch[2], ch[6], norm)
        self.up3 = Up(ch[6] + ch[1], ch[7], norm)
        self.up4 = Up(ch[7] + ch[0], ch[8], norm)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[2:]
        pad = [(-s) % PAD_MULTIPLE for s in size]  # D, H, W
        if any(pad):
            # F.pad lists the last axis first
            x = F.pad(x, [p for d in reversed(pad) for p in (d // 2, d - d // 2)])
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        y = self.up4(self.up3(self.up2(self.up1(x5, x4), x3), x2), x1)
        crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, size))
        return x5, y[(slice(None), slice(None), *crop)]


class GVSLOutput(NamedTuple):
    restored: torch.Tensor  # (N, 1, D, H, W): the undamaged fixed image, predicted
    warped: torch.Tensor  # (N, C, D, H, W): moving image after affine and deformable warps
    affine: torch.Tensor  # (N, 3, 4) voxel matrix (see spatial)
    displacement: torch.Tensor  # (N, 3, D, H, W) voxels, (z, y, x) channels


class GVSL(nn.Module):
    """Backbone + Z-matching head + restoration head. ``forward(fixed, moving)`` as in the reference."""

    def __init__(self, in_channels: int = 1, width: int = DEFAULT_WIDTH, norm: str = "group"):
        super().__init__()
        self.width, self.norm = width, norm
        self.unet = UNet(in_channels, width, norm)
        ch = self.unet.channels
        glob, loc = ch[4] // 2, ch[8] // 2
        self.f_conv = DoubleConv(2 * ch[4], glob, norm)
        self.sp_conv = DoubleConv(2 * ch[8], loc, norm)
        self.res_conv = nn.Sequential(nn.Conv3d(ch[8], loc, 3, padding=1), norm_layer(loc, 4, norm),
                                      nn.LeakyReLU(0.2), nn.Conv3d(loc, in_channels, 1))
        self.out_flow = nn.Conv3d(loc, 3, 3, padding=1)
        self.fc_rot = nn.Linear(glob, 3)
        self.fc_scl = nn.Linear(glob, 3)
        self.fc_trans = nn.Linear(glob, 3)
        self.fc_shear = nn.Linear(glob, 6)
        self.gap = nn.AdaptiveAvgPool3d(1)
        # Start at the identity transform while keeping every gradient path alive.
        for fc in (self.fc_rot, self.fc_scl, self.fc_trans, self.fc_shear):
            nn.init.normal_(fc.weight, std=1e-3)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.out_flow.weight, std=1e-5)
        nn.init.zeros_(self.out_flow.bias)

    def encode(self, *images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the shared backbone once on all images stacked along the batch."""
        glob, loc = self.unet(torch.cat(images, dim=0))
        n = images[0].shape[0]
        return list(glob.split(n)), list(loc.split(n))

    def affine_parameters(self, moving_global: torch.Tensor, fixed_global: torch.Tensor) -> dict[str, torch.Tensor]:
        """The 15 bounded parameters. tanh bounds them smoothly (the reference's clamp stops gradients)."""
        x = self.gap(self.f_conv(torch.cat([moving_global, fixed_global], dim=1))).flatten(1)
        return {
            "rotation": torch.tanh(self.fc_rot(x)) * spatial.MAX_ROTATION,
            "scale": 1 + torch.tanh(self.fc_scl(x)) * spatial.MAX_SCALE_CHANGE,
            "translation": self.fc_trans(x),  # in half-extents of the grid
            "shear": torch.tanh(self.fc_shear(x)) * spatial.MAX_SHEAR,
        }

    def predict_affine(self, moving_global: torch.Tensor, fixed_global: torch.Tensor,
                       shape: tuple[int, ...]) -> torch.Tensor:
        p = self.affine_parameters(moving_global, fixed_global)
        translation = p["translation"] * spatial.half_extent(shape, p["translation"].device, p["translation"].dtype)
        return spatial.affine_from_parameters(p["rotation"], p["scale"], translation, p["shear"])

    def predict_displacement(self, moving_local_aligned: torch.Tensor, fixed_local: torch.Tensor) -> torch.Tensor:
        return self.out_flow(self.sp_conv(torch.cat([moving_local_aligned, fixed_local], dim=1)))

    def restore(self, local: torch.Tensor) -> torch.Tensor:
        return self.res_conv(local)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> GVSLOutput:
        (g_fixed, g_moving), (l_fixed, l_moving) = self.encode(fixed, moving)
        shape = fixed.shape[2:]
        affine = self.predict_affine(g_moving, g_fixed, shape)
        displacement = self.predict_displacement(spatial.warp(l_moving, affine), l_fixed)
        warped = spatial.warp(moving, affine, displacement)
        return GVSLOutput(self.restore(l_fixed), warped, affine, displacement)



class GVSLSegmenter(nn.Module):
    """Downstream model of the paper: the GVSL backbone plus a 3x3x3 convolution to class scores."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = DEFAULT_WIDTH, norm: str = "group"):
        super().__init__()
        self.width, self.num_classes, self.norm = width, num_classes, norm
        self.unet = UNet(in_channels, width, norm)
        self.seg_head = nn.Conv3d(self.unet.channels[8], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seg_head(self.unet(x)[1])

    def load_backbone(self, state_dict: dict[str, torch.Tensor]) -> int:
        """Copy the ``unet.*`` weights of a GVSL pre-training state_dict; returns how many tensors."""
        backbone = {k[len("unet."):]: v for k, v in state_dict.items() if k.startswith("unet.")}
        self.unet.load_state_dict(backbone, strict=True)
        return len(backbone)
