"""Similarities, their automatic choice, and the registration's own Adam."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl import similarity as S
from gvsl.registration.optim import Adam
from gvsl.volumes import normalise


@pytest.fixture(scope="module")
def head(anatomical_path):
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(anatomical_path), sitk.sitkFloat32))
    return torch.from_numpy(normalise(arr, "mr"))[None, None]


def shifted(image, voxels):
    return torch.roll(image, voxels, dims=4)


def test_mind_ignores_contrast_but_sees_structure(head):
    d = S.mind_ssc(head)
    assert d.shape == (1, 12, *head.shape[2:]) and float(d.min()) >= 0 and float(d.max()) <= 1
    # an inverted, rescaled contrast (T1 -> T2-like) has the same descriptors
    torch.testing.assert_close(S.mind_ssc(0.2 + 0.5 * (1 - head)), d, atol=1e-3, rtol=1e-3)  # float32 sums
    mind = S.MIND()
    aligned = mind.loss(S.mind_ssc(1 - head), d)
    moved = mind.loss(S.mind_ssc(shifted(1 - head, 2)), d)
    assert aligned < 1e-6 < moved


def test_mutual_information_prefers_the_aligned_pair_and_has_gradients(head):
    mi = S.MutualInformation(max_samples=10_000)
    other = (1 - head) ** 2  # a different, non-linear contrast of the same head
    assert mi.loss(other, head) < mi.loss(shifted(other, 3), head) < mi.loss(torch.rand_like(head), head)
    x = other.clone().requires_grad_(True)
    mi.loss(x, head).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def numpy_mutual_information(a: np.ndarray, b: np.ndarray, w: np.ndarray, bins: int = 32) -> float:
    """Mattes MI written out sample by sample: cubic B-spline Parzen weights of each intensity at its four
    nearest bins (clamped to the edge bins), the weighted joint histogram, then its mutual information."""
    def spline(x):
        x = abs(x)
        return (4 - 6 * x ** 2 + 3 * x ** 3) / 6 if x < 1 else (2 - x) ** 3 / 6 if x < 2 else 0.0

    joint = np.zeros((bins, bins))
    for va, vb, weight in zip(a, b, w):
        ua, ub = np.clip(va, 0, 1) * (bins - 1), np.clip(vb, 0, 1) * (bins - 1)
        for i in range(int(ua) - 1, int(ua) + 3):
            for j in range(int(ub) - 1, int(ub) + 3):
                joint[min(max(i, 0), bins - 1), min(max(j, 0), bins - 1)] += weight * spline(ua - i) * spline(ub - j)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    return float((joint * (np.log(joint + 1e-10) - np.log(pa * pb + 1e-10))).sum())


def test_mutual_information_equals_the_histogram_written_out():
    """Batched, weighted, one fixed image for the batch: each item's loss is minus the MI computed sample
    by sample (intensities beyond [0, 1] included, where the edge bins collect the weights)."""
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 4, 5, 6, generator=g) * 1.1 - 0.05
    moving = torch.stack([fixed[0] ** 2, torch.rand(1, 4, 5, 6, generator=g)])
    weight = (torch.rand(1, 1, 4, 5, 6, generator=g) > 0.3).float()
    mi = S.MutualInformation(bins=8)
    losses = mi.loss(moving, fixed, weight, per_item=True)
    for item in range(2):
        expected = numpy_mutual_information(moving[item].flatten().numpy(), fixed.flatten().numpy(),
                                            weight.flatten().numpy(), bins=8)
        assert losses[item].item() == pytest.approx(-expected, rel=1e-5, abs=1e-6)
    assert mi.loss(moving, fixed, weight).item() == pytest.approx(losses.mean().item())


def test_weights_restrict_every_similarity(head):
    half = head.shape[-1] // 2
    weight = torch.zeros_like(head)
    weight[..., : half - 4] = 1  # NCC's window and MIND's patches reach 3 voxels
    for name in ("ncc", "mind", "mi"):
        sim = S.make(name)
        clean = head if name == "ncc" else 1 - head
        spoiled = clean.clone()
        spoiled[..., half:] = torch.rand_like(spoiled[..., half:])
        f, c, b = sim.features(head), sim.features(clean), sim.features(spoiled)
        inside_clean, inside_spoiled = float(sim.loss(c, f, weight)), float(sim.loss(b, f, weight))
        assert abs(inside_spoiled - inside_clean) < 0.02 + 0.02 * abs(inside_clean), name
        assert float(sim.loss(b, f)) > float(sim.loss(c, f)) + 0.02, name


def test_equalise_is_monotonic_and_spreads_a_narrow_window():
    hu = torch.cat([torch.full((500,), -1000.0), 25 + 15 * torch.rand(1000), 700 + 400 * torch.rand(200)])
    x = torch.from_numpy(normalise(hu.numpy(), "ct"))
    y = S.equalise(x.reshape(1, 1, -1, 1, 1)).reshape(-1)
    order = torch.argsort(x)
    assert bool((torch.diff(y[order]) >= -1e-6).all())
    brain = y[500:1500]
    assert float(brain.max() - brain.min()) > 0.5 > float(x[500:1500].max() - x[500:1500].min()) * 20


def test_choose_names_its_reason():
    rng = np.random.default_rng(0)
    a = rng.random((20, 20, 20)).astype(np.float32)
    name, reason = S.choose(("mr", "ct"), a, a)
    assert name == "mind" and "Hounsfield" in reason
    assert S.choose(("mr", "mr"), a, a)[0] == "ncc"
    with pytest.raises(ValueError, match="similarity must be one of"):
        S.make("cosine")


def test_background_noise_and_a_smaller_field_of_view_are_not_a_different_contrast():
    """A noisy T1 on a smaller oblique grid against the clean template: the same modality. With a
    fixed foreground level its background noise made the histograms differ by 0.18-0.26, MIND was
    chosen, and the registration ran 2.5x slower."""

    import synthetic

    t1 = synthetic.mni("t1")
    centre = t1.TransformContinuousIndexToPhysicalPoint(((np.array(t1.GetSize()) - 1) / 2).tolist())
    scan = sitk.AdditiveGaussianNoise(sitk.Resample(t1, synthetic.oblique_grid(centre), sitk.Transform(),
                                                    sitk.sitkLinear, 0.0), 4.0, 0.0, 1)
    fixed, moving = (normalise(sitk.GetArrayFromImage(i), "mr") for i in (t1, scan))
    assert S.histogram_distance(fixed, moving) < S.HISTOGRAM_DISTANCE_THRESHOLD / 3
    assert S.choose(("mr", "mr"), fixed, moving)[0] == "ncc"
    inverted = np.where(fixed > 0.05, 1 - fixed, 0)
    assert S.choose(("mr", "mr"), fixed, inverted)[0] == "mind"


def test_adam_matches_torch_optim_adam():
    torch.manual_seed(0)
    target = torch.randn(3, 4)
    ours, theirs = torch.zeros(3, 4, requires_grad=True), torch.zeros(3, 4, requires_grad=True)
    opt_ours, opt_theirs = Adam([ours], lr=0.05), torch.optim.Adam([theirs], lr=0.05)
    for _ in range(25):
        for p, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            ((p - target) ** 2 * torch.arange(1.0, 5.0)).sum().backward()
            opt.step()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
