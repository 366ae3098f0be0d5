"""The registration pipeline: inputs checked, a start chosen, the stages run, physical transforms out.

initial alignment (a given initial transform, centres of intensity mass or of geometry) -> both
images and masks on one isotropic working grid over the fixed image -> optionally the GVSL
network's prediction -> a search over large rotations -> rigid, then affine refinement -> a
stationary velocity field coarse to fine -> ITK transforms that map fixed-space points to
moving-space points (LPS, mm).

The network and the optimiser only see the working grid; ``gvsl.geometry`` turns their results
into physical transforms.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .. import geometry, similarity as similarities, spatial
from ..runtime import resolve_device
from ..volumes import MIN_SIZE, auto_preset, normalise
from . import deformable, linear
from .landmarks import Landmarks, pair, target_registration_error
from .options import DEFAULT_SPACING, INITIALISATIONS, RegistrationError, RegistrationOptions, RegistrationResult
from .pyramid import Pyramid
from .quality import jacobian_determinant, quality, similarity_figures

Progress = Callable[[str, float], None]  # (stage, fraction of the whole job done)
# The linear stage's similarity for each deformable one: mutual information has the wider capture
# range for a multi-modal affine (as in elastix and ANTs); MIND then refines locally.
LINEAR_SIMILARITY = {"ncc": "ncc", "mind": "mi", "mi": "mi"}


def centres(fixed: sitk.Image, moving: sitk.Image, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Physical centres (of geometry, or of intensity mass) of the two images."""
    def centre(image: sitk.Image) -> np.ndarray:
        if mode == "geometry":
            return np.array(image.TransformContinuousIndexToPhysicalPoint((np.array(image.GetSize()) - 1) / 2))
        arr = sitk.GetArrayViewFromImage(image).astype(np.float64)
        weights = np.clip(arr - np.percentile(arr, 1), 0, None)
        if weights.sum() <= 0:
            weights = np.ones_like(arr)
        idx = np.array([(weights.sum(axis=tuple(a for a in range(3) if a != ax)) * np.arange(arr.shape[ax])).sum()
                        for ax in range(3)]) / weights.sum()
        return np.array(image.TransformContinuousIndexToPhysicalPoint(idx[::-1].tolist()))

    return centre(fixed), centre(moving)


def initial_alignment(fixed: sitk.Image, moving: sitk.Image, mode: str = "moments",
                      initial: np.ndarray | None = None) -> np.ndarray:
    """4x4 fixed -> moving start: ``initial`` (default identity) after a translation that superimposes
    the centres (of geometry or of intensity mass) as seen through it; ``none`` adds no translation."""
    if mode not in INITIALISATIONS:
        raise RegistrationError(f"initialisation must be one of {', '.join(INITIALISATIONS)}, got {mode!r}")
    start = np.eye(4) if initial is None else initial
    if mode == "none":
        return start
    c_fixed, c_moving = centres(fixed, moving, mode)
    shift = np.eye(4)
    shift[:3, 3] = (np.linalg.inv(start) @ np.append(c_moving, 1))[:3] - c_fixed
    return start @ shift


def linear_matrix(transform: sitk.Transform, what: str = "the initial transform") -> np.ndarray:
    """A linear (rigid, similarity, affine, or a composite of those) 3D ITK transform as a 4x4 matrix."""
    if transform.GetDimension() != 3:
        raise RegistrationError(f"{what} is {transform.GetDimension()}D; a 3D transform is needed")
    parts = [transform.Downcast()]
    while isinstance(parts[-1], sitk.CompositeTransform):
        composite = parts.pop()
        parts += [composite.GetNthTransform(i).Downcast() for i in range(composite.GetNumberOfTransforms())]
    nonlinear = [p.GetName() for p in parts if isinstance(p, (sitk.DisplacementFieldTransform, sitk.BSplineTransform))]
    basis = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64) * 100.0
    mapped = np.array([transform.TransformPoint(p.tolist()) for p in basis])
    m = np.eye(4)
    m[:3, 3] = mapped[0]
    m[:3, :3] = (mapped[1:] - mapped[0]).T / 100.0
    probes = np.random.default_rng(0).uniform(-150, 150, (8, 3))
    expected = probes @ m[:3, :3].T + m[:3, 3]
    actual = np.array([transform.TransformPoint(p.tolist()) for p in probes])
    if nonlinear or not np.allclose(actual, expected, atol=1e-3):
        raise RegistrationError(f"{what} is not linear ({', '.join(nonlinear) or transform.GetName()}); give a "
                                "rigid or affine transform "
                                "(harden a deformable one into the moving image first)")
    if abs(np.linalg.det(m[:3, :3])) < 1e-6:
        raise RegistrationError(f"{what} is singular (it collapses space onto a plane)")
    return m


