"""The linear stage: a search over large rotations, then rigid and affine refinement by Adam.

Everything here is a voxel matrix of ``gvsl.spatial`` on the isotropic working grid, so a rotation
in voxels is a rotation in millimetres. Rotations and scalings turn about ``pivot``, the fixed
image's centre of intensity mass (where the initial alignment put the moving image's centre), so
that turning the moving image does not also shift it.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
import torch

from .. import spatial
from .optim import Adam, Stopper
from .pyramid import Pyramid

SEARCH_ANGLES_DEG = (-60, -30, 0, 30, 60)  # per axis: 125 orientations, any start within about 75 degrees
SEARCH_KEEP = 3  # the best few orientations (besides the start) are refined before one is chosen
SEARCH_MARGIN = 0.01  # a coarse orientation is refined only if it matches at least 1 % better than the start
SEARCH_BATCH_VOXELS = 1 << 20  # candidates scored at once: about 100 MB of intermediate tensors
START_OVERLAP = 0.8  # a start or orientation must keep this share of the overlap of the images' fields of view
# ... and this share of their overlap inside the fixed mask (or automatic foreground). Not more: a partial
# field of view in place can hold less of the mask than one slid elsewhere (the top of a head holds less
# foreground than its middle; at 0.8 a half head in place lost to one slid down by 63 mm)
MASK_OVERLAP = 0.25
SHIFTS_KEPT = 2  # of the shifts along a short axis (a partial field of view), the best few are refined


def centre_of_mass(image: torch.Tensor) -> torch.Tensor:
    """(x, y, z) voxel coordinates of the intensity centre of mass of an (1, 1, D, H, W) image."""
    w = image[0, 0].clamp_min(0)
    total = w.sum().clamp_min(1e-8)
    coords = [torch.arange(n, device=w.device, dtype=w.dtype) for n in w.shape]
    z = (w.sum((1, 2)) * coords[0]).sum() / total
    y = (w.sum((0, 2)) * coords[1]).sum() / total
    x = (w.sum((0, 1)) * coords[2]).sum() / total
    return torch.stack([x, y, z])


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The voxel matrix that samples at ``outer(inner(p))``."""
    a_o, t_o = outer[:, :, :3], outer[:, :, 3]
    a_i, t_i = inner[:, :, :3], inner[:, :, 3]
    t = (a_o @ t_i.unsqueeze(-1)).squeeze(-1) + t_o
    return torch.cat([a_o @ a_i, t.unsqueeze(-1)], dim=2)


class LinearParameters:
    """Rotation (radians), translation (in units of ``unit`` voxels), log-scales and shears about ``pivot``.

    ``rigid`` optimises the first two only; ``free_affine()`` then frees the other two. Plain tensors, no
    autograd: the linear stage differentiates its matrix by hand (``theta_and_jacobian``).
    """

    def __init__(self, pivot: torch.Tensor, centre: torch.Tensor, unit: float, rotation=None):
        device = pivot.device
        self.pivot, self.centre, self.unit = pivot, centre, unit
        self.rotation = torch.zeros(1, 3, device=device) if rotation is None else rotation.clone().reshape(1, 3)
        self.translation = torch.zeros(1, 3, device=device)
        self.log_scale = torch.zeros(1, 3, device=device)
        self.shear = torch.zeros(1, 6, device=device)
        self.rigid = True

    NAMES = ("rotation", "translation", "log_scale", "shear")  # the order of ``all()``

    def all(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.NAMES]

    def trainable(self) -> list[torch.Tensor]:
        return self.all()[:2] if self.rigid else self.all()

    def free_affine(self) -> None:
        self.rigid = False

    def matrix(self, **values: torch.Tensor) -> torch.Tensor:
        """The voxel matrix (1, 3, 4); with parameters given by name, each (N, k), one matrix per row in
        place of the parameters' own (N, 3, 4): the search's candidate rotations, the Jacobian's steps."""
        p = {name: values.get(name, getattr(self, name)) for name in self.NAMES}
        n = max(v.shape[0] for v in p.values())
        dtype = p["rotation"].dtype
        rotation, translation, log_scale, shear = (p[name].to(dtype).expand(n, -1) for name in self.NAMES)
        a = spatial.affine_from_parameters(rotation, log_scale.exp(), torch.zeros_like(rotation), shear)[:, :, :3]
        eye = torch.eye(3, device=a.device, dtype=dtype)
        t = (a - eye) @ (self.centre - self.pivot).to(a.device, dtype) + translation * self.unit
        return torch.cat([a, t.unsqueeze(-1)], dim=2)

    def copy(self) -> "LinearParameters":
        other = LinearParameters(self.pivot, self.centre, self.unit, self.rotation)
        for mine, theirs in zip(other.all(), self.all()):
            mine.copy_(theirs)
        other.rigid = self.rigid
        return other


