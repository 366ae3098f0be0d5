"""Affine + deformable registration of two volumes in physical space.

Pipeline: initial alignment (centres of geometry or of intensity mass) -> both images on one
isotropic working grid over the fixed image -> optionally the GVSL network's affine and
displacement prediction -> instance optimisation (Adam over a 12-parameter affine at quarter
resolution, then a stationary velocity field coarse to fine, local NCC + smoothness, early
stopping) -> ITK
transforms that map fixed-space points to moving-space points (LPS, mm).

The network and the optimiser only see the working grid; ``gvsl.geometry`` turns their results
into physical transforms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import geometry, spatial
from .checkpoint import Checkpoint, build_gvsl
from .data import normalise
from .losses import local_ncc, smoothness
from .runtime import resolve_device

INITIALISATIONS = ("moments", "geometry", "none")
DEFAULT_SPACING = 2.0  # mm: finer working grids cost much more time for little accuracy
Progress = Callable[[str, float], None]  # (stage, fraction of the whole job done)


class RegistrationError(ValueError):
    pass


@dataclass
class RegistrationOptions:
    spacing: float | None = None  # working grid, mm; default: the model's, else the fixed image's median
    #                                spacing but no finer than DEFAULT_SPACING
    max_size: int = 160  # voxels per axis of the working grid at most
    iterations: int = 100  # deformable iterations over all levels (the affine stage: half as many)
    initialisation: str = "moments"  # see INITIALISATIONS
    normalize: str = "auto"  # ct | mr | auto (ct when the fixed image holds Hounsfield-like values)
    ncc_window: int = 7
    smooth_weight: float = 1.0
    affine_lr: float = 0.01
    deform_lr: float = 0.02
    # deformable levels: (image shrink, velocity-grid shrink, share of the iterations), coarse to fine
    levels: tuple = ((4, 8, 0.45), (2, 4, 0.45), (1, 4, 0.1))
    affine_shrink: float = 4.0  # the affine stage runs on images shrunk by this factor
    tolerance: float = 1e-5  # early stopping: relative loss change over `patience` iterations
    patience: int = 20
    device: str = "auto"


@dataclass
class RegistrationResult:
    affine: sitk.AffineTransform  # fixed -> moving, linear part
    displacement: sitk.Image  # LPS mm vectors on the fixed grid, applied before the affine
    transform: sitk.CompositeTransform  # fixed -> moving: affine(x + d(x))
    inverse: sitk.CompositeTransform  # moving -> fixed
    warped: sitk.Image  # moving on the fixed grid (linear)
    before: sitk.Image  # moving on the fixed grid as the files place it (no registration), for comparison
    jacobian: sitk.Image  # determinant of the fixed -> moving mapping's Jacobian on the fixed grid
    warped_labels: sitk.Image | None
    metrics: dict = field(default_factory=dict)
    working_grid: sitk.Image | None = None


def initial_alignment(fixed: sitk.Image, moving: sitk.Image, mode: str = "moments") -> np.ndarray:
    """4x4 fixed->moving translation that superimposes the centres (of geometry or of intensity mass);
    ``none`` trusts the images' physical positions as they are."""
    if mode not in INITIALISATIONS:
        raise ValueError(f"initialisation must be one of {INITIALISATIONS}, got {mode!r}")
    if mode == "none":
        return np.eye(4)

    def centre(image: sitk.Image) -> np.ndarray:
        if mode == "geometry":
            return np.array(image.TransformContinuousIndexToPhysicalPoint((np.array(image.GetSize()) - 1) / 2))
        arr = sitk.GetArrayFromImage(image).astype(np.float64)
        weights = np.clip(arr - np.percentile(arr, 1), 0, None)
        if weights.sum() <= 0:
            weights = np.ones_like(arr)
        idx = np.array([(weights.sum(axis=tuple(a for a in range(3) if a != ax)) * np.arange(arr.shape[ax])).sum()
                        for ax in range(3)]) / weights.sum()
        return np.array(image.TransformContinuousIndexToPhysicalPoint(idx[::-1].tolist()))

    m = np.eye(4)
    m[:3, 3] = centre(moving) - centre(fixed)
    return m


