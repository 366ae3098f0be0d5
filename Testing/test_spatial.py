"""The grid conventions, checked against SimpleITK resampling on non-cubic volumes."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from gvsl import spatial

import synthetic

SHAPE = (20, 28, 36)  # D, H, W: deliberately non-cubic


def smooth_volume(shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(rng.random(shape).astype(np.float32))
    return sitk.SmoothingRecursiveGaussian(img, 2.0)


def interior(shape, margin):
    d, h, w = shape
    return (slice(margin, d - margin), slice(margin, h - margin), slice(margin, w - margin))


def params(seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda k, b: (2 * torch.rand(1, k, generator=g) - 1) * b
    return dict(rotation=r(3, spatial.MAX_ROTATION), scale=1 + r(3, 0.25), translation=r(3, 2.0),
                shear=r(6, spatial.MAX_SHEAR))


def test_matrix_equals_independent_composition():
    p = params()
    m = spatial.affine_from_parameters(**{k: v.double() for k, v in p.items()})[0].numpy()
    rot = Rotation.from_euler("xyz", p["rotation"][0].double().numpy()).as_matrix()  # extrinsic: Rz Ry Rx
    t = np.tan(p["shear"][0].double().numpy())
    shear = np.array([[1, t[0], t[1]], [t[2], 1, t[3]], [t[4], t[5], 1]])
    expected = shear @ np.diag(p["scale"][0].double().numpy()) @ rot
    np.testing.assert_allclose(m[:, :3], expected, atol=1e-12)
    np.testing.assert_allclose(m[:, 3], p["translation"][0].double().numpy(), atol=1e-12)


def test_matrix_is_differentiable_in_every_parameter():
    p = {k: v.clone().requires_grad_() for k, v in params().items()}
    spatial.affine_from_parameters(**p).sum().backward()
    for name, v in p.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, name


def test_affine_warp_matches_simpleitk_on_non_cubic_volume():
    img = smooth_volume()
    p = params(3)
    m = spatial.affine_from_parameters(**{k: v.double() for k, v in p.items()})
    vol = torch.from_numpy(sitk.GetArrayFromImage(img)).double()[None, None]
    ours = spatial.warp(vol, m, padding_mode="border")[0, 0].numpy()  # ITK clamps within half a voxel

    # index space == physical space here (spacing 1, origin 0, identity direction)
    centre = [(s - 1) / 2 for s in SHAPE[::-1]]
    tfm = sitk.AffineTransform(m[0, :, :3].flatten().tolist(), m[0, :, 3].tolist(), centre)
    ref = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(img, sitk.sitkFloat64), img, tfm, sitk.sitkLinear, 0.0))
    # compare where SimpleITK's sample point lies inside the image (its border rule differs)
    inside = synthetic.inside(img, tfm)
    assert inside.mean() > 0.4
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-6)


def test_displacement_then_affine_matches_simpleitk_composite():
    img = smooth_volume(seed=4)
    rng = np.random.default_rng(5)
    field_xyz = sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray((rng.standard_normal((*SHAPE, 3)) * 40).astype(np.float64), isVector=True), 3.0)
    disp_xyz = sitk.GetArrayFromImage(field_xyz)  # (D, H, W, 3) in (x, y, z)
    assert np.abs(disp_xyz).max() > 1.0
    m = spatial.affine_from_parameters(**{k: v.double() for k, v in params(6).items()})

    vol = torch.from_numpy(sitk.GetArrayFromImage(img)).double()[None, None]
    flow = torch.from_numpy(disp_xyz[..., ::-1].copy()).permute(3, 0, 1, 2)[None]  # channels (z, y, x)
    ours = spatial.warp(vol, m, flow, padding_mode="border")[0, 0].numpy()

    centre = [(s - 1) / 2 for s in SHAPE[::-1]]
    aff = sitk.AffineTransform(m[0, :, :3].flatten().tolist(), m[0, :, 3].tolist(), centre)
    dft = sitk.DisplacementFieldTransform(sitk.Cast(field_xyz, sitk.sitkVectorFloat64))
    composite = sitk.CompositeTransform([aff, dft])  # the last one is applied first
    ref = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(img, sitk.sitkFloat64), img, composite, sitk.sitkLinear, 0))
    inside = synthetic.inside(img, composite)
    assert inside.mean() > 0.4
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-6)


def test_translation_moves_content_by_whole_voxels_along_each_axis():
    vol = torch.zeros(1, 1, *SHAPE, dtype=torch.float64)
    vol[0, 0, 10, 14, 18] = 1.0
    m = spatial.identity_matrix(1, dtype=torch.float64)
    m[0, :, 3] = torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64)  # x, y, z voxels
    out = spatial.warp(vol, m)[0, 0]
    # output p samples input at p + t, so the bright voxel appears at input - t
    assert tuple(torch.nonzero(out > 0.5)[0].tolist()) == (10 - 1, 14 + 2, 18 - 3)


@pytest.mark.parametrize("shape", [(16, 16, 16), (9, 17, 30)])
def test_identity_warp_is_exact(shape):
    vol = torch.rand(2, 3, *shape, dtype=torch.float64)
    out = spatial.warp(vol, spatial.identity_matrix(2, dtype=torch.float64), torch.zeros(2, 3, *shape).double())
    torch.testing.assert_close(out, vol)


def test_normalised_grid_is_theta_of_the_displaced_identity():
    """theta(u + field(u)) written out point by point against the grid built on the coarse field."""
    from gvsl.spatial import identity_grid, normalised_grid, resize
    g = torch.Generator().manual_seed(3)
    theta = torch.eye(3, 4)[None] + 0.1 * torch.randn(1, 3, 4, generator=g)
    field = 0.05 * torch.randn(1, 3, 4, 5, 6, generator=g)
    shape = (9, 11, 13)
    u = identity_grid(shape) + resize(field, shape).movedim(1, -1)
    expected = u @ theta[0, :, :3].T + theta[0, :, 3]
    torch.testing.assert_close(normalised_grid(shape, theta, field), expected)
    torch.testing.assert_close(normalised_grid(shape, None, resize(field, shape)), u)
    torch.testing.assert_close(normalised_grid(shape, theta), identity_grid(shape) @ theta[0, :, :3].T + theta[0, :, 3])


@pytest.mark.parametrize("shapes", [((4, 5, 6), (9, 11, 13)), ((31, 8, 1), (16, 17, 3)), ((7, 1, 9), (7, 1, 9))])
def test_resize_is_trilinear_interpolation_values_and_gradient(shapes):
    """The separable resize against F.interpolate (trilinear, corners kept): up, down, a single slice."""
    source, target = shapes
    x = torch.randn(2, 3, *source, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 3, *target, dtype=torch.float64)
    mine = spatial.resize(x, target)
    expected = F.interpolate(x, size=target, mode="trilinear", align_corners=True)
    torch.testing.assert_close(mine, expected)
    torch.testing.assert_close(*(torch.autograd.grad((y * up).sum(), x)[0] for y in (mine, expected)))


@pytest.mark.parametrize("grid_shape", [(17, 16, 16), (5000, 1, 1)])
def test_sample_split_across_threads_equals_one_grid_sample(grid_shape):
    """The CPU split into slabs (an odd depth, so the last slab is padded) gives grid_sample's values
    and gradients, for the image and the grid alike."""
    torch.manual_seed(0)
    image = torch.randn(1, 3, 11, 12, 10, requires_grad=True)
    grid = (torch.rand(1, *grid_shape, 3) * 2.4 - 1.2).requires_grad_(True)
    weight = torch.randn(1, 3, *grid_shape)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out = spatial.sample(image, grid, padding_mode="border")
            (out * weight).sum().backward()
            results.append((out.detach(), image.grad.clone(), grid.grad.clone()))
            image.grad = grid.grad = None
    finally:
        torch.set_num_threads(threads)
    reference = F.grid_sample(image.detach(), grid.detach(), padding_mode="border", align_corners=True)
    torch.testing.assert_close(results[0][0], reference, rtol=0, atol=0)
    for one, split in zip(*results):
        torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-5)


def test_points_grid_is_the_normalised_grid_at_those_voxels():
    """A sampling metric's grid: the same coordinates as the full grid's rows, field resized or not."""
    torch.manual_seed(0)
    shape = (9, 11, 13)
    theta = torch.eye(3, 4)[None] + 0.05 * torch.randn(1, 3, 4)
    rows = torch.randperm(9 * 11 * 13)[:200]
    coordinates = spatial.identity_grid(shape).reshape(-1, 3)[rows]
    for field_shape in ((4, 5, 6), shape):
        field = 0.1 * torch.randn(1, 3, *field_shape)
        full = spatial.normalised_grid(shape, theta, field).reshape(1, -1, 3)[:, rows]
        torch.testing.assert_close(spatial.points_grid(coordinates, theta, field).reshape(1, -1, 3), full,
                                   rtol=0, atol=1e-6)
    base = spatial.points_grid(coordinates, theta)
    torch.testing.assert_close(base.reshape(1, -1, 3), spatial.normalised_grid(shape, theta).reshape(1, -1, 3)[:, rows])
    torch.testing.assert_close(spatial.points_grid(coordinates, theta, field, base=base),
                               spatial.points_grid(coordinates, theta, field))
