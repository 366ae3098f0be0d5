"""Registration in physical space, checked point by point against transforms made with SimpleITK."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl import checkpoint, geometry, spatial
from gvsl.networks import GVSL
from gvsl.registration import RegistrationError, RegistrationOptions, register

import synthetic

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "GVSLTrainer" / "register.py"


def oblique_anisotropic_grid(size=(30, 22, 14), spacing=(1.1, 1.7, 2.6)):
    return synthetic.oblique_grid((5.0, -3.0, 12.0), size, spacing, ((0.5, -0.3, 1.0), 0.6))


def test_voxel_matrix_maps_points_like_the_physical_affine():
    grid = oblique_anisotropic_grid()
    g = torch.Generator().manual_seed(0)
    m = spatial.affine_from_parameters(torch.rand(1, 3, generator=g) * 0.3, 1 + torch.rand(1, 3, generator=g) * 0.2,
                                       torch.rand(1, 3, generator=g) * 3, torch.rand(1, 6, generator=g) * 0.1)[0].double()
    phys = geometry.voxel_matrix_to_physical(m.numpy(), grid)
    c = (np.array(grid.GetSize()) - 1) / 2
    for p in [(0, 0, 0), (29, 21, 13), (7.5, 3.2, 9.0)]:
        q = m[:, :3].numpy() @ (np.array(p) - c) + c + m[:, 3].numpy()  # voxel (x, y, z) that p samples
        expected = grid.TransformContinuousIndexToPhysicalPoint(q.tolist())
        got = phys @ np.append(grid.TransformContinuousIndexToPhysicalPoint(p), 1)
        np.testing.assert_allclose(got[:3], expected, atol=1e-9)


def test_displacement_image_resamples_like_the_network_warp():
    grid = oblique_anisotropic_grid()
    rng = np.random.default_rng(1)
    img = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(rng.random(grid.GetSize()[::-1])), 2.0)
    img.CopyInformation(grid)
    disp = torch.nn.functional.avg_pool3d(torch.randn(1, 3, *grid.GetSize()[::-1], dtype=torch.float64) * 6, 5, 1, 2)
    ours = spatial.warp(torch.from_numpy(sitk.GetArrayFromImage(img))[None, None], None, disp,
                        padding_mode="border")[0, 0].numpy()
    field = geometry.displacement_image(disp[0].numpy(), grid)
    tfm = sitk.DisplacementFieldTransform(sitk.Image(field))
    ref = sitk.GetArrayFromImage(sitk.Resample(img, grid, tfm, sitk.sitkLinear, 0.0))
    inside = synthetic.inside(img, tfm)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-6)


def test_working_grid_covers_the_fixed_extent():
    fixed = oblique_anisotropic_grid()
    grid = geometry.working_grid(fixed, 2.0)
    assert grid.GetSpacing() == (2.0, 2.0, 2.0)
    corners = [fixed.TransformContinuousIndexToPhysicalPoint(
        [(-0.5 if bit == "0" else n - 0.5) for bit, n in zip(f"{i:03b}", fixed.GetSize())]) for i in range(8)]
    idx = np.array([grid.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    np.testing.assert_allclose(idx.min(axis=0), -0.5, atol=1e-6)  # the same box ...
    np.testing.assert_allclose(idx.max(axis=0), np.array(grid.GetSize()) - 0.5, atol=0.5)  # ... to a voxel


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    """Register a known deformation of real anatomy once, through the command line, on files."""
    tmp = tmp_path_factory.mktemp("registration")
    fixed, moving, fixed_labels, moving_labels, truth = synthetic.synthetic_pair(seed=0)
    paths = {}
    for name, img in dict(fixed=fixed, moving=moving, fixed_labels=fixed_labels, moving_labels=moving_labels).items():
        paths[name] = tmp / f"{name}.nrrd"
        sitk.WriteImage(img, str(paths[name]))
    out = tmp / "out"
    res = subprocess.run([sys.executable, str(SCRIPT), "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
                          "--fixed-labels", str(paths["fixed_labels"]), "--moving-labels", str(paths["moving_labels"]),
                          "--output-dir", str(out), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    return dict(out=out, fixed=fixed, moving=moving, truth=truth, stdout=res.stdout)


def brain_mask(fixed):
    arr = sitk.GetArrayFromImage(fixed)
    return arr > 0.15 * arr.max()


def test_recovers_a_known_affine_and_field_point_by_point(recovered):
    fixed = recovered["fixed"]
    est = sitk.ReadTransform(str(recovered["out"] / "transform.h5"))
    err = np.linalg.norm(synthetic.transform_field(est, fixed) - synthetic.transform_field(recovered["truth"], fixed), axis=-1)
    inside = err[brain_mask(fixed)]
    assert inside.mean() < 1.5, inside.mean()
    assert np.percentile(inside, 90) < 3.0


def test_tissue_dice_and_folding(recovered):
    m = json.loads((recovered["out"] / "metrics.json").read_text())
    assert m["warnings"] == []  # a good same-modality result raises no doubt
    assert m["similarity"]["share_of_self"] > 0.9 and m["overlap"]["after"] == 1.0
    assert m["dice_after"]["2"] >= 0.9  # white matter
    assert m["dice_after"]["1"] >= 0.8  # grey matter: a 2-3 mm thin ribbon on a 2.4-3.2 mm grid
    assert m["dice_after"]["1"] > m["dice_before"]["1"] + 0.5 and m["dice_after"]["2"] > m["dice_before"]["2"] + 0.15
    assert m["folding_percent"] < 0.1
    assert m["ncc_after"] > m["ncc_before"]
    assert m["device"] == "cpu" and m["runtime_s"] > 0


def test_inverse_composed_with_forward_is_identity(recovered):
    fixed = recovered["fixed"]
    fwd = sitk.ReadTransform(str(recovered["out"] / "transform.h5"))
    inv = sitk.ReadTransform(str(recovered["out"] / "inverse.h5"))
    round_trip = sitk.CompositeTransform([inv, fwd])
    err = np.linalg.norm(synthetic.transform_field(round_trip, fixed), axis=-1)[brain_mask(fixed)]
    assert err.mean() < 0.3
    m = json.loads((recovered["out"] / "metrics.json").read_text())
    assert m["inverse_consistency_mm"]["mean"] < 0.3


def test_plain_simpleitk_reproduces_the_outputs(recovered):
    out, fixed, moving = recovered["out"], recovered["fixed"], recovered["moving"]
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    again = sitk.Resample(moving, fixed, sitk.ReadTransform(str(out / "transform.h5")), sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(warped), atol=1e-3)
    # the two parts: displacement first, then the affine
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    parts = sitk.CompositeTransform([sitk.ReadTransform(str(out / "affine.tfm")), sitk.DisplacementFieldTransform(field)])
    np.testing.assert_allclose(synthetic.transform_field(parts, fixed),
                               synthetic.transform_field(sitk.ReadTransform(str(out / "transform.h5")), fixed), atol=1e-4)
    labels = sitk.ReadImage(str(out / "warped_labels.nii.gz"))
    assert labels.GetSize() == fixed.GetSize() and labels.GetDirection() == pytest.approx(fixed.GetDirection())
    assert (out / "report.png").stat().st_size > 10_000
    assert "report.png" in recovered["stdout"]


def tiny_pair():
    head = sitk.ReadImage(str(synthetic.package_file("nibabel", "tests/data/anatomical.nii")), sitk.sitkFloat32)
    moving = sitk.Resample(head, head, sitk.Euler3DTransform((0, 0, 0), 0.1, 0, 0, (2.0, 0, 0)), sitk.sitkLinear, 0.0)
    return head, moving


@pytest.mark.parametrize("source", ["project", "official"])
def test_a_network_starts_the_optimisation(tmp_path, source):
    torch.manual_seed(0)
    net = GVSL(width=4)
    path = tmp_path / "model.pt"
    if source == "project":
        checkpoint.save(path, net, "pretrain", {"width": 4, "normalize": "mr", "spacing": [4.0] * 3})
    else:
        torch.save(net.state_dict(), path)
    fixed, moving = tiny_pair()
    res = register(fixed, moving, model=checkpoint.load(path),
                   options=RegistrationOptions(iterations=8, spacing=4.0, normalize="mr"))
    assert res.metrics["model"] == str(path)
    assert res.warped.GetSize() == fixed.GetSize()
    assert res.metrics["folding_percent"] < 1


def test_no_overlap_is_an_error():
    fixed, moving = tiny_pair()
    far = sitk.Image(moving)
    far.SetOrigin((900.0, 0.0, 0.0))  # a wrong origin, and positions trusted as they are
    with pytest.raises(RegistrationError, match="does not overlap"):
        register(fixed, far, options=RegistrationOptions(iterations=2, spacing=4.0, initialisation="none"))
    register(fixed, far, options=RegistrationOptions(iterations=2, spacing=4.0))  # centring fixes it


def test_cli_with_a_model_works_on_the_models_grid(tmp_path):
    """register.py --model reads the checkpoint before preparing the pair (whose working grid takes the
    model's spacing); without a model it prepares while torch loads: both paths end in the same files."""
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    checkpoint.save(model, GVSL(width=4), "pretrain", {"width": 4, "normalize": "mr", "spacing": [5.0] * 3})
    fixed, moving = tiny_pair()
    for name, image in (("fixed", fixed), ("moving", moving)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    for out, extra in (("with", ["--model", str(model)]), ("without", [])):
        res = subprocess.run([sys.executable, str(SCRIPT), "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving",
                              str(tmp_path / "moving.nii.gz"), "--output-dir", str(tmp_path / out), "--iterations",
                              "4", "--no-progress", *extra], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    metrics = {out: json.loads((tmp_path / out / "metrics.json").read_text()) for out in ("with", "without")}
    assert metrics["with"]["model"] == str(model) and metrics["with"]["working_grid"]["spacing_mm"] == 5.0
    assert metrics["without"]["model"] is None and metrics["without"]["working_grid"]["spacing_mm"] == 2.0
    assert (tmp_path / "with" / "transform.h5").exists() and (tmp_path / "without" / "report.png").exists()


@pytest.mark.parametrize("what", ["2d", "model"])
def test_cli_errors_leave_no_output(tmp_path, bad_files, anatomical_path, what):
    out = tmp_path / "out"
    args = ["--fixed", str(anatomical_path), "--moving", str(anatomical_path), "--output-dir", str(out), "--no-progress"]
    if what == "2d":
        args[3] = str(bad_files["2d"])
        expected = "slice.nii.gz: is a 2D image"
    else:
        other = tmp_path / "resnet.pth"
        torch.save({"conv1.weight": torch.zeros(2)}, other)
        args += ["--model", str(other)]
        expected = "resnet.pth: a PyTorch state_dict, but not of a GVSL model"
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and expected in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("rigid", [True, False])
def test_the_linear_stage_gradient_is_the_chain_rule_through_its_jacobian(rigid):
    """The linear stage differentiates its 3x4 matrix by central differences, not autograd: the
    gradient it hands Adam must be autograd's, for the rigid and the affine parameters alike."""
    from gvsl.registration import linear

    torch.manual_seed(0)
    shape = (20, 23, 21)
    centre = (torch.tensor(shape[::-1], dtype=torch.float32) - 1) / 2
    params = linear.LinearParameters(centre + 1.5, centre, float(centre.max()))
    for t in params.all():
        t.copy_(0.1 * torch.randn_like(t)).requires_grad_(True)
    params.rigid = rigid
    base = spatial.identity_matrix(1) + 0.01 * torch.randn(1, 3, 4)
    weight = torch.randn(1, 3, 4)
    theta_autograd = linear._theta(base, params, shape)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad((theta_autograd * weight).sum(),
                                                                     params.trainable())]).double()
    theta, jacobian = linear.theta_and_jacobian(base, params, shape)
    assert jacobian.shape == (12, 6 if rigid else 15)
    torch.testing.assert_close(theta, theta_autograd.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(jacobian.T @ weight.reshape(12).double(), expected, rtol=1e-5, atol=1e-6)


def test_tuning_flags_reach_the_options_and_bad_values_are_named(tmp_path):
    from gvsl.cohort.worker import load_script
    from gvsl.registration.options import DEFORMABLE_LEVELS, finest_levels

    script = load_script("register")
    args = script.parse(["--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--smooth-weight", "2.5", "--ncc-window", "5",
                         "--levels", "2", "--threads", "1", "--no-polish"])
    opts = script.options_from(args)
    assert (opts.smooth_weight, opts.ncc_window, opts.levels) == (2.5, 5, ((2, 4, 0.72), (1, 4, 0.08)))
    assert not opts.polish
    assert finest_levels(3) == DEFORMABLE_LEVELS and finest_levels(1) == ((1, 4, 0.8),)
    defaults = script.options_from(script.parse(["--fixed", "f.nii.gz", "--moving", "m.nii.gz"]))
    assert (defaults.smooth_weight, defaults.ncc_window, defaults.levels) == (1.0, 7, DEFORMABLE_LEVELS)
    assert defaults.polish
    for flags, message in ((["--ncc-window", "4"], "the NCC window must be an odd number of voxels, 3 or more, got 4"),
                           (["--smooth-weight", "-1"], "the smoothness weight must be 0 or more, got -1.0")):
        res = subprocess.run([sys.executable, str(SCRIPT), "--fixed", "f.nii.gz", "--moving", "m.nii.gz", *flags,
                              "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and f"error: {message}" in res.stderr, res.stderr
