"""Everything a registration does before torch: inputs checked, a start chosen, the working grid.

Nothing here imports torch, so a command line can prepare the pair on one core while torch loads on
the other (about 2 s of a 5 s command on two CPU cores): the initial alignment (a given initial
transform, centres of intensity mass or of geometry), both images and masks on one isotropic working
grid over the fixed image, and the images the quality figures compare before registration.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .. import geometry
from ..volumes import MIN_SIZE, auto_preset, normalise
from .kept import kept
from .landmarks import Landmarks, pair
from .options import DEFAULT_SPACING, INITIALISATIONS, RegistrationError, RegistrationOptions


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
    if mode not in INITIALISATIONS or mode == "auto":
        raise RegistrationError(f"initialisation must be one of {', '.join(INITIALISATIONS)}, got {mode!r}")
    start = np.eye(4) if initial is None else initial
    if mode == "none":
        return start
    c_fixed, c_moving = centres(fixed, moving, mode)
    shift = np.eye(4)
    shift[:3, 3] = (np.linalg.inv(start) @ np.append(c_moving, 1))[:3] - c_fixed
    return start @ shift


HEADER_OVERLAP = 0.5  # auto: the headers' placement is the start when this share of the smaller image overlaps
PARTIAL_COVERAGE = 0.98  # below this share of the fixed image's content inside the moving image's field of
#                          view, the pair is one of partial coverage: each similarity counts only inside it
FIXED_PARTIAL = 0.7  # below this share of the moving image's content inside the fixed image's field of view, and
FIXED_THINNER = 0.9  # with the fixed field of view thinner than this share of the moving content's thinnest width,
#                      the fixed image is the partial one (an intra-operative slab as the reference for a whole head),
#                      not merely a whole image far from the moving one (a head turned by 70 degrees sticks out of it)


def moving_content(moving: sitk.Image, preset: str) -> tuple[np.ndarray, sitk.Image]:
    """(where the moving image shows something, the coarse grid over it that this is on)."""
    coarse = geometry.working_grid(moving, 4.0, max_size=48)
    return normalise(sitk.GetArrayFromImage(geometry.resample(moving, coarse)), preset) > 0.05, coarse


def thinnest_width(content: tuple[np.ndarray, sitk.Image]) -> float:
    """The width (mm, 1st to 99th percentile) of ``moving_content`` along its thinnest principal axis:
    how thin a field of view can be and still hold all of it, whatever the alignment."""
    mask, grid = content
    if mask.sum() < 4:
        return 0.0
    points = np.argwhere(mask)[:, ::-1] @ geometry.index_to_physical(grid)[:3, :3].T
    points -= points.mean(axis=0)
    along = points @ np.linalg.eigh(np.cov(points.T))[1][:, 0]
    return float(np.percentile(along, 99) - np.percentile(along, 1))


def moving_inside(fixed: sitk.Image, moving: sitk.Image, content: tuple[np.ndarray, sitk.Image],
                  inverse: sitk.Transform) -> float:
    """The share of the moving image's content (``moving_content``) that lands inside the fixed image's
    field of view through ``inverse`` (moving -> fixed)."""
    inside = sitk.GetArrayFromImage(geometry.field_of_view(fixed, content[1], inverse)) > 0
    return round(float(inside[content[0]].mean()), 4) if content[0].any() else 1.0


def header_overlap(fixed: sitk.Image, moving: sitk.Image) -> float:
    """The share of the smaller image's field of view that lies inside the other's where the headers
    place them (on a coarse grid over the smaller one)."""
    small, large = (fixed, moving) if _volume_mm3(fixed) <= _volume_mm3(moving) else (moving, fixed)
    grid = geometry.working_grid(small, 1.0, max_size=32)
    inside = sitk.GetArrayFromImage(geometry.field_of_view(large, grid))
    return float(inside.mean())


def starts(fixed: sitk.Image, moving: sitk.Image, centring: str, initial: np.ndarray | None,
           partial: Callable[[np.ndarray], bool]) -> tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]:
    """(how the start was chosen, the start, the other starts the search compares with it).

    ``auto``: for a partial field of view (``partial(start)``) that the headers place well inside the
    other image, where the headers place it (a slab's centre of mass is not that of the anatomy it
    shows); otherwise the centres of intensity mass superimposed (they start whole images closest:
    0.055-0.067 mm against 0.074-0.093 mm from the headers on the rigid benchmark). The other start is
    compared by the search. A named centring is taken as it is."""
    if centring != "auto":
        return centring, initial_alignment(fixed, moving, centring, initial), []
    header, moments = initial_alignment(fixed, moving, "none", initial), initial_alignment(fixed, moving, "moments", initial)
    if header_overlap(fixed, moving) >= HEADER_OVERLAP and partial(header):
        return "none", header, [("moments", moments)]
    return "moments", moments, [("none", header)]


def linear_matrix(transform: sitk.Transform, what: str = "the initial transform") -> np.ndarray:
    """A linear (rigid, similarity, affine, or a composite of those) 3D ITK transform as a 4x4 matrix."""
    if transform.GetDimension() != 3:
        raise RegistrationError(f"{what} is {transform.GetDimension()}D; a 3D transform is needed")
    nonlinear = [p.GetName() for p in geometry.transform_parts(transform)
                 if isinstance(p, (sitk.DisplacementFieldTransform, sitk.BSplineTransform))]
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
    determinant = np.linalg.det(m[:3, :3])
    if abs(determinant) < 1e-6:
        raise RegistrationError(f"{what} is singular (it collapses space onto a plane)")
    if determinant < 0:  # no rotation, scaling or shear undoes a mirror image: the result would be nonsense
        raise RegistrationError(f"{what} reflects space (a mirror image: its determinant is {determinant:.3g}); a "
                                "registration cannot start from it. Flip the moving image instead (e.g. in its header), "
                                "or give a transform without the reflection")
    return m


def _rounded(values) -> tuple:
    return tuple(round(float(v), 3) for v in values)


def _volume_mm3(image: sitk.Image) -> float:
    return float(np.prod(np.array(image.GetSize()) * np.array(image.GetSpacing())))


def _presets(normalize, fixed: sitk.Image, moving: sitk.Image) -> tuple[str, str]:
    pair_ = (normalize, normalize) if isinstance(normalize, str) else tuple(normalize)
    fixed_preset = kept("fixed preset", (id(fixed),), lambda: auto_preset(fixed), (fixed,)) if pair_[0] == "auto" \
        else pair_[0]
    return fixed_preset, auto_preset(moving) if pair_[1] == "auto" else pair_[1]


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


def _landmark_pairs(fixed_landmarks, moving_landmarks):
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise RegistrationError("landmarks need both a fixed and a moving set")
    if fixed_landmarks is None:
        return None
    wrap = [lm if isinstance(lm, Landmarks) else Landmarks(np.asarray(lm, dtype=np.float64).reshape(-1, 3),
                                                            [str(i + 1) for i in range(len(lm))], role)
            for lm, role in ((fixed_landmarks, "the fixed landmarks"), (moving_landmarks, "the moving landmarks"))]
    return pair(*wrap)


@dataclass
class Prepared:
    """The pair as the optimisation starts from it (``prepare``)."""
    options: RegistrationOptions
    fixed: sitk.Image
    moving: sitk.Image
    presets: tuple[str, str]  # each image's intensity preset
    initial: np.ndarray | None  # the given initial transform, 4x4 fixed -> moving
    centring: str  # how the initial alignment superimposed the images (INITIALISATIONS)
    init: np.ndarray  # 4x4 fixed -> moving start: ``initial`` after the centring
    grid: sitk.Image  # the working grid over the fixed image
    fixed_on_grid: sitk.Image
    moving_on_grid: sitk.Image  # through ``init``
    fixed_mask_on_grid: sitk.Image | None  # None: no mask given
    moving_mask_on_grid: sitk.Image | None  # through ``init``
    moving_domain_on_grid: sitk.Image | None  # where the moving image has data, through ``init``, for a pair
    #                                           of partial coverage; None: it covers the fixed image
    fixed_partial: bool  # the fixed image's field of view holds only part of the moving image's content (FIXED_PARTIAL)
    moving_content: tuple  # ``moving_content(moving, its preset)``, for ``moving_inside`` before and after
    coverage: float  # the share of the fixed image's content inside the moving image's field of view at the start
    alternatives: list  # [(centring, 4x4)] other starts the search compares with ``init``
    compare_starts: bool  # whether the search compares starts (an automatic centring), shifts included
    masks: tuple  # the masks as given (fixed, moving), for ``focused``
    landmarks: tuple | None  # (fixed (n, 3), moving (n, 3), labels), LPS mm
    before: sitk.Image  # the moving image on the fixed grid as the files place it
    before_on_grid: sitk.Image  # the same on the working grid
    seconds: float

    @property
    def partial(self) -> bool:
        """Either field of view holds only part of what the other shows."""
        return self.moving_domain_on_grid is not None or self.fixed_partial


def prepare(fixed: sitk.Image, moving: sitk.Image, options: RegistrationOptions | None = None, *,
            fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None,
            initial_transform: sitk.Transform | None = None, fixed_landmarks=None, moving_landmarks=None,
            model=None) -> Prepared:
    """Check the inputs and put the pair on the working grid (see ``gvsl.registration.register``); with a
    GVSL checkpoint (``model``), on the spacing its network was trained on, unless the options set one."""
    start = time.perf_counter()
    opts = options or RegistrationOptions()
    opts.check()
    _check_image(fixed, "fixed")
    _check_image(moving, "moving")
    landmark_pairs = _landmark_pairs(fixed_landmarks, moving_landmarks)
    initial = linear_matrix(initial_transform) if initial_transform is not None else None
    presets = _presets(opts.normalize, fixed, moving)
    spacing = float(opts.spacing or (model.meta.get("spacing", [DEFAULT_SPACING])[0] if model is not None else
                                     max(DEFAULT_SPACING, float(np.median(fixed.GetSpacing())))))
    _check_size(fixed, "fixed", spacing)
    _check_size(moving, "moving", spacing)
    fixed_extent = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    if max(moving.GetSpacing()) * MIN_SIZE > fixed_extent.min():
        raise RegistrationError(f"the moving image's voxels ({_rounded(moving.GetSpacing())} mm) are too coarse: "
                                f"fewer than {MIN_SIZE} of them span the fixed image ({_rounded(fixed_extent)} mm)")
    grid, fixed_on_grid = kept("fixed on grid", (id(fixed), spacing, opts.max_size), lambda: (
        grid := geometry.working_grid(fixed, spacing, opts.max_size), geometry.resample(fixed, grid)), (fixed,))
    fm_img = None if fixed_mask is None else kept(
        "fixed mask on grid", (id(fixed_mask), id(grid)), lambda: _mask_on_grid(fixed_mask, fixed, grid, None, "fixed"),
        (fixed_mask, grid))

    def coverage_from(start: np.ndarray) -> float:
        domain = geometry.field_of_view(moving, grid, geometry.affine_transform(start), soft=True)
        return domain_coverage(domain, fixed_on_grid, presets[0], fm_img)

    content = moving_content(moving, presets[1])

    thin = min(np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())) < FIXED_THINNER * thinnest_width(content)

    def fixed_partial(start: np.ndarray) -> bool:
        return thin and moving_inside(fixed, moving, content, geometry.affine_transform(start).GetInverse()) < FIXED_PARTIAL

    centring, init, alternatives = starts(fixed, moving, opts.initialisation or (
        "none" if initial is not None else "auto"), initial,
        lambda start: coverage_from(start) < PARTIAL_COVERAGE or fixed_partial(start))
    init_tf = geometry.affine_transform(init)
    overlap = geometry.field_of_view(moving, grid, init_tf)
    overlap_mm3 = float(sitk.GetArrayViewFromImage(overlap).sum()) * grid.GetSpacing()[0] ** 3
    smaller_mm3 = min(_volume_mm3(fixed), _volume_mm3(moving))
    if overlap_mm3 < 0.01 * smaller_mm3:
        raise RegistrationError("the moving image does not overlap the fixed image after initial alignment "
                                f"({overlap_mm3 / smaller_mm3:.1%} of the smaller image; voxel sizes: fixed "
                                f"{_rounded(fixed.GetSpacing())} mm, moving {_rounded(moving.GetSpacing())} mm); "
                                "check the images' origins, directions and spacings, or use another initialisation")
    mm_img = _mask_on_grid(moving_mask, moving, grid, init_tf, "moving")
    if fm_img is not None and mm_img is not None and not (sitk.GetArrayFromImage(fm_img * mm_img) > 0.25).any():
        raise RegistrationError("the fixed and moving masks do not overlap after the initial alignment")
    domain = geometry.field_of_view(moving, grid, init_tf, soft=True)
    coverage = domain_coverage(domain, fixed_on_grid, presets[0], fm_img)
    automatic = (opts.initialisation or "auto") == "auto" and initial is None
    return Prepared(opts, fixed, moving, presets, initial, centring, init, grid, fixed_on_grid,
                    geometry.resample(moving, grid, init_tf), fm_img, mm_img,
                    domain if coverage < PARTIAL_COVERAGE else None, fixed_partial(init), content, coverage, alternatives,
                    automatic,
                    (fixed_mask, moving_mask), landmark_pairs, geometry.resample(moving, fixed),
                    geometry.resample(moving, grid), time.perf_counter() - start)


FOCUS_MARGIN_MM = 8.0  # room around a partial field of view for the refinement and the field to move in


def focused(prepared: Prepared, registered: np.ndarray, crop: bool = True) -> Prepared:
    """The pair once its start is found: the start becomes ``init @ registered``, and with ``crop`` (a
    partial field of view) the working grid shrinks to the part of the fixed one within FOCUS_MARGIN_MM
    of the moving image's field of view there. The moving image, its mask and its domain are resampled
    from the originals (one interpolation); the fixed image and its mask are cut out of their grid."""
    init = prepared.init @ registered
    tf = geometry.affine_transform(init)
    inside = sitk.GetArrayFromImage(geometry.field_of_view(prepared.moving, prepared.grid, tf, soft=True)) > 0.5
    index, size = [0, 0, 0], list(prepared.grid.GetSize())
    if crop and inside.any():
        margin = int(np.ceil(FOCUS_MARGIN_MM / prepared.grid.GetSpacing()[0]))
        index, size = [], []
        for axis in (2, 1, 0):  # ITK's x, y, z: the array's last axis first
            covered = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
            low, high = max(covered[0] - margin, 0), min(covered[-1] + margin, inside.shape[axis] - 1)
            index.append(int(low))
            size.append(int(max(high - low + 1, MIN_SIZE)))
        size = [min(s, n - i) for s, n, i in zip(size, prepared.grid.GetSize(), index)]

    def cut(image):
        return None if image is None else sitk.RegionOfInterest(image, size, index)

    grid = cut(prepared.grid)
    fixed_mask, moving_mask = prepared.masks
    moving_mask_on_grid = None
    if moving_mask is not None:
        moving_mask_on_grid = geometry.resample(sitk.Cast(moving_mask != 0, sitk.sitkFloat32), grid, tf,
                                                sitk.sitkLinear, 0.0)
    return dataclasses.replace(
        prepared, init=init, grid=grid, fixed_on_grid=cut(prepared.fixed_on_grid),
        moving_on_grid=geometry.resample(prepared.moving, grid, tf), fixed_mask_on_grid=cut(prepared.fixed_mask_on_grid),
        moving_mask_on_grid=moving_mask_on_grid,
        moving_domain_on_grid=None if prepared.moving_domain_on_grid is None else
        geometry.field_of_view(prepared.moving, grid, tf, soft=True),
        alternatives=[], compare_starts=False)


def thinnest(prepared: Prepared) -> int:
    """Working-grid voxels across the thinnest side of the part of the working grid that the moving
    image's field of view covers (a partial one: the slab, whichever image it is)."""
    if prepared.moving_domain_on_grid is None:
        return min(prepared.grid.GetSize())
    inside = sitk.GetArrayViewFromImage(prepared.moving_domain_on_grid) > 0.5
    extents = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return int(min(e[-1] - e[0] + 1 for e in extents)) if all(e.size for e in extents) else 1