def _theta(base: torch.Tensor, params: LinearParameters, shape: tuple[int, ...], **values) -> torch.Tensor:
    """The normalised matrix of ``params`` after ``base``; ``values``: as ``LinearParameters.matrix``."""
    return spatial.to_normalised(compose(base, params.matrix(**values)), shape)


JACOBIAN_STEP = 1e-4  # radians, log-scales, shears and translation units: all of order 0.01-1


@torch.no_grad()
def theta_and_jacobian(base: torch.Tensor, params: LinearParameters,
                       shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """theta (1, 3, 4) on ``base``'s device, and its Jacobian by the trainable parameters, (12, P) on the
    CPU, by central differences in float64 (error about 1e-9 relative; MPS has no float64) from one
    batched evaluation. Differentiating the matrix's few hundred tiny operations by autograd was a
    third of each quarter-resolution step."""
    def cpu(t):
        return t.detach().to("cpu", torch.float64)

    trainable = len(params.trainable())
    sizes = [t.shape[1] for t in params.all()]
    flat = torch.cat([cpu(t) for t in params.all()], dim=1)
    p = sum(sizes[:trainable])
    steps = torch.zeros(p, flat.shape[1], dtype=flat.dtype)
    steps[:, :p] = JACOBIAN_STEP * torch.eye(p, dtype=flat.dtype)
    rows = torch.cat([flat, flat + steps, flat - steps])
    thetas = _theta(cpu(base), params, shape, **dict(zip(params.NAMES, rows.split(sizes, 1))))
    jacobian = (thetas[1:p + 1] - thetas[p + 1:]).reshape(p, 12).T / (2 * JACOBIAN_STEP)
    return thetas[:1].to(base.device, base.dtype), jacobian


def optimise(pyramid: Pyramid, similarity, base: torch.Tensor, params: LinearParameters, shrinks, iterations: int,
             lr: float, tolerance: float, patience: int, report: Callable[[float], None] = lambda x: None) -> None:
    """Adam over ``params.trainable()`` at each shrink factor in turn.

    The step size halves from level to level and decays linearly to a tenth within each: Adam's
    steps are about ``lr`` whatever the gradient, so a constant rate would leave the result
    jittering by about 0.5 degree, half a millimetre at the edge of a head."""
    total = max(1, iterations * len(shrinks))
    done = 0
    for k, shrink in enumerate(shrinks):
        level = pyramid.level(shrink, similarity)
        level_lr = lr / 2 ** k
        opt = Adam(params.trainable(), lr=level_lr)
        stop = Stopper(tolerance, patience)
        for i in range(iterations):
            opt.lr = level_lr * (1 - 0.9 * i / iterations)
            theta, jacobian = theta_and_jacobian(base, params, pyramid.shape)
            theta.requires_grad_(True)
            loss = level.loss(similarity, level.grid(similarity, theta))
            loss.backward()
            grad = jacobian.T @ theta.grad.reshape(12).to("cpu", torch.float64)  # the chain rule, by hand
            for p, g in zip(params.trainable(), grad.split([t.shape[1] for t in params.trainable()])):
                p.grad = g.reshape(p.shape).to(p.device, p.dtype)
            opt.step()
            done += 1
            report(done / total)
            if stop(loss.item()):
                break
        done = iterations * (k + 1)  # early stopping skips the rest of this level's share


def candidate_rotations() -> list[tuple[float, float, float]]:
    """Euler angles (radians, about x, y, z) of the orientations the search tries, the initial
    alignment's own (0, 0, 0) first."""
    grid = [tuple(math.radians(a) for a in angles) for angles in itertools.product(SEARCH_ANGLES_DEG, repeat=3)]
    grid.remove((0.0, 0.0, 0.0))
    return [(0.0, 0.0, 0.0)] + grid


def keeps_overlap(overlap: list[float], reference: list[float]) -> bool:
    """Whether ``overlap`` ((fields of view, inside the mask), from ``Level.overlap``) keeps enough of
    ``reference``'s: a similarity averaged over the overlap must not win by shrinking it."""
    return overlap[0] >= START_OVERLAP * reference[0] and overlap[1] >= MASK_OVERLAP * reference[1]


def _largest(overlaps: list[list[float]]) -> list[float]:
    return [max(o[i] for o in overlaps) for i in range(2)]


def _batched(pyramid: Pyramid, similarity, base: torch.Tensor, template: LinearParameters, shrink: float,
             **values: torch.Tensor) -> tuple[list[float], list[list[float]]]:
    """(losses, overlaps) of ``template`` with one parameter replaced by each row of ``values`` (one
    name), at one coarse level. The candidates are warped as batches (up to SEARCH_BATCH_VOXELS voxels
    at once): one interpolation and one similarity per batch instead of a hundred small ones, which
    left a CPU's cores idle."""
    level = pyramid.level(shrink, similarity)
    (name, rows), = values.items()
    losses, overlaps = [], []
    for batch in rows.split(max(1, SEARCH_BATCH_VOXELS // math.prod(level.shape))):
        grid = level.grid(similarity, _theta(base, template, pyramid.shape, **{name: batch}))
        losses.append(level.loss(similarity, grid, per_item=True))
        overlaps.append(level.overlap(similarity, grid))
    return torch.cat(losses).tolist(), torch.cat(overlaps).tolist()


@torch.no_grad()
def score_rotations(pyramid: Pyramid, similarity, base: torch.Tensor, template: LinearParameters,
                    shrink: float) -> list[tuple[float, float, tuple]]:
    """(loss, overlap, angles) of every candidate orientation (absolute: about the initial alignment's
    axes) with ``template``'s translation, at one coarse level, best first."""
    angles = candidate_rotations()
    rotations = torch.tensor(angles, device=template.rotation.device, dtype=template.rotation.dtype)
    losses, overlaps = _batched(pyramid, similarity, base, template, shrink, rotation=rotations)
    return sorted(zip(losses, overlaps, angles), key=lambda s: s[0])


@torch.no_grad()
def _score_and_overlap(pyramid: Pyramid, similarity, base: torch.Tensor, params: LinearParameters,
                       shrink: float) -> tuple[float, float]:
    losses, overlaps = _batched(pyramid, similarity, base, params, shrink, rotation=params.rotation)
    return losses[0], overlaps[0]


def choose_start(pyramid: Pyramid, similarity, base: torch.Tensor, start: LinearParameters, shrink: float,
                 iterations: int, starts: list, **args) -> tuple[LinearParameters, str, list]:
    """Refine each start rigidly at one coarse level and keep the best, among those that keep at least
    enough of the largest overlap (``keeps_overlap``). ``starts``: [(name, translation (1, 3) in ``start``'s units)], the first being
    ``start``'s own; translations whose name begins with "shift" are scored first and only the best
    SHIFTS_KEPT of them refined."""
    named = [s for s in starts if not s[0].startswith("shift")]
    shifts = [s for s in starts if s[0].startswith("shift")]
    if shifts:
        with torch.no_grad():
            rows = torch.cat([t for _, t in shifts]).to(start.translation)
            losses, overlaps = _batched(pyramid, similarity, base, start, shrink, translation=rows)
        most = _largest(overlaps)
        ranked = sorted((loss, i) for i, (loss, overlap) in enumerate(zip(losses, overlaps))
                        if keeps_overlap(overlap, most))
        named += [shifts[i] for _, i in ranked[:SHIFTS_KEPT]]
    refined = []
    for name, translation in named:
        params = start.copy()
        params.translation.copy_(translation.to(params.translation))
        optimise(pyramid, similarity, base, params, (shrink,), iterations, **args)
        refined.append((*_score_and_overlap(pyramid, similarity, base, params, shrink), name, params))
    most = _largest([r[1] for r in refined])
    eligible = [r for r in refined if keeps_overlap(r[1], most)]
    loss, _, name, params = min(eligible, key=lambda r: r[0])
    first = refined[0]  # the prepared start stays unless another matches clearly better: each switch costs precision
    if first in eligible and loss > first[0] - SEARCH_MARGIN * abs(first[0]):
        loss, _, name, params = first
    compared = [{"start": n, "loss": round(l_, 5), "overlap": round(o[0] / most[0], 3),
                 "overlap_in_mask": round(o[1] / max(most[1], 1e-8), 3)} for l_, o, n, _ in refined]
    return params, name, compared


def search(pyramid: Pyramid, similarity, base: torch.Tensor, start: LinearParameters, shrink: float,
           iterations: int, lr: float, tolerance: float, patience: int, starts: list | None = None,
           rotations: bool = True) -> tuple[LinearParameters, dict]:
    """Refine the start (and each other start, keeping the best: ``choose_start``) rigidly, then score a
    grid of large rotations at one coarse level; refine the few that match better than the refined
    start, and keep whichever matches best after refinement.

    The start is always a contender, so the search can only improve the similarity, and images that
    are already roughly aligned pay for one coarse scoring pass, not for extra refinements. A rotation
    that loses the start's overlap (``keeps_overlap``) is not a contender."""
    args = dict(lr=lr, tolerance=tolerance, patience=patience)
    params, name, compared = choose_start(pyramid, similarity, base, start, shrink, iterations,
                                          starts or [("the start", start.translation)], **args)
    start_score, start_overlap = _score_and_overlap(pyramid, similarity, base, params, shrink)
    results = [(start_score, None, params)]
    ranked = score_rotations(pyramid, similarity, base, params, shrink) if rotations else []
    margin = SEARCH_MARGIN * abs(start_score)
    better = [angles for loss, overlap, angles in ranked
              if loss < start_score - margin and keeps_overlap(overlap, start_overlap)][:SEARCH_KEEP]
    for angles in better:  # half the iterations: a candidate must win clearly, or the start stays
        candidate = params.copy()
        candidate.rotation.copy_(torch.tensor([angles], device=candidate.rotation.device))
        optimise(pyramid, similarity, base, candidate, (shrink,), max(1, iterations // 2), **args)
        loss, overlap = _score_and_overlap(pyramid, similarity, base, candidate, shrink)
        if keeps_overlap(overlap, start_overlap):
            results.append((loss, angles, candidate))
    loss, angles, params = min(results, key=lambda r: r[0])
    info = {"start": name, "starts": compared, "candidates": len(ranked), "refined": len(better),
            "taken_deg": [round(math.degrees(a), 1) for a in params.rotation[0].tolist()],
            "taken": "the start" if angles is None else "a searched orientation",
            "loss_start": round(start_score, 5), "loss_taken": round(loss, 5)}
    return params, info


def refine(pyramid: Pyramid, similarity, base: torch.Tensor, params: LinearParameters, mode: str, shrinks: tuple,
           iterations: int, report: Callable[[str, float], None], searched: bool, **args) -> LinearParameters:
    """Rigid refinement, then affine unless ``mode`` is rigid, from ``params``. ``searched``: the start
    came from ``search``, which already refined it rigidly at the coarsest level."""
    coarsest, finer = shrinks[:1], shrinks[1:]
    if mode == "rigid":
        rigid_shrinks = finer if searched else shrinks
    else:
        rigid_shrinks = () if searched else coarsest
    if rigid_shrinks:
        optimise(pyramid, similarity, base, params, rigid_shrinks, iterations,
                 report=lambda x: report("rigid", 0.1 + (0.9 if mode == "rigid" else 0.3) * x), **args)
    if mode != "rigid":
        params.free_affine()
        optimise(pyramid, similarity, base, params, shrinks, iterations,
                 report=lambda x: report("affine", 0.4 + 0.6 * x), **args)
    return params


def orthonormalise(matrix: np.ndarray) -> np.ndarray:
    """The nearest rotation to a 3x3 matrix (polar decomposition): a rigid result stays exactly rigid."""
    u, _, vt = np.linalg.svd(matrix)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return r
