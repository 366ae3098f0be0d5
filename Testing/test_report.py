"""The registration figure: drawn by the helper process exactly as in this process, failures raised."""
import numpy as np
import pytest
import SimpleITK as sitk

from gvsl.report import draw_registration, registration_panels
from gvsl.report_process import ReportProcess


def oblique_volume(seed: int) -> sitk.Image:
    arr = np.random.default_rng(seed).random((12, 16, 20)).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((1.0, 1.5, 2.5))
    image.SetOrigin((10.0, -5.0, 3.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    return image


@pytest.fixture
def figure():
    fixed = oblique_volume(0)
    jacobian = sitk.Image(fixed.GetSize(), sitk.sitkFloat32) + 1.0
    jacobian.CopyInformation(fixed)
    points = np.array([fixed.TransformContinuousIndexToPhysicalPoint((4.0, 5.0, 6.0)),
                       fixed.TransformContinuousIndexToPhysicalPoint((10.0, 3.0, 2.0))])
    return registration_panels(fixed, oblique_volume(1), oblique_volume(2), jacobian,
                               {"fixed": points, "moving": points + 1.0, "labels": ["1", "2"]})


def test_landmarks_are_projected_onto_each_view_in_voxels(figure):
    axial, coronal, sagittal = figure["landmarks"]["fixed"]
    np.testing.assert_allclose(axial, [[4, 10], [5, 3]], atol=1e-9)  # (i, j)
    np.testing.assert_allclose(coronal, [[4, 10], [11 - 6, 11 - 2]], atol=1e-9)  # (i, d - 1 - k)
    np.testing.assert_allclose(sagittal, [[5, 3], [5, 9]], atol=1e-9)  # (j, d - 1 - k)


METRICS = {"ncc_before": 0.1, "ncc_after": 0.5, "folding_percent": 0.0, "runtime_s": 2.0, "device": "cpu",
           "inverse_consistency_mm": {"mean": 0.04}, "similarity": {"name": "mind", "before": 0.2, "after": 0.1},
           "tre_before": {"mean_mm": 5.0}, "tre_after": {"mean_mm": 0.5}}


@pytest.mark.parametrize("metrics", [None, METRICS])
def test_the_helper_draws_the_same_figure_as_this_process(figure, metrics, tmp_path):
    """The helper renders the panels first and draws the title onto them last; the PNG is the one
    ``draw_registration`` saves in one go."""
    from matplotlib.image import imread

    draw_registration(figure, tmp_path / "here.png", metrics)
    with ReportProcess() as drawer:
        drawer.panels(figure)
        drawer.save(tmp_path / "helper.png", metrics)
        drawer.wait()
    here = imread(tmp_path / "here.png")
    np.testing.assert_array_equal(imread(tmp_path / "helper.png"), here)
    top = here[: here.shape[0] // 20, :, :3]
    assert (top.min() < 0.5) == (metrics is not None)  # the title is there, in the top margin


def test_a_failed_drawing_is_raised_and_an_unused_helper_stops(figure, tmp_path):
    drawer = ReportProcess()
    drawer.panels(figure)
    drawer.save(tmp_path / "no such folder" / "report.png", None)
    with pytest.raises(RuntimeError, match="drawing report.png failed: .*No such file"):
        drawer.wait()
    idle = ReportProcess()
    idle.close()
    assert idle._proc.returncode is not None


def test_overlays_outlines_a_legend_and_no_flat_jacobian_for_a_linear_result():
    """Overlays show the fixed image in magenta and the moving in green; a linear result gets the
    difference after instead of a flat Jacobian; label outlines and landmark markers are explained."""
    from gvsl.report import LINEAR_PANELS, PANELS, draw_panels

    fixed, moving = oblique_volume(0), oblique_volume(1)
    labels = sitk.Cast(fixed > 0.5, sitk.sitkUInt8)
    points = np.array([fixed.TransformContinuousIndexToPhysicalPoint((4.0, 5.0, 6.0))])
    linear = registration_panels(fixed, moving, moving, None, {"fixed": points, "moving": points, "labels": ["1"]},
                                 {"fixed": labels, "warped": labels})
    assert tuple(linear["panels"]) == LINEAR_PANELS and LINEAR_PANELS[-1] == "difference after"
    f, w = linear["panels"]["fixed"][0], linear["panels"]["warped (after)"][0]
    np.testing.assert_allclose(linear["panels"]["difference after"][0], np.abs(f - w))
    overlay = linear["panels"]["overlay after"][0]
    assert overlay.shape == (*f.shape, 3) and np.array_equal(overlay[..., 0], f) and np.array_equal(overlay[..., 1], w)
    edges = linear["outlines"]["fixed"][0]
    mask = sitk.GetArrayFromImage(labels)[fixed.GetSize()[2] // 2]
    assert edges.any() and not edges[mask == mask.max()].all()  # the boundary, not the inside
    legend = [t.get_text() for t in draw_panels(linear).legends[0].get_texts()]
    assert any("fixed magenta" in t for t in legend) and "fixed landmark" in legend
    assert "fixed labels' outlines" in legend and "warped moving labels' outlines" in legend
    jacobian = sitk.Image(fixed.GetSize(), sitk.sitkFloat32) + 1.0
    jacobian.CopyInformation(fixed)
    assert tuple(registration_panels(fixed, moving, moving, jacobian)["panels"]) == PANELS
