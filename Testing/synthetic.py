"""Known deformations of real anatomy, made with SimpleITK only (independent of gvsl's own code)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from gvsl.demo import package_file


def mni(name: str) -> sitk.Image:
    path = package_file("nilearn", f"datasets/data/mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


def mni_at(spacing: float, name: str = "t1") -> sitk.Image:
    """The MNI template ``name`` on an isotropic grid of ``spacing`` mm from its first voxel."""
    image = mni(name)
    return sitk.Resample(image, [int(round(n / spacing)) for n in image.GetSize()], sitk.Transform(), sitk.sitkLinear,
                         image.GetOrigin(), [spacing] * 3, image.GetDirection(), 0.0)


def tissue_labels() -> sitk.Image:
    """1 = grey matter, 2 = white matter, from the MNI probability maps."""
    gm, wm = mni("gm"), mni("wm")
    return sitk.Cast(sitk.Mask(gm > 0.5, wm <= 0.5) + 2 * (wm > 0.5), sitk.sitkUInt8)


def oblique_grid(centre, size=(64, 76, 50), spacing=(2.6, 2.4, 3.2), versor=((0.2, 1.0, 0.3), 0.3)) -> sitk.Image:
    """An oblique, anisotropic, non-cubic grid centred on ``centre``."""
    grid = sitk.Image(list(size), sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    rot = np.array(sitk.VersorTransform(*versor).GetMatrix()).reshape(3, 3)
    grid.SetDirection(rot.flatten().tolist())
    half = (np.array(size) - 1) * np.array(spacing) / 2
    grid.SetOrigin((np.array(centre) - rot @ half).tolist())
    return grid


def known_transform(reference: sitk.Image, seed: int = 0, max_field_mm: float = 8.0) -> sitk.CompositeTransform:
    """fixed -> moving: a random affine within the network head's bounds after a smooth displacement field."""
    rng = np.random.default_rng(seed)
    rot = rng.uniform(-1, 1, 3) * np.radians(15)
    scale = rng.uniform(0.88, 1.12, 3)
    shear = np.eye(3) + np.triu(rng.uniform(-1, 1, (3, 3)) * np.tan(np.radians(5)), 1)
    linear = np.array(sitk.Euler3DTransform((0, 0, 0), *rot).GetMatrix()).reshape(3, 3) @ shear @ np.diag(scale)
    affine = sitk.AffineTransform(linear.flatten().tolist(), rng.uniform(-6, 6, 3).tolist(),
                                  reference.TransformContinuousIndexToPhysicalPoint(
                                      ((np.array(reference.GetSize()) - 1) / 2).tolist()))
    coarse = sitk.Image([16, 16, 16], sitk.sitkVectorFloat64, 3)
    extent = np.array(reference.GetSize()) * np.array(reference.GetSpacing())
    coarse.SetSpacing((extent / 15).tolist())
    coarse.SetDirection(reference.GetDirection())
    coarse.SetOrigin(reference.GetOrigin())
    noise = sitk.GetImageFromArray(rng.standard_normal((16, 16, 16, 3)), isVector=True)
    noise.CopyInformation(coarse)
    smooth = sitk.SmoothingRecursiveGaussian(noise, float(extent.max() / 15 * 1.5))
    arr = sitk.GetArrayFromImage(smooth)
    arr *= max_field_mm / np.abs(arr).max()
    field = sitk.GetImageFromArray(arr, isVector=True)
    field.CopyInformation(coarse)
    # a dense field on the reference grid (ITK's B-spline-free way to make it smooth everywhere)
    dense = sitk.Resample(field, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(dense)])


def transform_field(transform: sitk.Transform, grid: sitk.Image) -> np.ndarray:
    """(D, H, W, 3) displacement of ``transform`` at every voxel of ``grid``, LPS mm."""
    return sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, grid.GetSize(), grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection()))


