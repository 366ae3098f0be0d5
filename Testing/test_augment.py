import torch

from gvsl import augment
from gvsl.augment import AugmentConfig

CFG = AugmentConfig()


def batch(seed=0, shape=(3, 1, 20, 24, 32)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    return torch.nn.functional.avg_pool3d(x, 3, 1, 1, count_include_pad=False)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_appearance_is_reproducible_and_keeps_shape_and_range():
    x = batch()
    a = augment.appearance(x, gen(1), CFG)
    b = augment.appearance(x, gen(1), CFG)
    c = augment.appearance(x, gen(2), CFG)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1


def test_local_shuffle_only_moves_values_locally():
    x = batch()
    y = augment.local_pixel_shuffle(x, gen(3), rate=1.0)
    changed = x != y
    assert 0.05 < changed.float().mean() < 0.95
    assert torch.isin(y, x).all()  # values are moved, never invented
    # blocks are 2 voxels wide here: a moved value comes from at most 1 voxel away on each axis
    near = torch.zeros_like(changed)
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= y == torch.roll(x, (dz, dy, dx), dims=(2, 3, 4))
    assert near.all()
    assert torch.equal(augment.local_pixel_shuffle(x, gen(3), rate=0.0), x)


def test_nonlinear_intensity_is_monotone_per_sample():
    x = batch()
    y = augment.nonlinear_intensity(x, gen(4), rate=1.0)
    assert not torch.allclose(x, y)
    for i in range(x.shape[0]):
        order = x[i].flatten().argsort()
        assert (y[i].flatten()[order].diff() >= -1e-6).all()


def test_inpainting_changes_boxes_and_outpainting_keeps_boxes():
    x = batch()
    inp = augment.paint(x, gen(5), paint_rate=1.0, inpaint_rate=1.0)
    out = augment.paint(x, gen(5), paint_rate=1.0, inpaint_rate=0.0)
    changed_in = (inp != x).float().mean().item()
    changed_out = (out != x).float().mean().item()
    assert 0 < changed_in < 0.5 < changed_out < 1
    assert torch.equal(augment.paint(x, gen(5), paint_rate=0.0, inpaint_rate=1.0), x)


def test_spatial_views_share_one_transform():
    x = batch()
    fixed, damaged, moving = augment.pretraining_views(x, x.clone(), gen(6), CFG)
    torch.testing.assert_close(fixed, moving, atol=0, rtol=0)  # the same warp for every view
    assert fixed.shape == x.shape
    assert not torch.allclose(fixed, x)
    assert not torch.allclose(fixed, damaged)


def test_random_affine_stays_within_bounds():
    m = augment.random_affine(gen(7), 64, (32, 32, 32), CFG)
    det = torch.linalg.det(m[:, :, :3])
    assert (det > 0.75 ** 3 * 0.8).all() and (det < 1.25 ** 3 * 1.2).all()
    assert (m[:, :, 3].abs() <= 0.1 * 32 + 1e-5).all()
