"""The deformable stage: a stationary velocity field optimised coarse to fine by Adam, for one pair or
for a batch of pairs that share the fixed image (a cohort on a GPU)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import spatial
from ..losses import smoothness
from .optim import Adam, Stopper
from .pyramid import Level, Pyramid


@dataclass
class Job:
    """One pair's deformable stage, as the linear stage leaves it: run alone (``optimise_jobs`` of one)
    or batched with others whose ``key`` is the same."""
    pyramid: Pyramid
    similarity: object
    theta: torch.Tensor  # (1, 3, 4), normalised
    velocity: torch.Tensor  # (1, 3, ...): the start, on the first level's control grid
    levels: tuple
    iterations: int
    lr: float
    smooth_weight: float
    tolerance: float
    patience: int
    report: Callable[[float], None] = lambda x: None
    seconds: float = 0.0  # the optimisation's (its batch's) wall time, once run

    def key(self) -> tuple:
        """What pairs must share to be optimised as one batch: the same arithmetic, grids and channels."""
        p = self.pyramid
        settings = tuple(sorted((k, v) for k, v in vars(self.similarity).items()
                                if isinstance(v, (int, float, str, type(None)))))
        return (type(self.similarity).__name__, settings, tuple(self.levels), self.iterations, self.lr,
                self.smooth_weight, self.tolerance, self.patience, p.shape, p.masked, p.moving_domain is None,
                p.finer is None, tuple(self.velocity.shape), str(self.velocity.device))


# What a pair's deformable stage holds beyond its pyramid, per working-grid voxel: 180-190 bytes measured
# on the CPU (1.07 M voxels, batches of 1, 2 and 4), with room for the running-sum box means of a GPU.
PAIR_BYTES_PER_VOXEL = 300


def batch_that_fits(shape: tuple[int, ...], device: torch.device) -> int:
    """How many pairs on a working grid of ``shape`` half the GPU's free memory holds (no cap elsewhere:
    a CPU batch is the caller's choice)."""
    if device.type != "cuda":
        return 1 << 30
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(0.5 * free // (PAIR_BYTES_PER_VOXEL * math.prod(shape))))


def optimise_jobs(jobs: list[Job], batch_size: int = 1) -> list[torch.Tensor]:
    """Each job's velocity field (as ``optimise`` returns it), jobs with the same ``key`` optimised up to
    ``batch_size`` at a time (fewer if the GPU's free memory holds fewer), in their order."""
    out: list[torch.Tensor | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.key(), []).append(i)
    for members in groups.values():
        first = jobs[members[0]]
        size = max(1, min(batch_size, batch_that_fits(first.pyramid.shape, first.velocity.device)))
        for start in range(0, len(members), size):
            chunk = [jobs[i] for i in members[start:start + size]]

            def report(x: float, chunk=chunk) -> None:
                for job in chunk:
                    job.report(x)

            began = time.perf_counter()
            try:
                fields = optimise([j.pyramid for j in chunk], first.similarity, torch.cat([j.theta for j in chunk]),
                                  torch.cat([j.velocity for j in chunk]), first.levels, first.iterations, first.lr,
                                  first.smooth_weight, first.tolerance, first.patience, report)
            except torch.cuda.OutOfMemoryError:  # the memory estimate was short: one pair at a time
                if len(chunk) == 1:
                    raise
                torch.cuda.empty_cache()
                fields = torch.cat(optimise_jobs(chunk, 1))
            for i, field in zip(members[start:start + size], fields.split(1)):
                out[i] = field
                jobs[i].seconds = time.perf_counter() - began
    return out


def _together(levels: list[Level]) -> Level:
    """One level holding every pair's moving features as a batch; the fixed features (and mask) once
    where the pairs share them, as a cohort's do."""
    first = levels[0]
    if len(levels) == 1:
        return first

    def shared(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        if tensors[0] is None or all(t is tensors[0] or torch.equal(t, tensors[0]) for t in tensors[1:]):
            return tensors[0]
        return torch.cat(tensors)

    moving = torch.cat([level.moving for level in levels])
    if moving.shape[1] > 1:
        moving = moving.contiguous(memory_format=torch.channels_last_3d)  # as Pyramid.level lays it out
    return Level(first.shape, shared([level.fixed for level in levels]), moving,
                 shared([level.fixed_mask for level in levels]), first.masked, first.with_domain)


def optimise(pyramids: list[Pyramid], similarity, theta: torch.Tensor, velocity0: torch.Tensor, levels,
             iterations: int, lr: float, smooth_weight: float, tolerance: float, patience: int,
             report: Callable[[float], None] = lambda x: None) -> torch.Tensor:
    """The stationary velocity fields (N, 3, ...) of N pairs on one working grid, in normalised units on
    the last level's control grid: a field's scaling and squaring (``spatial.integrate_velocity``) is
    the displacement, which does not fold, and that of its negative the inverse displacement.

    At each level the images are shrunk by one factor and the velocity lives on a grid shrunk by
    another. The velocity is kept in normalised units, so it carries over from level to level by
    plain resizing.

    A batch is N registrations, not one: the loss is the sum of the pairs' own losses (so each field
    gets the gradient it gets alone, and Adam's steps are per element), and each pair stops early by
    its own loss, its field then held where it stopped while the others go on.
    """
    full = pyramids[0].shape
    velocity = velocity0
    n_pairs = len(pyramids)
    done = 0
    for image_shrink, control_shrink, share in levels:
        n = max(1, round(share * iterations))
        level = _together([pyramid.level(image_shrink, similarity) for pyramid in pyramids])
        control = tuple(max(4, round(s / control_shrink)) for s in full)
        velocity = spatial.resize(velocity.detach(), control).requires_grad_(True)
        opt = Adam([velocity], lr=lr / max(control))
        units = spatial.half_extent(control, velocity.device).reshape(1, 3, 1, 1, 1)  # -> control voxels
        stoppers = [Stopper(tolerance, patience) for _ in range(n_pairs)]
        running = [True] * n_pairs
        affine = level.grid(similarity, theta)  # theta is fixed here: one affine grid per level
        for _ in range(n):
            disp = spatial.integrate_velocity(velocity)
            losses = (level.loss(similarity, level.grid(similarity, theta, disp, base=affine), per_item=True)
                      + smooth_weight * smoothness(disp * units, per_item=True))
            opt.zero_grad()
            losses.sum().backward()
            stopped = [i for i, r in enumerate(running) if not r]
            held = velocity.detach()[stopped].clone() if stopped else None
            opt.step()
            if stopped:
                with torch.no_grad():
                    velocity[stopped] = held
            done += 1
            report(min(1.0, done / iterations))
            for i, value in enumerate(losses.tolist()):
                if running[i] and stoppers[i](value):
                    running[i] = False
            if not any(running):
                break
    return velocity.detach()