def synthetic_pair(seed: int = 0, moving_spacing: float = 1.5):
    """(fixed, moving, fixed_labels, moving_labels, truth): fixed(x) = moving(truth(x))."""
    t1, labels = mni("t1"), tissue_labels()
    moving = sitk.Resample(t1, [int(round(s / moving_spacing)) for s in np.array(t1.GetSize())],
                           sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(), [moving_spacing] * 3,
                           t1.GetDirection(), 0.0)
    centre = t1.TransformContinuousIndexToPhysicalPoint(((np.array(t1.GetSize()) - 1) / 2).tolist())
    grid = oblique_grid(centre)
    truth = known_transform(grid, seed)
    fixed = sitk.Resample(t1, grid, truth, sitk.sitkLinear, 0.0)
    fixed_labels = sitk.Resample(labels, grid, truth, sitk.sitkNearestNeighbor, 0)
    return fixed, moving, fixed_labels, labels, truth


def inside(image: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """Voxels of ``image``'s grid whose transformed point falls inside ``image`` (SimpleITK's own rule)."""
    return sitk.GetArrayFromImage(sitk.Resample(_ones(image), image, transform, sitk.sitkNearestNeighbor, 0)) > 0


def pseudo_ct(seed: int = 0) -> sitk.Image:
    """A CT-like head in Hounsfield units from the MNI template and its tissue maps, on the template's grid.

    Inside the brain: grey matter 40 HU above white matter 25 (about 15 HU apart, as in real CT),
    cerebrospinal fluid 8. The template is skull-stripped, so a head is grown around it by distance
    from the brain: 2 mm of fluid, then a 6 mm skull of bone (700-1100 HU), then air (-1000). Noise on
    top. CT's contrast relations, which a T1 does not share (its fluid is dark, not between grey and
    white matter; it shows no skull here).
    """
    t1 = mni("t1")
    g, w = (sitk.GetArrayFromImage(mni(n)) / 255.0 for n in ("gm", "wm"))
    brain = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(t1 > 0.1 * float(sitk.GetArrayViewFromImage(t1).max()),
                                                                [3] * 3))
    outside = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(brain, insideIsPositive=False, squaredDistance=False,
                                                                  useImageSpacing=True))
    in_brain = sitk.GetArrayFromImage(brain) > 0
    rng = np.random.default_rng(seed)
    hu = np.full(g.shape, -1000.0, np.float32)
    bone = (outside > 2) & (outside <= 8)
    hu[bone] = 700 + 400 * rng.random(int(bone.sum()))
    hu[(outside > 0) & (outside <= 2)] = 8.0
    csf = np.clip(1 - g - w, 0, 1)
    hu[in_brain] = (40 * g + 25 * w + 8 * csf)[in_brain]
    hu += rng.normal(0, 4, hu.shape)
    out = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(hu.astype(np.float32)), 0.7)
    out.CopyInformation(t1)
    return out


def multimodal_pair(seed: int = 0, moving_spacing: float = 1.5):
    """(fixed T1, moving pseudo-CT, fixed_labels, moving_labels, truth), the same anatomy and warp as
    ``synthetic_pair``: fixed(x) shows the anatomy that the CT shows at truth(x)."""
    fixed, _, fixed_labels, labels, truth = synthetic_pair(seed, moving_spacing)
    ct = pseudo_ct(seed)
    moving = sitk.Resample(ct, [int(round(s / moving_spacing)) for s in np.array(ct.GetSize())],
                           sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), [moving_spacing] * 3,
                           ct.GetDirection(), -1000.0)
    return fixed, moving, fixed_labels, labels, truth


def rigid_case(seed: int = 0):
    """A known rigid motion of real anatomy onto an oblique, non-cubic 2 mm grid, and landmarks."""
    t1 = mni("t1")
    centre = np.array(t1.TransformContinuousIndexToPhysicalPoint(((np.array(t1.GetSize()) - 1) / 2).tolist()))
    grid = oblique_grid(centre, size=(80, 96, 70), spacing=(2.0, 2.0, 2.0))
    rng = np.random.default_rng(seed)
    truth = sitk.Euler3DTransform(centre.tolist(), *np.radians(rng.uniform(-12, 12, 3)), rng.uniform(-8, 8, 3).tolist())
    fixed = sitk.Resample(t1, grid, truth, sitk.sitkLinear, 0.0)
    points = centre + rng.uniform(-40, 40, (6, 3))
    return fixed, t1, truth, points, np.array([truth.TransformPoint(p.tolist()) for p in points])


