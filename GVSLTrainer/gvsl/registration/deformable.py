"""The deformable stage: a stationary velocity field optimised coarse to fine by Adam."""
from __future__ import annotations

from typing import Callable

import torch

from .. import spatial
from ..losses import smoothness
from .optim import Adam, Stopper
from .pyramid import Pyramid


def optimise(pyramid: Pyramid, similarity, theta: torch.Tensor, velocity0: torch.Tensor, levels, iterations: int,
             lr: float, smooth_weight: float, tolerance: float, patience: int,
             report: Callable[[float], None] = lambda x: None) -> torch.Tensor:
    """The stationary velocity field, in normalised units on the last level's control grid: its
    scaling and squaring (``spatial.integrate_velocity``) is the displacement, which does not fold,
    and that of its negative the inverse displacement.

    At each level the images are shrunk by one factor and the velocity lives on a grid shrunk by
    another. The velocity is kept in normalised units, so it carries over from level to level by
    plain resizing.
    """
    full = pyramid.shape
    velocity = velocity0
    done = 0
    for image_shrink, control_shrink, share in levels:
        n = max(1, round(share * iterations))
        level = pyramid.level(image_shrink, similarity)
        control = tuple(max(4, round(s / control_shrink)) for s in full)
        velocity = spatial.resize(velocity.detach(), control).requires_grad_(True)
        opt = Adam([velocity], lr=lr / max(control))
        units = spatial.half_extent(control, velocity.device).reshape(1, 3, 1, 1, 1)  # -> control voxels
        stop = Stopper(tolerance, patience)
        affine = level.grid(similarity, theta)  # theta is fixed here: one affine grid per level
        for _ in range(n):
            disp = spatial.integrate_velocity(velocity)
            loss = (level.loss(similarity, level.grid(similarity, theta, disp, base=affine))
                    + smooth_weight * smoothness(disp * units))
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            report(min(1.0, done / iterations))
            if stop(loss.item()):
                break
    return velocity.detach()
