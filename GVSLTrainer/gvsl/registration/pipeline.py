"""The registration pipeline: the stages run on the prepared pair, physical transforms out.

``preparation`` (inputs checked, the initial alignment, the working grid) -> optionally the GVSL
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
from ..volumes import normalise
from . import deformable, linear
from .landmarks import target_registration_error
from .options import RegistrationError, RegistrationOptions, RegistrationResult
from .preparation import Prepared, prepare
from .pyramid import Pyramid
from .quality import jacobian_determinant, quality, similarity_figures

Progress = Callable[[str, float], None]  # (stage, fraction of the whole job done)
# The linear stage's similarity for each deformable one: mutual information has the wider capture
# range for a multi-modal affine (as in elastix and ANTs); MIND then refines locally.
LINEAR_SIMILARITY = {"ncc": "ncc", "mind": "mi", "mi": "mi"}


def _to_tensor(image: sitk.Image, preset: str, device: torch.device, mask: sitk.Image | None = None) -> torch.Tensor:
    inside = None if mask is None else sitk.GetArrayViewFromImage(mask) > 0.5
    return torch.from_numpy(normalise(sitk.GetArrayFromImage(image), preset, inside))[None, None].to(device)


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
    prepared = prepare(fixed, moving, options, fixed_mask=fixed_mask, moving_mask=moving_mask,
                       initial_transform=initial_transform, fixed_landmarks=fixed_landmarks,
                       moving_landmarks=moving_landmarks, model=model)
    return register_prepared(prepared, fixed_labels, moving_labels, model, progress, on_images)


def register_prepared(prepared: Prepared, fixed_labels: sitk.Image | None = None,
                      moving_labels: sitk.Image | None = None, model=None, progress: Progress | None = None,
                      on_images: Callable[[sitk.Image, sitk.Image, sitk.Image, dict | None], None] | None = None
                      ) -> RegistrationResult:
    """``register`` from the pair as ``preparation.prepare`` left it (given the same ``model``)."""
    opts = prepared.options
    report = progress or (lambda stage, fraction: None)
    start = time.perf_counter() - prepared.seconds
    device = resolve_device(opts.device)
    fixed, moving, presets, grid, init = prepared.fixed, prepared.moving, prepared.presets, prepared.grid, prepared.init
    fm_img = prepared.fixed_mask_on_grid
    report("normalising the images", 0.0)  # the initial alignment was done by prepare()
    f_t = _to_tensor(prepared.fixed_on_grid, presets[0], device, fm_img)
    m_t = _to_tensor(prepared.moving_on_grid, presets[1], device, prepared.moving_mask_on_grid)
    masks = [None if m is None else torch.from_numpy(sitk.GetArrayFromImage(m))[None, None].to(device)
             for m in (fm_img, prepared.moving_mask_on_grid)]
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
    warped_labels = None
    if moving_labels is not None:
        warped_labels = geometry.resample(moving_labels, fixed, forward, sitk.sitkNearestNeighbor, 0)
    affine_det = float(np.linalg.det(affine_m[:3, :3]))
    jacobian_w = jacobian_determinant(field, affine_det, grid)
    jacobian = sitk.Resample(jacobian_w, fixed, sitk.Transform(), sitk.sitkLinear, affine_det)  # for the figure
    landmarks = None
    if prepared.landmarks is not None:
        fixed_pts, moving_pts, labels = prepared.landmarks
        landmarks = {"fixed": fixed_pts, "labels": labels,
                     "moving": np.array([inverse.TransformPoint(p.tolist()) for p in moving_pts])}
    if on_images is not None:
        on_images(prepared.before, warped, jacobian, landmarks)
    metrics = similarity_figures(prepared.fixed_on_grid, prepared.before_on_grid,
                                 geometry.resample(moving, grid, forward),
                                 presets, name, opts.ncc_window, fm_img)
    metrics["similarity"]["reason"] = reason
    metrics.update(quality(grid, jacobian_w, forward, inverse, fixed_labels, moving_labels, warped_labels))
    if prepared.landmarks is not None:
        metrics["tre_before"] = target_registration_error(None, fixed_pts, moving_pts, labels)
        metrics["tre_after"] = target_registration_error(forward, fixed_pts, moving_pts, labels)
    metrics.update(mode=opts.mode, normalize={"fixed": presets[0], "moving": presets[1]},
                   start={"initial_transform": prepared.initial is not None, "centring": prepared.centring,
                          "rotation_search": search_info},
                   masks={"fixed": "given" if fm_img is not None else
                          "the fixed image's foreground (multi-modal)" if auto_mask else None,
                          "moving": "given" if prepared.moving_mask_on_grid is not None else None},
                   runtime_s=round(time.perf_counter() - start, 2), device=str(device),
                   timing_s={**{k: round(v, 2) for k, v in timing.items()},
                             "transforms_and_figures": round(time.perf_counter() - mark, 2)},
                   working_grid={"size": list(grid.GetSize()), "spacing_mm": grid.GetSpacing()[0]},
                   model=str(model.path) if model is not None else None)
    report("done", 1.0)
    return RegistrationResult(affine, field, forward, inverse, warped, prepared.before, jacobian, warped_labels,
                              metrics, grid, landmarks)