def moved_in_space(image, transform: sitk.Euler3DTransform) -> sitk.Image:
    """``image`` placed so that its content sits at transform^-1 of where it was (the header changes, no
    resampling): then image(transform(p)) is the moved image at p."""
    rt = np.array(transform.GetMatrix()).reshape(3, 3).T
    c, t = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    moved = sitk.Image(image)
    moved.SetOrigin((rt @ (np.array(image.GetOrigin()) - c - t) + c).tolist())
    moved.SetDirection((rt @ np.array(image.GetDirection()).reshape(3, 3)).flatten().tolist())
    return moved


def affine_case(seed: int = 0):
    """(fixed, moving, fixed_labels, moving_labels, truth): a known affine motion (rotations up to 12
    degrees, scales of +-10 %, shears up to 5 degrees, shifts up to 8 mm) onto the oblique 2 mm grid."""
    fixed, t1, rigid, _, _ = rigid_case(seed)
    rng = np.random.default_rng(seed + 100)
    shear = np.eye(3) + np.triu(rng.uniform(-1, 1, (3, 3)) * np.tan(np.radians(5)), 1)
    linear = np.array(rigid.GetMatrix()).reshape(3, 3) @ shear @ np.diag(rng.uniform(0.9, 1.1, 3))
    truth = sitk.AffineTransform(linear.flatten().tolist(), rigid.GetTranslation(), rigid.GetCenter())
    labels = tissue_labels()
    return (sitk.Resample(t1, fixed, truth, sitk.sitkLinear, 0.0), t1,
            sitk.Resample(labels, fixed, truth, sitk.sitkNearestNeighbor, 0), labels, truth)


def labelled_cases(folder, image: sitk.Image, labels: sitk.Image, names: dict, n_cases: int, size, spacing: float,
                   angle_step: float, angle_period: int, seed: int, max_field_mm: float, intensity_scale: float,
                   noise_max: float) -> list[dict]:
    """An MSD-style task in ``folder`` (images/, labels/, dataset.json with ``names``: {value: name}):
    ``image`` and ``labels`` under a different oblique grid about the label map's centre, smooth
    deformation (``known_transform``, seed ``seed + i``), gamma curve and noise per case. Returns the
    dataset's training entries."""
    import json
    from pathlib import Path

    folder = Path(folder)
    centre = labels.TransformContinuousIndexToPhysicalPoint(((np.array(labels.GetSize()) - 1) / 2).tolist())
    entries = []
    for i in range(n_cases):
        grid = oblique_grid(centre, size=tuple(size), spacing=(spacing,) * 3,
                            versor=((0.2, 1.0, 0.3), angle_step * (i % angle_period)))
        truth = known_transform(grid, seed=seed + i, max_field_mm=max_field_mm)
        case = sitk.Resample(image, grid, truth, sitk.sitkLinear, 0.0)
        rng = np.random.default_rng(i)
        case = sitk.Pow(case / intensity_scale + 1e-3, float(rng.uniform(0.7, 1.4))) * float(rng.uniform(80, 120))
        case = sitk.AdditiveGaussianNoise(case, float(rng.uniform(1, noise_max)), 0.0, i)
        lab = sitk.Resample(labels, grid, truth, sitk.sitkNearestNeighbor, 0)
        ip, lp = folder / f"images/case{i:02d}.nii.gz", folder / f"labels/case{i:02d}.nii.gz"
        ip.parent.mkdir(parents=True, exist_ok=True)
        lp.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.Cast(case, sitk.sitkFloat32), str(ip))
        sitk.WriteImage(lab, str(lp))
        entries.append({"image": str(ip), "label": str(lp)})
    spec = {"labels": {"0": "background", **{str(v): n for v, n in names.items()}}, "training": entries}
    (folder / "dataset.json").write_text(json.dumps(spec, indent=1))
    return entries


