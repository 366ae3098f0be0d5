"""Segmentation inference: geometry, label values, sliding windows, checkpoints."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl import checkpoint
from gvsl.checkpoint import CheckpointError
from gvsl.labels import LabelSpec
from gvsl.networks import GVSL, GVSLSegmenter
from gvsl.segmentation import SegmentationOptions, build_segmenter, segment, sliding_window_probabilities

import synthetic

SPEC = LabelSpec([0, 205, 420, 500], ["background", "myocardium", "atrium", "ventricle"])


def seg_checkpoint(path, crop=(16, 16, 16), spacing=(3.0, 3.0, 3.0), seed=0):
    torch.manual_seed(seed)
    model = GVSLSegmenter(SPEC.num_classes, width=4)
    checkpoint.save(path, model, "segmentation", {"width": 4, "labels": SPEC.as_dict(), "crop": list(crop),
                                                  "spacing": list(spacing), "normalize": "mr"})
    return model


def test_label_values_map_to_classes_and_back():
    arr = np.array([[0, 205], [500, 420]])
    classes = SPEC.to_classes(arr)
    assert classes.tolist() == [[0, 1], [3, 2]]
    np.testing.assert_array_equal(SPEC.to_values(classes), arr)
    with pytest.raises(ValueError, match="label values \\[7\\] are not among"):
        SPEC.to_classes(np.array([0, 7]), "x.nii.gz")
    assert LabelSpec.from_mapping({"0": "background", "205": "myo", "3": "lv"}).values == [0, 3, 205]
    assert LabelSpec.infer([np.array([0, 9, 4])]).names == ["background", "label_4", "label_9"]
    assert LabelSpec.from_dict(SPEC.as_dict()) == SPEC


def test_output_has_the_input_geometry_and_original_values(tmp_path):
    seg_checkpoint(tmp_path / "seg.pt")
    head = sitk.ReadImage(str(synthetic.package_file("nibabel", "tests/data/anatomical.nii")), sitk.sitkFloat32)
    grid = synthetic.oblique_grid(head.TransformContinuousIndexToPhysicalPoint((16, 20, 12)), (23, 31, 17),
                                  (2.3, 1.7, 3.1))
    image = sitk.Resample(head, grid, sitk.Transform(), sitk.sitkLinear, 0.0)  # oblique, anisotropic
    result = segment(image, checkpoint.load(tmp_path / "seg.pt"), SegmentationOptions(probabilities=True))
    out = result.labels
    assert out.GetSize() == image.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(out.GetDirection(), image.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= set(SPEC.values)
    probs = np.stack([sitk.GetArrayFromImage(p) for p in result.probabilities])
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(SPEC.to_values(probs.argmax(0)), sitk.GetArrayFromImage(out))


def test_sliding_window_equals_whole_volume_where_it_fits():
    torch.manual_seed(0)
    model = GVSLSegmenter(3, width=4).eval()
    x = torch.rand(1, 1, 16, 20, 24)
    whole = torch.softmax(model(x), 1)
    windowed = sliding_window_probabilities(model, x, (16, 20, 24), SegmentationOptions(), torch.device("cpu"))
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=1e-4)
    tiled = sliding_window_probabilities(model, x, (16, 16, 16), SegmentationOptions(), torch.device("cpu"))
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled.sum(1), torch.ones(1, 16, 20, 24), atol=1e-5, rtol=0)


def test_backbone_weights_come_from_a_pretraining_checkpoint():
    torch.manual_seed(1)
    pre = GVSL(width=4)
    seg = GVSLSegmenter(2, width=4)
    x = torch.rand(1, 1, 16, 16, 16)
    before = seg(x)
    assert seg.load_backbone(pre.state_dict()) == len(pre.unet.state_dict())
    for k, v in pre.unet.state_dict().items():
        torch.testing.assert_close(seg.unet.state_dict()[k], v)
    assert not torch.allclose(seg(x), before)  # changed weights change predictions


def test_wrong_checkpoint_kind_is_reported(tmp_path):
    checkpoint.save(tmp_path / "pre.pt", GVSL(width=4), "pretrain", {"width": 4})
    with pytest.raises(CheckpointError, match="pre.pt: is a pretrain model; segmentation needs a fine-tuned"):
        build_segmenter(checkpoint.load(tmp_path / "pre.pt"))


def test_segment_command_line(tmp_path, anatomical_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "GVSLTrainer" / "segment.py"
    seg_checkpoint(tmp_path / "seg.pt")
    out = tmp_path / "out" / "labels.nrrd"
    res = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "seg.pt"), "--input",
                          str(anatomical_path), "--output", str(out), "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == sitk.ReadImage(str(anatomical_path)).GetSize()
    assert [p.name for p in out.parent.iterdir()] == ["labels.nrrd"]  # no temporary file left
    checkpoint.save(tmp_path / "pre.pt", GVSL(width=4), "pretrain", {"width": 4})
    res = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "pre.pt"), "--input",
                          str(anatomical_path), "--output", str(tmp_path / "x.nii.gz")], capture_output=True, text=True)
    assert res.returncode == 2 and "is a pretrain model" in res.stderr and not (tmp_path / "x.nii.gz").exists()


def test_flip_tta_averages_the_flipped_predictions():
    from gvsl.segmentation import FLIPS

    torch.manual_seed(0)
    model = GVSLSegmenter(3, width=4).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    tta = sliding_window_probabilities(model, x, (16, 16, 16), SegmentationOptions(tta=True), torch.device("cpu"))
    with torch.no_grad():
        manual = sum(torch.softmax(model(x.flip(d)), 1).flip(d) if d else torch.softmax(model(x), 1)
                     for d in FLIPS) / len(FLIPS)
    torch.testing.assert_close(tta, manual, atol=1e-5, rtol=1e-4)
    plain = sliding_window_probabilities(model, x, (16, 16, 16), SegmentationOptions(), torch.device("cpu"))
    assert not torch.allclose(tta, plain)


@pytest.mark.parametrize("shape", [(239, 239, 200), (53, 61, 51), (20, 140, 129)])
@pytest.mark.parametrize("overlap", [0.5, 0.25])
def test_window_count_follows_monais_scan(shape, overlap):
    from monai.inferers.utils import _get_scan_interval, dense_patch_slices

    from gvsl.segmentation import window_count

    for window in ((128,) * 3, (32, 48, 32)):
        padded = [max(s, w) for s, w in zip(shape, window)]
        monai_windows = dense_patch_slices(padded, window, _get_scan_interval(padded, window, 3, (overlap,) * 3))
        assert window_count(shape, window, overlap) == len(monai_windows)


SEGMENT_CASES = {
    "a 2D output format": (["--output", "{tmp}/out.png"], "out.png: the output needs a 3D image format"),
    "no image format": (["--output", "{tmp}/out.txt"], "out.txt: the output needs a 3D image format"),
    "the output is the input": (["--output", "{head}"], "is also an input"),
    "--probabilities is a file": (["--probabilities", "{tmp}/probs"], "probs: is a file"),
    "a pre-training checkpoint": (["--model", "{tmp}/pre.pt"], "pre.pt: is a pretrain model"),
    "a plain pickle as the model": (["--model", "{tmp}/pickle.pt"], "pickle.pt: "),
    "a missing model": (["--model", "{tmp}/missing.pt"], "missing.pt"),
    "NaN voxels in the input": (["--input", "{tmp}/nan.nii.gz"], "nan.nii.gz: 1 of its"),
    "a truncated input": (["--input", "{tmp}/cut.nii.gz"], "cut.nii.gz: is truncated or damaged"),
}


@pytest.mark.parametrize("case", SEGMENT_CASES)
def test_segment_refuses_bad_input_in_one_line_and_writes_nothing(case, tmp_path, anatomical_path, capsys):
    """Outputs are checked before the model is read; every error names the file and has no traceback."""
    import pickle

    from gvsl.commands import segment as script
    seg_checkpoint(tmp_path / "seg.pt")
    checkpoint.save(tmp_path / "pre.pt", GVSL(width=4), "pretrain", {"width": 4})
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"not": "a checkpoint"}))
    (tmp_path / "probs").write_text("x")
    head = sitk.ReadImage(str(anatomical_path), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(head)
    array[3, 4, 5] = np.nan
    nan = sitk.GetImageFromArray(array)
    nan.CopyInformation(head)
    sitk.WriteImage(nan, str(tmp_path / "nan.nii.gz"))
    sitk.WriteImage(head, str(tmp_path / "whole.nii.gz"))
    whole = (tmp_path / "whole.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(whole[:len(whole) // 2])
    extra, expected = SEGMENT_CASES[case]
    argv = ["--model", str(tmp_path / "seg.pt"), "--input", str(anatomical_path), "--output",
            str(tmp_path / "out" / "labels.nii.gz"), "--no-progress",
            *[a.format(tmp=tmp_path, head=anatomical_path) for a in extra]]
    before = sorted(tmp_path.rglob("*"))
    code = script.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err and "\x1b[" not in err, err
    assert sorted(tmp_path.rglob("*")) == before and anatomical_path.is_file()  # nothing written, nothing lost

def test_a_seg_nrrd_is_a_compressed_slicer_segmentation_and_strays_can_be_removed(tmp_path, anatomical_path):
    """--output x.seg.nrrd: Slicer's segment names, colours and values in the header (slicerio reads
    them), compressed; --largest-component leaves each class in one connected piece."""
    import subprocess
    import sys

    slicerio = pytest.importorskip("slicerio")
    from conftest import untrained_segmentation_model

    model = untrained_segmentation_model(tmp_path / "seg.pt")
    script = Path(__file__).resolve().parents[1] / "GVSLTrainer" / "segment.py"
    outputs = {}
    for name, extra in (("plain", []), ("largest", ["--largest-component"])):
        outputs[name] = tmp_path / f"{name}.seg.nrrd"
        done = subprocess.run([sys.executable, str(script), "--model", str(model), "--input", str(anatomical_path),
                               "--output", str(outputs[name]), "--no-progress", *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    info = slicerio.read_segmentation(str(outputs["plain"]), skip_voxels=True)
    (segment,) = info["segments"]
    assert (segment["name"], segment["labelValue"], segment["layer"]) == ("head", 1, 0)
    assert np.allclose(segment["color"], (0.9, 0.6, 0.2))
    image = sitk.ReadImage(str(outputs["plain"]))
    assert outputs["plain"].stat().st_size < np.prod(image.GetSize()) / 5  # compressed (raw: a byte a voxel)

    def pieces(path):
        mask = sitk.ReadImage(str(path)) == 1
        return int(sitk.GetArrayFromImage(sitk.ConnectedComponent(mask, True)).max())

    assert pieces(outputs["plain"]) > 1  # an untrained network leaves islands
    assert pieces(outputs["largest"]) == 1
    assert "stray pieces removed: head" in done.stdout
