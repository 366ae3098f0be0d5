import numpy as np
import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss

from gvsl.losses import GVSLLoss, local_ncc, smoothness


def smooth_image(shape=(1, 1, 24, 28, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    for _ in range(3):
        x = torch.nn.functional.avg_pool3d(x, 3, 1, 1, count_include_pad=False)
    return (x - x.min()) / (x.max() - x.min())


def test_ncc_is_zero_for_identical_images_and_rises_with_misalignment():
    img = smooth_image()
    assert local_ncc(img, img).item() < 1e-3
    values = [local_ncc(img, torch.roll(img, s, dims=4)).item() for s in (1, 2, 3)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 1e-3


def test_ncc_ignores_intensity_scaling():
    img = smooth_image()
    assert local_ncc(img, 3 * img).item() < 1e-3  # (an offset is not ignored: zero padding at the border)


def test_ncc_agrees_with_monai():
    a, b = smooth_image(seed=1), smooth_image(seed=2)
    monai = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9, kernel_type="rectangular")
    assert local_ncc(a, b).item() == pytest.approx(1 + monai(a, b).item(), abs=2e-3)


def test_smoothness_is_mean_squared_forward_difference():
    assert smoothness(torch.ones(1, 3, 5, 6, 7)).item() == 0
    f = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    n = f.numpy()
    expected = (np.mean(np.diff(n, axis=2) ** 2) + np.mean(np.diff(n, axis=3) ** 2) + np.mean(np.diff(n, axis=4) ** 2)) / 3
    assert smoothness(f).item() == pytest.approx(expected)


def test_loss_weights_apply():
    img = smooth_image()
    flow = torch.randn(1, 3, 24, 28, 32)
    t1 = GVSLLoss()(img, torch.roll(img, 2, 2), img * 0.5, flow)
    t2 = GVSLLoss(ncc_weight=2, smooth_weight=0, mse_weight=3)(img, torch.roll(img, 2, 2), img * 0.5, flow)
    assert t1["total"].item() == pytest.approx((t1["ncc"] + t1["smooth"] + t1["mse"]).item())
    assert t2["total"].item() == pytest.approx((2 * t1["ncc"] + 3 * t1["mse"]).item(), rel=1e-6)


def test_box_mean_equals_average_pooling():
    from gvsl.losses import box_mean
    x = torch.rand(2, 3, 11, 14, 9, dtype=torch.float64)
    for window in (3, 5, 9):
        expected = torch.nn.functional.avg_pool3d(x, window, 1, window // 2, count_include_pad=True)
        torch.testing.assert_close(box_mean(x, window), expected)


def test_box_mean_gradient_is_the_box_mean_of_the_gradient():
    """The custom backward (box mean of the incoming gradient) against autograd through average pooling."""
    from gvsl.losses import box_mean
    x = torch.rand(1, 2, 9, 12, 7, dtype=torch.float64, requires_grad=True)
    for window in (3, 5):
        torch.autograd.gradcheck(lambda t: box_mean(t, window), (x,))
        up = torch.rand(1, 2, 9, 12, 7, dtype=torch.float64)
        (mine,) = torch.autograd.grad((box_mean(x, window) * up).sum(), x)
        pooled = torch.nn.functional.avg_pool3d(x, window, 1, window // 2, count_include_pad=True)
        (expected,) = torch.autograd.grad((pooled * up).sum(), x)
        torch.testing.assert_close(mine, expected)


def test_box_mean_by_running_sums_equals_the_banded_products():
    """The two implementations (running sums off the CPU, banded matrix products on it) agree."""
    from gvsl.losses import _box_mean, _box_mean_banded
    x = torch.rand(2, 3, 1, 14, 23, dtype=torch.float64)
    for window in (3, 7, 31):  # 31: wider than every axis
        torch.testing.assert_close(_box_mean(x.clone(), window), _box_mean_banded(x, window))


def test_ncc_with_known_fixed_moments_equals_the_plain_ncc_and_its_gradient():
    from gvsl.losses import local_moments
    fixed, moving = smooth_image(seed=1), smooth_image(seed=2).requires_grad_(True)
    plain = local_ncc(moving, fixed, 7)
    (g_plain,) = torch.autograd.grad(plain, moving)
    known = local_ncc(moving, fixed, 7, b_moments=local_moments(fixed, 7))
    (g_known,) = torch.autograd.grad(known, moving)
    torch.testing.assert_close(known, plain)
    torch.testing.assert_close(g_known, g_plain)