def slab_case(thickness_mm: float | None = 40.0, seed: int | None = None, centre_offset_mm: float = 10.0,
              moving_image: sitk.Image | None = None):
    """(fixed, moving, truth): a slab of a head onto the whole head, as a partial field of view.

    The fixed image is the whole MNI T1 head at 2 mm. The moving image is ``moving_image`` (default the
    same T1) cropped to an axial slab ``thickness_mm`` thick (None: the upper half of the head) whose
    centre lies ``centre_offset_mm`` above the head's centre, on its own 1 x 1 x 2 mm grid. Without a
    seed the slab sits where its header puts it (truth: the identity); with one, it is moved by a known
    rigid transform (rotations up to 10 degrees, shifts up to 10 mm), its header changed, no resampling
    of the anatomy. fixed(x) shows what moving shows at truth(x)."""
    t1 = mni("t1")
    source = t1 if moving_image is None else moving_image
    fixed = mni_at(2.0)
    size = np.array(source.GetSize())
    centre = np.array(source.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    z_centre = centre[2] + centre_offset_mm
    if thickness_mm is None:  # the upper half
        bottom, top = centre[2], centre[2] + size[2] * source.GetSpacing()[2] / 2
    else:
        bottom, top = z_centre - thickness_mm / 2, z_centre + thickness_mm / 2
    spacing = np.array([1.0, 1.0, 2.0])
    extent_xy = (size[:2] - 1) * np.array(source.GetSpacing()[:2])
    n_z = max(2, int(round((top - bottom) / spacing[2])))
    grid = sitk.Image([int(extent_xy[0] // spacing[0]) + 1, int(extent_xy[1] // spacing[1]) + 1, n_z], sitk.sitkFloat32)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(source.GetDirection())
    corner = np.array(source.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, 0.0]))
    direction = np.array(source.GetDirection()).reshape(3, 3)
    # the slab's first slice at height ``bottom`` (physical z; the template's z axis is physical z)
    origin = corner.copy()
    origin[2] = bottom + spacing[2] / 2
    grid.SetOrigin(origin.tolist())
    moving = sitk.Resample(source, grid, sitk.Transform(), sitk.sitkLinear, float(np.min(sitk.GetArrayViewFromImage(source))))
    assert np.allclose(np.abs(direction), np.eye(3))
    if seed is None:
        return fixed, moving, sitk.Euler3DTransform()
    rng = np.random.default_rng(seed)
    slab_centre = np.array(moving.TransformContinuousIndexToPhysicalPoint(((np.array(moving.GetSize()) - 1) / 2).tolist()))
    motion = sitk.Euler3DTransform(slab_centre.tolist(), *np.radians(rng.uniform(-10, 10, 3)),
                                   rng.uniform(-10, 10, 3).tolist())
    moved = moved_in_space(moving, motion)  # moved(x) = moving(motion(x)): fixed(y) = moved(motion^-1(y))
    return fixed, moved, motion.GetInverse()


def slab_error(transform: sitk.Transform, truth: sitk.Transform, fixed: sitk.Image, moving: sitk.Image) -> np.ndarray:
    """Distances (mm) between where ``transform`` and ``truth`` send the fixed grid's head voxels that
    the truth maps into the moving image's field of view: the error inside the slab."""
    inside_moving = sitk.Resample(_ones(moving), fixed, truth, sitk.sitkNearestNeighbor, 0)
    arr = sitk.GetArrayViewFromImage(fixed)
    region = (sitk.GetArrayViewFromImage(inside_moving) > 0) & (arr > 0.15 * arr.max())
    est, ref = transform_field(transform, fixed), transform_field(truth, fixed)
    return np.linalg.norm(est - ref, axis=-1)[region]


def _ones(image: sitk.Image) -> sitk.Image:
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return ones