def _rounded(values) -> tuple:
    return tuple(round(float(v), 3) for v in values)


def _volume_mm3(image: sitk.Image) -> float:
    return float(np.prod(np.array(image.GetSize()) * np.array(image.GetSpacing())))


def _presets(normalize, fixed: sitk.Image, moving: sitk.Image) -> tuple[str, str]:
    pair_ = (normalize, normalize) if isinstance(normalize, str) else tuple(normalize)
    return tuple(auto_preset(img) if p == "auto" else p for p, img in zip(pair_, (fixed, moving)))


def _to_tensor(image: sitk.Image, preset: str, device: torch.device, mask: sitk.Image | None = None) -> torch.Tensor:
    inside = None if mask is None else sitk.GetArrayViewFromImage(mask) > 0.5
    return torch.from_numpy(normalise(sitk.GetArrayFromImage(image), preset, inside))[None, None].to(device)


def _check_image(image: sitk.Image, role: str) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise RegistrationError(f"the {role} image must be a 3D scalar volume, got {image.GetDimension()}D with "
                                f"{image.GetNumberOfComponentsPerPixel()} component(s)")


def _check_size(image: sitk.Image, role: str, spacing: float) -> None:
    """Pre-training's minimum: MIN_SIZE voxels per axis, in the file and on the working grid (whose
    spacing follows the fixed image)."""
    size, pixel = np.array(image.GetSize()), np.array(image.GetSpacing())
    on_grid = size * pixel / spacing
    if size.min() < MIN_SIZE or on_grid.min() < MIN_SIZE:
        raise RegistrationError(
            f"the {role} image is too small to register: {tuple(int(v) for v in size)} voxels of "
            f"{_rounded(pixel)} mm ({_rounded(size * pixel)} mm); "
            f"at least {MIN_SIZE} voxels per axis are needed, also on the {spacing:g} mm working grid")


