"""The registration pipeline: the stages run on the prepared pair, physical transforms out.

``preparation`` (inputs checked, the initial alignment, the working grid) -> optionally the GVSL
network's prediction -> a search over large rotations -> rigid, then affine refinement -> a
stationary velocity field coarse to fine -> ITK transforms that map fixed-space points to
moving-space points (LPS, mm).

The network and the optimiser only see the working grid; ``gvsl.geometry`` turns their results
into physical transforms.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Generator

import numpy as np
import SimpleITK as sitk
import torch

from .. import geometry, similarity as similarities, spatial
from ..runtime import resolve_device
from ..volumes import normalise
from . import deformable, linear
from . import polish as polishing
from .kept import kept
from .landmarks import target_registration_error
from .options import RegistrationError, RegistrationOptions, RegistrationResult
from .preparation import (Prepared, fixed_content, focused, initial_alignment, linear_matrix, moving_inside,
                          partial_levels, partial_shrinks, prepare, thinnest)
from .pyramid import Pyramid
from .quality import domain_overlap, jacobian_determinant, quality, similarity_figures
from .quality import warnings as quality_warnings

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


CENTRINGS = {"none": "the headers' placement", "moments": "the centres of intensity mass",
             "geometry": "the centres of the images' extents"}
SAME_START_MM = 5.0  # starts closer than this are one start
FINER_SIMILARITIES = ("ncc", "mi")  # MIND's descriptors are made at the working grid's scale: not on a finer copy
SEARCH_ACROSS = 8  # voxels across a partial field of view's thinnest side below which orientations are not searched:
#                    a 20 mm slab at a quarter of a 2 mm grid (2.5 voxels) matched best turned by 56 degrees
SHIFT_AXIS = 0.7  # a field of view shorter than this share of the other's along an axis is searched along it


def start_candidates(prepared: Prepared, unit: float) -> list[tuple[str, torch.Tensor]]:
    """[(name, translation (1, 3) in the linear parameters' units)] of the starts the search compares:
    the prepared start first, the other centring (``prepare``'s alternatives), and for a partial field
    of view shorter than the fixed image along an axis, shifts along that axis over the fixed extent
    (``linear.choose_start``)."""
    out = [(CENTRINGS.get(prepared.centring, prepared.centring), torch.zeros(1, 3))]
    for centring, matrix in prepared.alternatives:
        relative = np.linalg.inv(prepared.init) @ matrix
        if np.linalg.norm(relative[:3, 3]) >= SAME_START_MM:
            voxels = geometry.physical_to_voxel_matrix(relative, prepared.grid)[:, 3]
            out.append((CENTRINGS.get(centring, centring), torch.tensor(voxels / unit, dtype=torch.float32)[None]))
    if prepared.partial and prepared.compare_starts:
        out += _shifts(prepared, unit)
    return out


def _shifts(prepared: Prepared, unit: float) -> list[tuple[str, torch.Tensor]]:
    """Translations that slide the shorter field of view along the longer one (either image's), along each
    axis where it is much shorter, from one end to the other, about a third of its length apart."""
    grid, size = prepared.grid, np.array(prepared.grid.GetSize())
    spacing = grid.GetSpacing()[0]
    to_fixed = np.linalg.inv(prepared.init)
    corners = [prepared.moving.TransformContinuousIndexToPhysicalPoint(
        [-0.5 if c == "0" else n - 0.5 for c, n in zip(bits, prepared.moving.GetSize())])
        for bits in ("000", "001", "010", "011", "100", "101", "110", "111")]
    on_grid = np.array([grid.TransformPhysicalPointToContinuousIndex((to_fixed @ np.append(c, 1))[:3].tolist())
                        for c in corners])  # the moving field of view at the start, in working-grid voxels (x, y, z)
    out = []
    for axis in range(3):
        low, high, n = on_grid[:, axis].min() + 0.5, on_grid[:, axis].max() + 0.5, size[axis]
        shorter = min(high - low, n)
        if shorter >= SHIFT_AXIS * max(high - low, n):
            continue
        step = max(2.0, shorter / 3, 8.0 / spacing)
        # the grid samples the moving image at p + t: from its low end at the grid's low end to the high ends met
        first, last = sorted((low, high - n))
        for shift in np.arange(first, last + 1e-6, step):
            if abs(shift) * spacing >= SAME_START_MM:
                t = np.zeros(3)
                t[axis] = shift
                out.append((f"shift of {-shift * spacing:+.0f} mm along {'xyz'[axis]}",
                            torch.tensor(t / unit, dtype=torch.float32)[None]))
    return out


def register(fixed: sitk.Image, moving: sitk.Image, fixed_labels: sitk.Image | None = None,
             moving_labels: sitk.Image | None = None, model=None, options: RegistrationOptions | None = None,
             progress: Progress | None = None, *, fixed_mask: sitk.Image | None = None,
             moving_mask: sitk.Image | None = None, initial_transform: sitk.Transform | None = None,
             fixed_landmarks=None, moving_landmarks=None,
             on_images: Callable[..., None] | None = None
             ) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; every output is in physical space (see RegistrationResult).

    Masks (any geometry, non-zero = use) restrict the similarity to where both hold.
    ``initial_transform`` (fixed -> moving, linear) is applied first. Landmarks (``Landmarks`` or
    (n, 3) LPS mm arrays) give the target registration error before and after. ``on_images`` is
    called with the result's ``before``, ``warped``, the Jacobian (None when linear), ``landmarks`` and
    the label maps to outline as soon as they exist, before the quality figures: a caller can start
    drawing them.
    """
    prepared = prepare(fixed, moving, options, fixed_mask=fixed_mask, moving_mask=moving_mask,
                       initial_transform=initial_transform, fixed_landmarks=fixed_landmarks,
                       moving_landmarks=moving_landmarks, model=model)
    return register_prepared(prepared, fixed_labels, moving_labels, model, progress, on_images)


def swapped_linear(prepared: Prepared) -> np.ndarray:
    """4x4 fixed -> moving: the inverse of the moving image registered (linearly: rigid in rigid mode,
    else affine) onto the fixed one, for a fixed image whose field of view holds only part of the
    moving one, with the same options (and the inverse initial transform). The partial image then has
    the domain, the start search and the shifts that a moving one has; as the fixed one, a 20 mm slab's start stuck 4 mm away and a 40 mm one drifted 0.3 mm."""
    opts, (fixed_mask, moving_mask) = prepared.options, prepared.masks
    normalize = opts.normalize if isinstance(opts.normalize, str) else tuple(opts.normalize)[::-1]
    swapped = dataclasses.replace(opts, mode="rigid" if opts.mode == "rigid" else "affine", normalize=normalize,
                                  polish=False)  # the result is polished in the original roles
    initial = None if prepared.initial is None else geometry.affine_transform(np.linalg.inv(prepared.initial))
    reverse = prepare(prepared.moving, prepared.fixed, swapped, fixed_mask=moving_mask, moving_mask=fixed_mask,
                      initial_transform=initial)
    result = register_prepared(reverse, swap=False)
    return np.linalg.inv(linear_matrix(result.affine, "the swapped registration"))


def moved_from_header(prepared: Prepared, affine: np.ndarray, search: dict | None, content: np.ndarray) -> dict | None:
    """How far the result lies from where the headers place the images, when the search (another start,
    or a searched orientation) took it there: {"mm" at the fixed image's content centre, "deg", "why"}."""
    if search is None:
        return None
    reasons = []
    if search["start"] != CENTRINGS.get(prepared.centring, prepared.centring):
        reasons.append(f"it preferred {search['start']}")
    if search["taken"] != "the start":
        reasons.append(f"it took an orientation of {search['taken_deg']} degrees")
    if not reasons:
        return None
    header = initial_alignment(prepared.fixed, prepared.moving, "none", prepared.initial)
    relative = np.linalg.inv(header) @ affine
    index = np.argwhere(content).mean(axis=0)[::-1] if content.any() else (np.array(prepared.grid.GetSize()) - 1) / 2
    centre = np.append(prepared.grid.TransformContinuousIndexToPhysicalPoint(index.tolist()), 1.0)
    u, _, vt = np.linalg.svd(relative[:3, :3])
    angle = np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1)))
    return {"mm": round(float(np.linalg.norm((relative @ centre - centre)[:3])), 1), "deg": round(float(angle), 1),
            "why": " and ".join(reasons)}


def _normalised(prepared: Prepared, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The pair on its working grid as [0, 1] tensors, and the masks (None where none was given)."""
    presets, fm_img, mm_img = prepared.presets, prepared.fixed_mask_on_grid, prepared.moving_mask_on_grid
    f_t = kept("fixed tensor", (id(prepared.fixed_on_grid), presets[0], str(device), id(fm_img)),
               lambda: _to_tensor(prepared.fixed_on_grid, presets[0], device, fm_img), (prepared.fixed_on_grid, fm_img))
    m_t = _to_tensor(prepared.moving_on_grid, presets[1], device, mm_img)
    masks = [None if m is None else torch.from_numpy(sitk.GetArrayFromImage(m))[None, None].to(device)
             for m in (fm_img, mm_img)]
    return f_t, m_t, masks


def _array(image: sitk.Image, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(image))[None, None].to(device)


def _pyramid(name: str, prepared: Prepared, f_t: torch.Tensor, m_t: torch.Tensor, masks: list,
             device: torch.device, finer: bool) -> tuple[Pyramid, torch.Tensor, bool]:
    """The pyramid the stages share, as similarity ``name`` compares the pair; also the fixed image's
    weight (for the pivot) and whether that is the automatic foreground.

    With ``finer``, the moving image (its mask and domain) is also resampled, from the original, onto a
    grid of half the working spacing (``geometry.finer_grid``), which the full-resolution level
    interpolates: each interpolation of a pre-resampled copy pulls the optimum towards its grid by
    about a tenth of its voxel (slabs registered rigidly: 0.14-0.31 mm -> 0.05-0.10 mm)."""
    domain = None if prepared.moving_domain_on_grid is None else _array(prepared.moving_domain_on_grid, device)
    copy = None
    if finer:
        grid, tf = geometry.finer_grid(prepared.grid), geometry.affine_transform(prepared.init)
        mask = None
        if masks[1] is not None:
            mask = geometry.resample(sitk.Cast(prepared.masks[1] != 0, sitk.sitkFloat32), grid, tf, sitk.sitkLinear, 0.0)
        fine_domain = None if domain is None else _array(geometry.field_of_view(prepared.moving, grid, tf, soft=True),
                                                         device)
        fine = _to_tensor(geometry.resample(prepared.moving, grid, tf), prepared.presets[1], device, mask)
        copy = (similarities.prepare_moving(name, fine), None if mask is None else _array(mask, device),
                fine_domain)
    # the fixed side, its features and its levels depend only on the fixed image: kept for a cohort's next subject
    alive = (f_t, prepared.fixed_mask_on_grid)
    f_t, fixed_weight, auto_mask = kept(f"fixed as {name} compares it", tuple(map(id, alive)),
                                        lambda: similarities.prepare_fixed(name, f_t, masks[0]), alive)
    fixed_levels = kept(f"fixed levels for {name}", (id(f_t), id(fixed_weight)), dict, (f_t, fixed_weight))
    pyramid = Pyramid(f_t, similarities.prepare_moving(name, m_t), fixed_weight, masks[1], moving_domain=domain,
                      finer=copy, fixed_levels=fixed_levels)
    return pyramid, f_t if fixed_weight is None else f_t * fixed_weight, auto_mask


def _parameters(weight: torch.Tensor) -> linear.LinearParameters:
    """Linear parameters at the identity, turning about the fixed image's centre of (weighted) mass."""
    shape = tuple(weight.shape[2:])
    centre = (torch.tensor(shape[::-1], device=weight.device, dtype=torch.float32) - 1) / 2
    return linear.LinearParameters(linear.centre_of_mass(weight), centre, float(centre.max()))


def register_prepared(prepared: Prepared, fixed_labels: sitk.Image | None = None,
                      moving_labels: sitk.Image | None = None, model=None, progress: Progress | None = None,
                      on_images: Callable[..., None] | None = None,
                      swap: bool = True) -> RegistrationResult:
    """``register`` from the pair as ``preparation.prepare`` left it (given the same ``model``); ``swap``:
    whether a partial fixed image may be registered with the roles swapped (``swapped_linear``)."""
    run = stages(prepared, fixed_labels, moving_labels, model, progress, on_images, swap)
    job = next(run)
    return finish(run, None if job is None else deformable.optimise_jobs([job])[0])


def register_batch(runs: list[Generator], batch_size: int) -> list[RegistrationResult | Exception]:
    """Several ``stages`` (pairs that share the fixed image: a cohort's) with their deformable stages
    batched ``batch_size`` at a time (``deformable.optimise_jobs``). Each pair's result, or the
    exception that stopped it: one bad pair does not stop the others."""
    jobs: list = []
    for run in runs:
        try:
            jobs.append(next(run))
        except Exception as e:  # noqa: BLE001 - returned in its place
            jobs.append(e)
    batched = [j for j in jobs if isinstance(j, deformable.Job)]
    try:
        fields = dict(zip(map(id, batched), deformable.optimise_jobs(batched, batch_size)))
    except Exception as e:  # noqa: BLE001 - the pairs that were to be optimised fail with it, the others finish
        fields = {}
        jobs = [e if isinstance(j, deformable.Job) else j for j in jobs]
    out: list[RegistrationResult | Exception] = []
    for run, job in zip(runs, jobs):
        if isinstance(job, Exception):
            run.close()
            out.append(job)
            continue
        try:
            out.append(finish(run, None if job is None else fields[id(job)]))
        except Exception as e:  # noqa: BLE001
            out.append(e)
    return out


def finish(run: Generator, velocity: torch.Tensor | None) -> RegistrationResult:
    """The rest of ``stages`` once its deformable job (if it yielded one) is optimised."""
    try:
        run.send(velocity)
    except StopIteration as done:
        return done.value
    raise RuntimeError("a registration's stages yielded twice")


def stages(prepared: Prepared, fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
           model=None, progress: Progress | None = None, on_images: Callable[..., None] | None = None,
           swap: bool = True) -> Generator[deformable.Job | None, torch.Tensor | None, RegistrationResult]:
    """``register_prepared`` as a generator: it yields once, the deformable stage's ``Job`` (None in the
    linear modes), takes the optimised velocity field (``send``), and returns the result, so that a
    caller can optimise several pairs' fields as one batch (``register_batch``)."""
    opts = prepared.options
    report = progress or (lambda stage, fraction: None)
    start = time.perf_counter() - prepared.seconds
    device = resolve_device(opts.device)
    original = prepared  # the whole working grid, which the quality figures compare on
    fixed, moving, presets = prepared.fixed, prepared.moving, prepared.presets
    fm_img = prepared.fixed_mask_on_grid
    report("normalising the images", 0.0)  # the initial alignment was done by prepare()
    f_t, m_t, masks = _normalised(prepared, device)
    shape = tuple(f_t.shape[2:])

    timing = {"preparation": time.perf_counter() - start}
    # 2. the similarity, and the network's prediction or the identity
    if opts.similarity == "auto":
        inside = [None if m is None else m.cpu().numpy() > 0.5 for m in masks]
        name, reason = similarities.choose(presets, f_t.cpu().numpy(), m_t.cpu().numpy(), *inside)
    else:
        name, reason = opts.similarity, "chosen by the user"
    floor = similarities.FIELD_NCC_FLOOR if opts.mode == "deformable" else None
    # kept per fixed image, with what they keep of it (local-NCC moments, mutual information's fixed histogram rows)
    sim, linear_sim = (kept(f"similarity {n}", (n, opts.ncc_window, floor, id(f_t)),
                            lambda n=n: similarities.make(n, opts.ncc_window, floor), (f_t,))
                       for n in (name, LINEAR_SIMILARITY[name]))
    base = spatial.identity_matrix(1, device)
    control = tuple(max(4, round(s / opts.levels[0][1])) for s in shape)
    velocity = torch.zeros(1, 3, *control, device=device)
    if model is not None:  # on the images as normalised, as the network was trained
        report("network prediction", 0.02)
        net_affine, disp = _network_prediction(model, f_t, m_t)
        if opts.mode != "rigid":
            base = net_affine
        velocity = spatial.resize(disp, control)
    finer = opts.finer_moving and opts.mode != "deformable" and model is None and name in FINER_SIMILARITIES
    pyramid, weight, auto_mask = _pyramid(name, prepared, f_t, m_t, masks, device, finer)

    # 3. the linear stage: the search over starts and rotations, rigid, affine
    mark = time.perf_counter()
    params = _parameters(weight)
    deformable_share = 0.5 if opts.mode == "deformable" else 0.0
    span = 0.8 - deformable_share
    args = dict(lr=opts.affine_lr, tolerance=opts.tolerance, patience=opts.patience)
    iterations = max(1, opts.iterations // 2)
    starts = None if model is not None else start_candidates(prepared, params.unit)  # a network's start is its own
    shrinks = opts.linear_levels(name)
    partial = prepared.partial and model is None
    search_info = None
    swapped = swap and prepared.fixed_partial and model is None
    if swapped:  # the partial image's place is searched for as the moving image, then the result inverted
        report("searching the start (roles swapped)", 0.05)
        start_m = swapped_linear(prepared)
        search_info = {"start": "the registration with the roles swapped", "taken": "the start",
                       "why": "the fixed image's field of view holds only part of the moving image"}
        prepared = focused(prepared, np.linalg.inv(prepared.init) @ start_m, crop=False)
        f_t, m_t, masks = _normalised(prepared, device)
        pyramid, weight, auto_mask = _pyramid(name, prepared, f_t, m_t, masks, device, finer)
        params = _parameters(weight)
    elif opts.rotation_search or (starts and len(starts) > 1):
        report("searching the start", 0.05)
        across = thinnest(prepared) / shrinks[0] if partial else math.inf  # at the search's resolution
        rotations = opts.rotation_search and across >= SEARCH_ACROSS
        params, search_info = linear.search(pyramid, linear_sim, base, params, shrinks[0], iterations,
                                            starts=starts, rotations=rotations, **args)
        if opts.rotation_search and not rotations:
            search_info["rotations"] = (f"not searched: the field of view is {across:.1f} voxels thin at the search's "
                                        "resolution, too thin to tell orientations apart")
        if partial or (starts and search_info["start"] != starts[0][0]):
            # resample the moving image through the start found: a partial field of view where it lies, on a
            # working grid cut to it; another start than the prepared one as if it had been prepared (each
            # interpolation of the pre-resampled image pulls the result towards its own grid, 0.07 -> 0.18 mm)
            registered = geometry.voxel_matrix_to_physical(
                linear.compose(base, params.matrix())[0].double().cpu().numpy(), prepared.grid)
            prepared = focused(prepared, registered, crop=partial)
            f_t, m_t, masks = _normalised(prepared, device)
            shape = tuple(f_t.shape[2:])
            control = tuple(max(4, round(s / opts.levels[0][1])) for s in shape)
            velocity = torch.zeros(1, 3, *control, device=device)
            pyramid, weight, auto_mask = _pyramid(name, prepared, f_t, m_t, masks, device, finer)
            params = _parameters(weight)
        if partial:  # on the cut grid, at resolutions that keep the field of view
            shrinks = partial_shrinks(prepared)
            if opts.mode == "deformable":  # the field absorbs what a full-resolution affine level would add
                shrinks = shrinks[:1]
    if not swapped:  # a swapped registration's linear result is final: refined here, it drifts 0.2 mm from it
        params = linear.refine(pyramid, linear_sim, base, params, opts.mode, shrinks, iterations,
                               lambda stage, x: report(stage, 0.05 + span * x), searched=search_info is not None and
                               not partial, **args)
    grid, init = prepared.grid, prepared.init
    matrix = linear.compose(base, params.matrix())
    timing["linear"] = time.perf_counter() - mark
    mark = time.perf_counter()

    # 4. the deformable stage
    job = None  # the velocity field's optimisation
    if opts.mode == "deformable":
        job = deformable.Job(pyramid, sim, spatial.to_normalised(matrix, shape), velocity,
                             partial_levels(prepared, opts.levels) if prepared.partial else opts.levels,
                             opts.iterations, opts.deform_lr, opts.smooth_weight * sim.smooth_scale, opts.tolerance,
                             opts.patience, lambda x: report("deformable", 0.05 + span + deformable_share * x))
    optimised = yield job  # the velocity field, optimised alone or in a batch
    # the time a batch spent on the other pairs' stages is not this pair's; its own is the batch's
    start += time.perf_counter() - mark - (0.0 if job is None else job.seconds)
    timing["deformable"] = 0.0 if job is None else job.seconds
    mark = time.perf_counter()
    # 5. physical transforms
    report("transforms", 0.9)
    registered = geometry.voxel_matrix_to_physical(matrix[0].double().cpu().numpy(), grid)
    if opts.mode == "rigid":
        registered[:3, :3] = linear.orthonormalise(registered[:3, :3])
    affine_m = init @ registered
    content = fixed_content(original.fixed_on_grid, presets[0], fm_img)
    polished = None
    if opts.mode != "deformable" and opts.polish and model is None and name in polishing.SIMILARITIES:
        report("polishing on the original images", 0.91)
        index = np.argwhere(content)[::7, ::-1]  # (x, y, z)
        points = index @ geometry.index_to_physical(original.grid)[:3, :3].T + original.grid.GetOrigin()
        affine_m, polished = polishing.polish(fixed, moving, affine_m, opts.mode == "rigid", points,
                                              *prepared.masks)
        timing["polish"], mark = time.perf_counter() - mark, time.perf_counter()
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
    outlines = {k: v for k, v in (("fixed", fixed_labels), ("warped", warped_labels)) if v is not None} or None
    if on_images is not None:
        on_images(prepared.before, warped, None if field is None else jacobian, landmarks, outlines)
    full = original.grid  # the quality figures compare on the whole working grid
    domains = None
    if original.moving_domain_on_grid is not None:  # a partial field of view: each inside its own
        domains = tuple(geometry.field_of_view(moving, full, t, soft=True) for t in (None, forward))
    metrics = similarity_figures(original.fixed_on_grid, original.before_on_grid,
                                 geometry.resample(moving, full, forward), presets, name, opts.ncc_window, fm_img,
                                 domains)
    metrics["overlap"] = {"before": domain_overlap(content, moving, full, None),
                          "start": round(original.coverage, 4),
                          "after": domain_overlap(content, moving, full, forward),
                          "moving_inside": moving_inside(fixed, moving, original.moving_content, inverse)}
    metrics["similarity"]["reason"] = reason
    metrics.update(quality(grid, jacobian_w, forward, inverse, fixed_labels, moving_labels, warped_labels))
    if prepared.landmarks is not None:
        metrics["tre_before"] = target_registration_error(None, fixed_pts, moving_pts, labels)
        metrics["tre_after"] = target_registration_error(forward, fixed_pts, moving_pts, labels)
    metrics.update(mode=opts.mode, normalize={"fixed": presets[0], "moving": presets[1]},
                   start={"initial_transform": prepared.initial is not None, "centring": prepared.centring,
                          "rotation_search": search_info,
                          "moved_from_header": moved_from_header(original, affine_m, search_info, content)},
                   masks={"fixed": "given" if fm_img is not None else
                          "the fixed image's foreground (multi-modal)" if auto_mask else None,
                          "moving": "given" if prepared.moving_mask_on_grid is not None else None},
                   polish=polished, runtime_s=round(time.perf_counter() - start, 2), device=str(device),
                   timing_s={**{k: round(v, 2) for k, v in timing.items()},
                             "transforms_and_figures": round(time.perf_counter() - mark, 2)},
                   working_grid={"size": list(grid.GetSize()), "spacing_mm": grid.GetSpacing()[0]},
                   model=str(model.path) if model is not None else None)
    metrics["warnings"] = quality_warnings(metrics)
    report("done", 1.0)
    return RegistrationResult(affine, field, forward, inverse, warped, prepared.before, jacobian, warped_labels,
                              metrics, grid, landmarks, outlines)

