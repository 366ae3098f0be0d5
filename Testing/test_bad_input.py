"""Bad input to the training tools: one clear error line that names the file and the problem, no
traceback, and nothing written. (register.py's and segment.py's suites sit beside their other tests:
test_registration_cases.py and test_segmentation.py.)"""
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import write

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """The command behind ``GVSLTrainer/<name>.py``."""
    return importlib.import_module(f"gvsl.commands.{name}")


def float_head(anatomical_path) -> sitk.Image:
    return sitk.ReadImage(str(anatomical_path), sitk.sitkFloat32)


def with_nan(image: sitk.Image, everywhere: bool = False) -> sitk.Image:
    array = sitk.GetArrayFromImage(image)
    if everywhere:
        array[:] = np.nan
    else:
        array[5, 6, 7] = np.nan
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def truncated(image: sitk.Image, path: Path) -> Path:
    """Half of a real file's bytes: SimpleITK alone reads it without complaint, zero-filled."""
    write(image, path)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    return path


def run_tool(name: str, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = load_script(name).main(argv)
    except SystemExit as e:  # argparse refuses unknown choices itself
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# a tiny, fast run on the CPU; later flags override these
TINY = ["--crop", "16", "16", "16", "--width", "4", "--spacing", "2", "--normalize", "mr", "--workers", "0",
        "--steps", "2", "--no-progress", "--device", "cpu", "--norm", "group"]


def nothing_written(out: Path) -> bool:
    """No file, except complete cache entries (preprocessed volumes, which the next run reuses)."""
    return not out.exists() or not any(p.is_file() and "cache" not in p.relative_to(out).parts
                                       for p in out.rglob("*"))


PRETRAIN_CASES = {
    "truncated NIfTI": ("cut.nii.gz", [], "cut.nii.gz: is truncated or damaged"),
    "one NaN voxel in a NIfTI": ("nan.nii.gz", [], "nan.nii.gz: 1 of its 33825 voxels is NaN or infinite"),
    "an all-NaN NIfTI": ("allnan.nii", [], "allnan.nii: every voxel is NaN or infinite"),
    "a 2D image": ("slice.nrrd", [], "slice.nrrd: is a 2D image"),
    "a tiny volume": ("tiny.nii.gz", [], "tiny.nii.gz: is only"),
    "an empty folder": (None, [], "contains no images"),
    "--steps 0": ("good.nii.gz", ["--steps", "0"], "--steps must be above 0, got 0"),
    "--crop 4": ("good.nii.gz", ["--crop", "4", "4", "4"], "--crop needs 3 sizes of at least 8 voxels"),
    "--lr -1": ("good.nii.gz", ["--lr", "-1"], "--lr must be above 0"),
    "--workers -1": ("good.nii.gz", ["--workers", "-1"], "--workers must be 0 or more"),
    "--norm instance on 16-voxel crops": ("good.nii.gz", ["--norm", "instance"],
                                          "instance normalisation needs inputs over 16 voxels"),
}


@pytest.mark.parametrize("case", PRETRAIN_CASES)
def test_pretrain_refuses_bad_input_in_one_line(case, tmp_path, anatomical_path, capsys):
    name, extra, expected = PRETRAIN_CASES[case]
    head, folder = float_head(anatomical_path), tmp_path / "data"
    folder.mkdir()
    if name == "cut.nii.gz":
        truncated(head, folder / name)
    elif name in ("nan.nii.gz", "allnan.nii"):
        write(with_nan(head, everywhere=name == "allnan.nii"), folder / name)
    elif name == "slice.nrrd":
        write(head[:, :, 3], folder / name)
    elif name == "tiny.nii.gz":
        write(head[:5, :5, :5], folder / name)
    elif name:
        write(head, folder / name)
    out = tmp_path / "run"
    code, _, err = run_tool("pretrain", ["--data", str(folder), "--output-dir", str(out), *TINY, *extra], capsys)
    assert code == 2 and expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err  # a skip warning, then the error
    assert nothing_written(out), sorted(out.rglob("*"))


def labelled_folder(root: Path, head: sitk.Image, labels: sitk.Image, image: sitk.Image | None = None) -> Path:
    write(head if image is None else image, root / "images" / "case.nii.gz")
    write(labels, root / "labels" / "case.nii.gz")
    return root


def two_structures(head: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(head)
    labels = np.zeros(array.shape, np.uint16)
    labels[array > np.percentile(array, 50)] = 205
    labels[array > np.percentile(array, 85)] = 420
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(head)
    return out


def fractional(labels: sitk.Image) -> sitk.Image:
    out = sitk.Cast(labels, sitk.sitkFloat32)
    out[4, 5, 6] = 1.5
    return out


def shifted(labels: sitk.Image) -> sitk.Image:
    out = sitk.Image(labels)
    out.SetSpacing((1.0, 1.0, 1.0))
    return out


FINETUNE_CASES = {
    "truncated image": ("image", lambda h, t: None, "case.nii.gz: is truncated or damaged"),
    "NaN voxel in the image": ("image", lambda h, t: with_nan(h), "case.nii.gz: 1 of its 33825 voxels is NaN"),
    "non-integer label values": ("labels", fractional, "a label map needs integer values; 1 voxels are not (e.g. 1.5)"),
    "label map on another grid": ("labels", shifted, "its geometry (size (33, 41, 25), spacing (1.0, 1.0, 1.0)) "
                                                     "differs from its image"),
    "label values missing from dataset.json": ("json", None, "label values [420] are not among the dataset's [0, 205]"),
    "classes that cannot fit in memory": ("memory", None, "3 classes need about"),
    "--foreground-rate 2": ("flag", ["--foreground-rate", "2"], "--foreground-rate is a share between 0 and 1"),
    "--augment-rate -0.5": ("flag", ["--augment-rate", "-0.5"], "--augment-rate is a share between 0 and 1"),
    "--steps -3": ("flag", ["--steps", "-3"], "--steps must be above 0, got -3"),
    "--warmup-steps -1": ("flag", ["--warmup-steps", "-1"], "--warmup-steps must be 0 or more"),
    "--lr-schedule step": ("flag", ["--lr-schedule", "step"], "invalid choice: 'step'"),
    "--norm instance on 16-voxel crops": ("flag", ["--norm", "instance"],
                                          "instance normalisation needs inputs over 16 voxels along at least one "
                                          "axis (the bottleneck is 1/16 of each), got 16 x 16 x 16"),
}


@pytest.mark.parametrize("case", FINETUNE_CASES)
def test_finetune_refuses_bad_input_in_one_line(case, tmp_path, anatomical_path, capsys, monkeypatch):
    where, change, expected = FINETUNE_CASES[case]
    head = float_head(anatomical_path)
    labels = two_structures(head)
    root, extra = tmp_path / "cases", []
    data = labelled_folder(root, head, labels)
    if where == "image" and case.startswith("truncated"):
        truncated(head, root / "images" / "case.nii.gz")
    elif where == "image":
        write(change(head, tmp_path), root / "images" / "case.nii.gz")
    elif where == "labels":
        write(change(labels), root / "labels" / "case.nii.gz")
    elif where == "json":
        data = root / "dataset.json"
        data.write_text(json.dumps({"labels": {"0": "background", "205": "grey"},
                                    "training": [{"image": "images/case.nii.gz", "label": "labels/case.nii.gz"}]}))
    elif where == "memory":
        from gvsl import runtime
        monkeypatch.setattr(runtime, "available_memory", lambda device: 2 ** 10)
    else:
        extra = change
    out = tmp_path / "run"
    code, _, err = run_tool("finetune", ["--data", str(data), "--output-dir", str(out), *TINY, *extra], capsys)
    assert code == 2 and expected in err, err
    assert "Traceback" not in err and "_CacheItem" not in err, err
    assert nothing_written(out), sorted(out.rglob("*"))


def test_finetune_counts_a_skipped_case_in_its_summary(tmp_path, anatomical_path, capsys):
    """With other usable cases, a bad one is skipped: warned about while preparing, and counted and
    named again in the closing lines and in the model's metadata."""
    head = float_head(anatomical_path)
    labels = two_structures(head)
    root = labelled_folder(tmp_path / "cases", head, labels)
    write(head, root / "images" / "other.nii.gz")
    write(labels, root / "labels" / "other.nii.gz")
    write(head, root / "images" / "moved.nii.gz")
    write(shifted(labels), root / "labels" / "moved.nii.gz")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipping .*moved.nii.gz"):  # while preparing
        code, stdout, err = run_tool("finetune", ["--data", str(root), "--output-dir", str(out), *TINY,
                                                  "--val-every", "2"], capsys)
    assert code == 0, err
    assert "Skipped 1 of 3 cases:" in stdout and "moved.nii.gz" in stdout.split("Skipped")[1], stdout
    from gvsl import checkpoint
    meta = checkpoint.load(out / "gvsl_segmentation.pt").meta
    assert (meta["cases"]["train"], meta["cases"]["validation"], len(meta["cases"]["validation_cases"])) == (1, 1, 1)
    [(path, reason)] = meta["skipped"].items()
    assert path.endswith("moved.nii.gz") and "differs from its image" in reason