def mask_problem(mask: sitk.Image, image: sitk.Image) -> str:
    """Why ``mask`` cannot restrict the similarity on ``image`` ("" when it can): no voxels, or none inside."""
    if mask.GetDimension() != 3:
        return f"is {mask.GetDimension()}D; a 3D mask is needed"
    if not sitk.GetArrayViewFromImage(mask).any():
        return "has no voxels (every value is 0)"
    on_image = sitk.Resample(mask != 0, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    if not sitk.GetArrayViewFromImage(on_image).any():
        return "lies outside its image (no mask voxel falls inside the image's extent)"
    return ""


def _mask_on_grid(mask: sitk.Image | None, image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None,
                  role: str) -> sitk.Image | None:
    if mask is None:
        return None
    problem = mask_problem(mask, image)
    if problem:
        raise RegistrationError(f"the {role} mask {problem}")
    on_grid = sitk.Resample(sitk.Cast(mask != 0, sitk.sitkFloat32), grid, transform or sitk.Transform(),
                            sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    if not (sitk.GetArrayViewFromImage(on_grid) > 0.5).any():
        raise RegistrationError(f"the {role} mask does not overlap the fixed image after the initial alignment")
    return on_grid


def _network_prediction(ckpt, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GVSL network's affine (voxel matrix) and displacement (normalised) on the working grid."""
    from ..checkpoint import build_gvsl
    from ..networks import check_input_size

    try:
        check_input_size(tuple(fixed.shape[2:]), ckpt.norm)
    except ValueError as e:
        raise RegistrationError(f"{ckpt.path} was trained with instance normalisation, too fine for this pair: "
                                f"{e}") from None
    model = build_gvsl(ckpt).to(fixed.device).eval()
    with torch.no_grad():
        out = model(fixed, moving)
    return out.affine, spatial.displacement_to_normalised(out.displacement)


def _landmark_pairs(fixed_landmarks, moving_landmarks):
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise RegistrationError("landmarks need both a fixed and a moving set")
    if fixed_landmarks is None:
        return None
    wrap = [lm if isinstance(lm, Landmarks) else Landmarks(np.asarray(lm, dtype=np.float64).reshape(-1, 3),
                                                            [str(i + 1) for i in range(len(lm))], role)
            for lm, role in ((fixed_landmarks, "the fixed landmarks"), (moving_landmarks, "the moving landmarks"))]
    return pair(*wrap)


def register(fixed: sitk.Image, moving: sitk.Image, fixed_labels: sitk.Image | None = None,
             moving_labels: sitk.Image | None = None, model=None, options: RegistrationOptions | None = None,
             progress: Progress | None = None, *, fixed_mask: sitk.Image | None = None,
             moving_mask: sitk.Image | None = None, initial_transform: sitk.Transform | None = None,
             fixed_landmarks=None, moving_landmarks=None,
             on_images: Callable[[sitk.Image, sitk.Image, sitk.Image, dict | None], None] | None = None
             ) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; every output is in physical space (see RegistrationResult).

    Masks (any geometry, non-zero = use) restrict the similarity to where both hold.
    ``initial_transform`` (fixed -> moving, linear) is applied first. Landmarks (``Landmarks`` or
    (n, 3) LPS mm arrays) give the target registration error before and after. ``on_images`` is
    called with the result's ``before``, ``warped``, ``jacobian`` and ``landmarks`` as soon as they
    exist, before the quality figures: a caller can start drawing them.
    """
    opts = options or RegistrationOptions()
    opts.check()
    report = progress or (lambda stage, fraction: None)
    start = time.perf_counter()
    _check_image(fixed, "fixed")
    _check_image(moving, "moving")
    landmark_pairs = _landmark_pairs(fixed_landmarks, moving_landmarks)
    initial = linear_matrix(initial_transform) if initial_transform is not None else None
    device = resolve_device(opts.device)
    presets = _presets(opts.normalize, fixed, moving)

    # 1. initial alignment and the working grid over the fixed image
    report("initial alignment", 0.0)
    centring = opts.initialisation or ("none" if initial is not None else "moments")
    init = initial_alignment(fixed, moving, centring, initial)
    init_tf = geometry.affine_transform(init)
    spacing = opts.spacing or (model.meta.get("spacing", [DEFAULT_SPACING])[0] if model is not None
                               else max(DEFAULT_SPACING, float(np.median(fixed.GetSpacing()))))
    _check_size(fixed, "fixed", float(spacing))
    _check_size(moving, "moving", float(spacing))
    fixed_extent = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    if max(moving.GetSpacing()) * MIN_SIZE > fixed_extent.min():
        raise RegistrationError(f"the moving image's voxels ({_rounded(moving.GetSpacing())} mm) are too coarse: "
                                f"fewer than {MIN_SIZE} of them span the fixed image ({_rounded(fixed_extent)} mm)")
    grid = geometry.working_grid(fixed, float(spacing), opts.max_size)
    f_img = geometry.resample(fixed, grid)
    m_img = geometry.resample(moving, grid, init_tf)
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    overlap = geometry.resample(ones, grid, init_tf, sitk.sitkNearestNeighbor, 0)
    overlap_mm3 = float(sitk.GetArrayViewFromImage(overlap).sum()) * grid.GetSpacing()[0] ** 3
    smaller_mm3 = min(_volume_mm3(fixed), _volume_mm3(moving))
    if overlap_mm3 < 0.01 * smaller_mm3:
        raise RegistrationError("the moving image does not overlap the fixed image after initial alignment "
                                f"({overlap_mm3 / smaller_mm3:.1%} of the smaller image; voxel sizes: fixed "
                                f"{_rounded(fixed.GetSpacing())} mm, moving {_rounded(moving.GetSpacing())} mm); "
                                "check the images' origins, directions and spacings, or use another initialisation")
    fm_img = _mask_on_grid(fixed_mask, fixed, grid, None, "fixed")
    mm_img = _mask_on_grid(moving_mask, moving, grid, init_tf, "moving")
    if fm_img is not None and mm_img is not None and not (sitk.GetArrayFromImage(fm_img * mm_img) > 0.25).any():
        raise RegistrationError("the fixed and moving masks do not overlap after the initial alignment")
    f_t, m_t = _to_tensor(f_img, presets[0], device, fm_img), _to_tensor(m_img, presets[1], device, mm_img)
    masks = [None if m is None else torch.from_numpy(sitk.GetArrayFromImage(m))[None, None].to(device)
             for m in (fm_img, mm_img)]
    shape = tuple(f_t.shape[2:])

    timing = {"preparation": time.perf_counter() - start}
    # 2. the similarity, and the network's prediction or the identity
    if opts.similarity == "auto":
        inside = [None if m is None else m.cpu().numpy() > 0.5 for m in masks]
        name, reason = similarities.choose(presets, f_t.cpu().numpy(), m_t.cpu().numpy(), *inside)
    else:
        name, reason = opts.similarity, "chosen by the user"
    floor = similarities.FIELD_NCC_FLOOR if opts.mode == "deformable" else None
    sim = similarities.make(name, opts.ncc_window, floor)
    linear_sim = similarities.make(LINEAR_SIMILARITY[name], opts.ncc_window, floor)
    base = spatial.identity_matrix(1, device)
    control = tuple(max(4, round(s / opts.levels[0][1])) for s in shape)
    velocity = torch.zeros(1, 3, *control, device=device)
    if model is not None:  # on the images as normalised, as the network was trained
        report("network prediction", 0.02)
        net_affine, disp = _network_prediction(model, f_t, m_t)
        if opts.mode != "rigid":
            base = net_affine
        velocity = spatial.resize(disp, control)
    f_t, m_t, masks[0], auto_mask = similarities.prepare(name, f_t, m_t, masks[0])
    pyramid = Pyramid(f_t, m_t, *masks)

    # 3. the linear stage: rotation search, rigid, affine
    mark = time.perf_counter()
    weight = f_t if masks[0] is None else f_t * masks[0]
    centre = (torch.tensor(shape[::-1], device=device, dtype=torch.float32) - 1) / 2
    params = linear.LinearParameters(linear.centre_of_mass(weight), centre, float(centre.max()))
    deformable_share = 0.5 if opts.mode == "deformable" else 0.0
    span = 0.8 - deformable_share
    params, search_info = linear.run(pyramid, linear_sim, base, params, opts.mode, opts.linear_levels(name),
                                     max(1, opts.iterations // 2), opts.rotation_search,
                                     lambda stage, x: report(stage, 0.05 + span * x),
                                     lr=opts.affine_lr, tolerance=opts.tolerance, patience=opts.patience)
    matrix = linear.compose(base, params.matrix())
    timing["linear"] = time.perf_counter() - mark
    mark = time.perf_counter()

    # 4. the deformable stage
    optimised = None  # the velocity field
    if opts.mode == "deformable":
        theta = spatial.to_normalised(matrix, shape)
        optimised = deformable.optimise(
            pyramid, sim, theta, velocity, opts.levels, opts.iterations, opts.deform_lr,
            opts.smooth_weight * sim.smooth_scale, opts.tolerance, opts.patience,
            lambda x: report("deformable", 0.05 + span + deformable_share * x))

    timing["deformable"] = time.perf_counter() - mark
    mark = time.perf_counter()
    # 5. physical transforms
    report("transforms", 0.9)
    registered = geometry.voxel_matrix_to_physical(matrix[0].double().cpu().numpy(), grid)
    if opts.mode == "rigid":
        registered[:3, :3] = linear.orthonormalise(registered[:3, :3])
    affine_m = init @ registered
    affine = geometry.affine_transform(affine_m)
    field = None
    if optimised is None:
        forward, inverse = affine, affine.GetInverse()
    else:  # the field stays on the working grid, its own resolution: ITK interpolates it as the
        # optimiser did, and a 1 mm fixed grid does not multiply the files by 8 for nothing.
        # The inverse field is exp(-v), exact for a stationary velocity field up to the integration
        # (ITK's fixed-point inversion took 0.3-0.4 s of a 3 s registration on 2 CPU cores).
        field, inverse_field = (
            geometry.displacement_image(spatial.displacement_from_normalised(
                spatial.integrate_velocity(v), shape)[0].cpu().numpy(), grid) for v in (optimised, -optimised))
        forward = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Image(field))])
        inverse = sitk.CompositeTransform([sitk.DisplacementFieldTransform(inverse_field), affine.GetInverse()])

    # 6. outputs and quality figures
    report("resampling", 0.93)
    warped = geometry.resample(moving, fixed, forward)
    before = geometry.resample(moving, fixed)
    warped_labels = None
    if moving_labels is not None:
        warped_labels = geometry.resample(moving_labels, fixed, forward, sitk.sitkNearestNeighbor, 0)
    affine_det = float(np.linalg.det(affine_m[:3, :3]))
    jacobian_w = jacobian_determinant(field, affine_det, grid)
    jacobian = sitk.Resample(jacobian_w, fixed, sitk.Transform(), sitk.sitkLinear, affine_det)  # for the figure
    landmarks = None
    if landmark_pairs is not None:
        fixed_pts, moving_pts, labels = landmark_pairs
        landmarks = {"fixed": fixed_pts, "labels": labels,
                     "moving": np.array([inverse.TransformPoint(p.tolist()) for p in moving_pts])}
    if on_images is not None:
        on_images(before, warped, jacobian, landmarks)
    metrics = similarity_figures(f_img, geometry.resample(moving, grid), geometry.resample(moving, grid, forward),
                                 presets, name, opts.ncc_window, fm_img)
    metrics["similarity"]["reason"] = reason
    metrics.update(quality(grid, jacobian_w, forward, inverse, fixed_labels, moving_labels, warped_labels))
    if landmark_pairs is not None:
        metrics["tre_before"] = target_registration_error(None, fixed_pts, moving_pts, labels)
        metrics["tre_after"] = target_registration_error(forward, fixed_pts, moving_pts, labels)
    metrics.update(mode=opts.mode, normalize={"fixed": presets[0], "moving": presets[1]},
                   start={"initial_transform": initial is not None, "centring": centring,
                          "rotation_search": search_info},
                   masks={"fixed": "given" if fixed_mask is not None else
                          "the fixed image's foreground (multi-modal)" if auto_mask else None,
                          "moving": "given" if moving_mask is not None else None},
                   runtime_s=round(time.perf_counter() - start, 2), device=str(device),
                   timing_s={**{k: round(v, 2) for k, v in timing.items()},
                             "transforms_and_figures": round(time.perf_counter() - mark, 2)},
                   working_grid={"size": list(grid.GetSize()), "spacing_mm": grid.GetSpacing()[0]},
                   model=str(model.path) if model is not None else None)
    report("done", 1.0)
    return RegistrationResult(affine, field, forward, inverse, warped, before, jacobian, warped_labels, metrics,
                              grid, landmarks)