def _volume_mm3(image: sitk.Image) -> float:
    return float(np.prod(np.array(image.GetSize()) * np.array(image.GetSpacing())))


def auto_preset(image: sitk.Image) -> str:
    arr = sitk.GetArrayViewFromImage(image)
    return "ct" if float(np.percentile(arr, 1)) < -500 else "mr"


def _to_tensor(image: sitk.Image, preset: str, device: torch.device) -> torch.Tensor:
    arr = normalise(sitk.GetArrayFromImage(image), preset)
    return torch.from_numpy(arr)[None, None].to(device)


def _smooth_resize(image: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    factor = max(s / t for s, t in zip(image.shape[2:], shape))
    if factor > 1.5:
        image = F.avg_pool3d(image, 3, 1, 1, count_include_pad=False)
    return spatial.resize(image, shape)


class _Stopper:
    def __init__(self, tolerance: float, patience: int):
        self.tolerance, self.patience, self.history = tolerance, patience, []

    def __call__(self, loss: float) -> bool:
        self.history.append(loss)
        if len(self.history) <= self.patience:
            return False
        old = self.history[-self.patience - 1]
        return (old - loss) / max(abs(old), 1e-8) < self.tolerance


def _affine_stage(fixed: torch.Tensor, moving: torch.Tensor, theta0: torch.Tensor, opts: RegistrationOptions,
                  iterations: int, report: Callable[[float], None]) -> torch.Tensor:
    """Adam over the 12 normalised affine parameters on shrunk images."""
    shape = tuple(max(8, round(s / opts.affine_shrink)) for s in fixed.shape[2:])
    f, m = _smooth_resize(fixed, shape), _smooth_resize(moving, shape)
    delta = torch.zeros_like(theta0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=opts.affine_lr)
    stop = _Stopper(opts.tolerance, opts.patience)
    for i in range(iterations):
        warped = spatial.sample(m, spatial.normalised_grid(shape, theta0 + delta))
        loss = local_ncc(warped, f, opts.ncc_window)
        opt.zero_grad()
        loss.backward()
        opt.step()
        report((i + 1) / iterations)
        if stop(loss.item()):
            break
    return (theta0 + delta).detach()


def _deformable_stage(fixed: torch.Tensor, moving: torch.Tensor, theta: torch.Tensor, velocity0: torch.Tensor,
                      opts: RegistrationOptions, iterations: int, report: Callable[[float], None]) -> torch.Tensor:
    """Adam over a stationary velocity field, coarse to fine: at each level the images are shrunk by
    one factor and the velocity lives on a grid shrunk by another. The velocity is kept in normalised
    units, so it carries over from level to level by plain resizing."""
    full = tuple(fixed.shape[2:])
    velocity = velocity0
    done = 0
    for image_shrink, control_shrink, share in opts.levels:
        n = max(1, round(share * iterations))
        shape = tuple(max(8, round(s / image_shrink)) for s in full)
        control = tuple(max(4, round(s / control_shrink)) for s in full)
        f, m = (fixed, moving) if shape == full else (_smooth_resize(fixed, shape), _smooth_resize(moving, shape))
        velocity = spatial.resize(velocity.detach(), control).requires_grad_(True)
        opt = torch.optim.Adam([velocity], lr=opts.deform_lr / max(control))
        units = spatial.half_extent(control, fixed.device).reshape(1, 3, 1, 1, 1)  # -> control voxels
        stop = _Stopper(opts.tolerance, opts.patience)
        for _ in range(n):
            disp = spatial.integrate_velocity(velocity)
            warped = spatial.sample(m, spatial.normalised_grid(shape, theta, disp))
            loss = local_ncc(warped, f, opts.ncc_window) + opts.smooth_weight * smoothness(disp * units)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            report(min(1.0, done / iterations))
            if stop(loss.item()):
                break
    return spatial.integrate_velocity(velocity.detach())


def _network_prediction(ckpt: Checkpoint, fixed: torch.Tensor, moving: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GVSL network's affine (normalised theta) and displacement (normalised) on the working grid."""
    model = build_gvsl(ckpt).to(fixed.device).eval()
    with torch.no_grad():
        out = model(fixed, moving)
    shape = tuple(fixed.shape[2:])
    return spatial.to_normalised(out.affine, shape), spatial.displacement_to_normalised(out.displacement)


def jacobian_determinant(displacement: sitk.Image, affine_det: float) -> sitk.Image:
    return sitk.DisplacementFieldJacobianDeterminant(displacement) * affine_det


def _dice(a: np.ndarray, b: np.ndarray, labels: list[int]) -> dict[str, float]:
    out = {}
    for v in labels:
        x, y = a == v, b == v
        denom = x.sum() + y.sum()
        out[str(v)] = float(2 * (x & y).sum() / denom) if denom else float("nan")
    return out


def _local_ncc_similarity(a: sitk.Image, b: sitk.Image, preset: str, window: int) -> float:
    ta = torch.from_numpy(normalise(sitk.GetArrayFromImage(a), preset))[None, None]
    tb = torch.from_numpy(normalise(sitk.GetArrayFromImage(b), preset))[None, None]
    return float(1 - local_ncc(ta, tb, window))


def _check_image(image: sitk.Image, role: str) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise RegistrationError(f"the {role} image must be a 3D scalar volume, got {image.GetDimension()}D with "
                                f"{image.GetNumberOfComponentsPerPixel()} component(s)")


def register(fixed: sitk.Image, moving: sitk.Image, fixed_labels: sitk.Image | None = None,
             moving_labels: sitk.Image | None = None, model: Checkpoint | None = None,
             options: RegistrationOptions | None = None, progress: Progress | None = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; every output is in physical space (see RegistrationResult)."""
    opts = options or RegistrationOptions()
    report = progress or (lambda stage, fraction: None)
    start = time.perf_counter()
    _check_image(fixed, "fixed")
    _check_image(moving, "moving")
    device = resolve_device(opts.device)
    preset = opts.normalize if opts.normalize != "auto" else auto_preset(fixed)
    if model is not None:
        preset = model.meta.get("normalize", preset)

    # 1. initial alignment and the working grid over the fixed image
    report("initial alignment", 0.0)
    init = initial_alignment(fixed, moving, opts.initialisation)
    spacing = opts.spacing or (model.meta.get("spacing", [DEFAULT_SPACING])[0] if model is not None
                               else max(DEFAULT_SPACING, float(np.median(fixed.GetSpacing()))))
    grid = geometry.working_grid(fixed, float(spacing), opts.max_size)
    f_img = geometry.resample(fixed, grid)
    m_img = geometry.resample(moving, grid, geometry.affine_transform(init))
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    overlap = geometry.resample(ones, grid, geometry.affine_transform(init), sitk.sitkNearestNeighbor, 0)
    overlap_mm3 = float(sitk.GetArrayViewFromImage(overlap).sum()) * grid.GetSpacing()[0] ** 3
    smaller_mm3 = min(_volume_mm3(fixed), _volume_mm3(moving))
    if overlap_mm3 < 0.01 * smaller_mm3:
        raise RegistrationError("the moving image does not overlap the fixed image after initial alignment "
                                f"({overlap_mm3 / smaller_mm3:.1%} of the smaller image); check the images' "
                                "origins and directions, or use another initialisation")
    f_t = _to_tensor(f_img, preset, device)
    m_t = _to_tensor(m_img, preset, device)
    shape = tuple(f_t.shape[2:])
    control = tuple(max(4, round(s / opts.levels[0][1])) for s in shape)

    # 2. the network's prediction, or the identity
    theta = spatial.to_normalised(spatial.identity_matrix(1, device), shape)
    velocity = torch.zeros(1, 3, *control, device=device)
    if model is not None:
        report("network prediction", 0.02)
        theta, disp = _network_prediction(model, f_t, m_t)
        velocity = spatial.resize(disp, control)

    # 3. instance optimisation
    affine_iters = max(1, opts.iterations // 2)
    theta = _affine_stage(f_t, m_t, theta, opts, affine_iters, lambda x: report("affine", 0.05 + 0.3 * x))
    disp = _deformable_stage(f_t, m_t, theta, velocity, opts, opts.iterations,
                             lambda x: report("deformable", 0.35 + 0.5 * x))

    # 4. physical transforms
    report("transforms", 0.87)
    voxel_matrix = _theta_to_voxel(theta, shape)
    affine_m = init @ geometry.voxel_matrix_to_physical(voxel_matrix, grid)
    affine = geometry.affine_transform(affine_m)
    disp_vox = spatial.displacement_from_normalised(disp, shape)[0].cpu().numpy()
    field_w = geometry.displacement_image(disp_vox, grid)
    field_f = _on_grid(field_w, fixed)
    forward = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Image(field_f))])
    # invert on the working grid (the field's own resolution), then bring it to the fixed grid
    inverse_w = sitk.InvertDisplacementField(field_w, maximumNumberOfIterations=10,
                                             maxErrorToleranceThreshold=0.01, meanErrorToleranceThreshold=0.001)
    inverse = sitk.CompositeTransform([sitk.DisplacementFieldTransform(_on_grid(inverse_w, fixed)),
                                       affine.GetInverse()])

    # 5. outputs and quality figures
    report("resampling", 0.92)
    warped = geometry.resample(moving, fixed, forward)
    before = geometry.resample(moving, fixed)
    warped_labels = None
    if moving_labels is not None:
        warped_labels = geometry.resample(moving_labels, fixed, forward, sitk.sitkNearestNeighbor, 0)
    jacobian = jacobian_determinant(field_f, float(np.linalg.det(affine_m[:3, :3])))
    metrics = quality(fixed, before, warped, jacobian, forward, inverse, preset, opts.ncc_window,
                      fixed_labels, moving_labels, warped_labels)
    metrics.update(runtime_s=round(time.perf_counter() - start, 2), device=str(device),
                   working_grid={"size": list(grid.GetSize()), "spacing_mm": grid.GetSpacing()[0]},
                   model=str(model.path) if model is not None else None, normalize=preset)
    report("done", 1.0)
    return RegistrationResult(affine, field_f, forward, inverse, warped, before, jacobian, warped_labels, metrics,
                              grid)


def _on_grid(field: sitk.Image, grid: sitk.Image) -> sitk.Image:
    return sitk.Resample(field, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)


def _theta_to_voxel(theta: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of spatial.to_normalised for one matrix."""
    s = spatial.half_extent(shape, theta.device, theta.dtype)
    linear = theta[0, :, :3] * s.reshape(3, 1) / s.reshape(1, 3)
    translation = theta[0, :, 3] * s
    return torch.cat([linear, translation[:, None]], dim=1).double().cpu().numpy()


def quality(fixed: sitk.Image, before: sitk.Image, warped: sitk.Image, jacobian: sitk.Image,
            forward: sitk.Transform, inverse: sitk.Transform, preset: str, window: int,
            fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
            warped_labels: sitk.Image | None = None) -> dict:
    """Local NCC before/after, Dice per label, folding and inverse consistency."""
    out = {"ncc_before": round(_local_ncc_similarity(fixed, before, preset, window), 4),
           "ncc_after": round(_local_ncc_similarity(fixed, warped, preset, window), 4)}
    jac = sitk.GetArrayFromImage(jacobian)
    out["folding_percent"] = round(float((jac <= 0).mean() * 100), 4)
    out["jacobian_min"] = round(float(jac.min()), 4)
    round_trip = sitk.CompositeTransform([inverse, forward])  # forward first, then inverse
    err = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        round_trip, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(),
        fixed.GetDirection()))
    norms = np.linalg.norm(err, axis=-1)
    out["inverse_consistency_mm"] = {"mean": round(float(norms.mean()), 4),
                                     "p95": round(float(np.percentile(norms, 95)), 4)}
    if fixed_labels is not None and moving_labels is not None:
        fl = sitk.GetArrayFromImage(fixed_labels)
        labels = [int(v) for v in np.unique(fl) if v != 0]
        moved_before = sitk.GetArrayFromImage(geometry.resample(moving_labels, fixed_labels, None,
                                                                sitk.sitkNearestNeighbor, 0))
        out["dice_before"] = _dice(fl, moved_before, labels)
        if warped_labels is not None:
            on_fixed = sitk.GetArrayFromImage(geometry.resample(warped_labels, fixed_labels, None,
                                                                sitk.sitkNearestNeighbor, 0))
            out["dice_after"] = _dice(fl, on_fixed, labels)
    return out