def partial_shrinks(prepared: Prepared, voxels: int = 16) -> tuple:
    """The linear stage's shrink factors for a partial field of view: the coarsest keeps at least
    ``voxels`` of it across its thinnest side (a thin slab is lost at a quarter resolution), then one
    finer, down to full resolution."""
    shortest = thinnest(prepared)
    coarsest = next((s for s in (4, 2) if shortest / s >= voxels), 1)
    return tuple(s for s in (4, 2, 1) if s <= coarsest)[:2]


def partial_levels(prepared: Prepared, levels: tuple, voxels: int = 8) -> tuple:
    """The deformable levels for a partial field of view: those whose images keep at least ``voxels``
    across its thinnest side (on a coarser one a field has next to nothing to follow: a 20 mm slab
    registered by the default levels drifted by 35 mm), their iterations given to the finer ones."""
    shortest = thinnest(prepared)
    kept = [level for level in levels if shortest / level[0] >= voxels] or [levels[-1]]
    scale = sum(level[2] for level in levels) / sum(level[2] for level in kept)
    return tuple((shrink, control, share * scale) for shrink, control, share in kept)


def fixed_content(fixed_on_grid: sitk.Image, preset: str, mask: sitk.Image | None = None) -> np.ndarray:
    """Where the fixed image shows something on the working grid (its mask where there is one)."""
    if mask is not None:
        return sitk.GetArrayViewFromImage(mask) > 0.5
    return normalise(sitk.GetArrayFromImage(fixed_on_grid), preset) > 0.05


def domain_coverage(domain: sitk.Image, fixed_on_grid: sitk.Image, preset: str, mask: sitk.Image | None = None) -> float:
    """The share of the fixed image's content that ``domain`` (a moving field of view on the working grid) covers."""
    content = fixed_content(fixed_on_grid, preset, mask)
    if not content.any():
        return 1.0
    return float((sitk.GetArrayViewFromImage(domain)[content] > 0.5).mean())
