"""Faults lose nothing: a full disk, corrupt compressed files, broken headers and half-valid files get
one error line that names the file and the cause, exit 2, and leave earlier results as they were."""
from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import untrained_segmentation_model, write
from gvsl import checkpoint
from gvsl.labels import LabelSpec
from gvsl.networks import GVSLSegmenter
from gvsl.volumes import DataError, read_volume

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "GVSLTrainer"
resource = pytest.importorskip("resource")  # POSIX: the file size limit stands in for a full disk


def run(script: str, *args, limit_kb: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    def limited():
        if limit_kb is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb * 1024, limit_kb * 1024))

    return subprocess.run([sys.executable, str(TRAINER / script), *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limited)


@pytest.fixture
def pair(tmp_path, anatomical_path):
    head = sitk.ReadImage(str(anatomical_path), sitk.sitkFloat32)
    moved = sitk.Image(head)
    moved.SetOrigin((np.array(head.GetOrigin()) + [3.0, -2.0, 1.0]).tolist())
    return write(head, tmp_path / "fixed.nii.gz"), write(moved, tmp_path / "moving.nii.gz")


def folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_full_disk_stops_register_py_naming_the_file_and_keeps_the_earlier_run(tmp_path, pair):
    fixed, moving = pair
    out = tmp_path / "out"
    first = run("register.py", "--fixed", fixed, "--moving", moving, "--mode", "affine", "--output-dir", out)
    assert first.returncode == 0, first.stderr
    earlier = folder_bytes(out)
    done = run("register.py", "--fixed", fixed, "--moving", moving, "--mode", "affine", "--output-dir", out,
               limit_kb=20)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "warped.nii.gz: could not be written" in done.stderr and "file size limit" in done.stderr, done.stderr
    assert "Outputs in" not in done.stdout and "HDF5" not in done.stderr and len(done.stderr.splitlines()) <= 2
    assert folder_bytes(out) == earlier  # the earlier run's files, byte for byte
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_a_full_disk_stops_segment_py_and_keeps_the_earlier_label_map(tmp_path, anatomical_path):
    model = untrained_segmentation_model(tmp_path / "seg.pt")
    labels = tmp_path / "labels.nii"  # uncompressed: bigger than the limit
    first = run("segment.py", "--model", model, "--input", anatomical_path, "--output", labels)
    assert first.returncode == 0, first.stderr
    earlier = labels.read_bytes()
    done = run("segment.py", "--model", model, "--input", anatomical_path, "--output", labels, limit_kb=8)
    assert done.returncode == 2 and "labels.nii: could not be written" in done.stderr, done.stderr
    assert labels.read_bytes() == earlier
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def corrupt_middle(path: Path) -> Path:
    """A .nii.gz whose middle third of voxel bytes is garbage, still valid deflate, with the gzip trailer
    (CRC and size) of the original data: only the checksum tells (ITK reads it without complaint)."""
    original = path.read_bytes()
    data = bytearray(gzip.decompress(original))
    third = len(data) // 3
    data[third:2 * third] = np.random.default_rng(0).integers(0, 256, third, dtype=np.uint8).tobytes()
    damaged = bytearray(gzip.compress(bytes(data)))
    damaged[-8:] = original[-8:]  # the trailer of the undamaged data
    path.write_bytes(bytes(damaged))
    return path


def test_a_corrupt_gzip_stream_is_refused_naming_the_file(tmp_path, anatomical_path):
    head = sitk.Expand(sitk.ReadImage(str(anatomical_path)), [2, 2, 2])  # ITK checks no CRC of a larger file
    bad = corrupt_middle(write(sitk.Cast(head, sitk.sitkInt16), tmp_path / "corrupt.nii.gz"))
    garbage = sitk.GetArrayFromImage(sitk.ReadImage(str(bad))) != sitk.GetArrayFromImage(sitk.Cast(head, sitk.sitkInt16))
    assert garbage.mean() > 0.2  # SimpleITK alone reads it without complaint, a third of it garbage
    with pytest.raises(DataError, match=r"corrupt.nii.gz: cannot be trusted"):
        read_volume(bad)
    done = run("register.py", "--fixed", anatomical_path, "--moving", bad, "--output-dir", tmp_path / "out")
    assert done.returncode == 2 and "corrupt.nii.gz: cannot be trusted" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_gzip_stream_damaged_from_its_start_is_refused_naming_the_file(tmp_path, anatomical_path):
    """Damage within the header's first bytes raised zlib.error, not OSError: a traceback, not a message."""
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"broken.nii.gz: cannot be read: its gzip stream is damaged"):
        read_volume(bad)
    done = run("register.py", "--fixed", anatomical_path, "--moving", bad, "--output-dir", tmp_path / "out")
    assert done.returncode == 2 and "broken.nii.gz: cannot be read" in done.stderr, done.stderr


def test_an_intact_gzip_stream_passes(tmp_path, anatomical_path):
    path = write(sitk.ReadImage(str(anatomical_path)), tmp_path / "fine.nii.gz")
    assert gzip.decompress(path.read_bytes())  # a valid stream
    assert read_volume(path).GetSize() == (33, 41, 25)


# ---------------------------------------------------------------------------------------------- headers
def nifti_with(path: Path, offset: int, fmt: str, value: float) -> Path:
    """A real .nii whose header field at ``offset`` is set to ``value``."""
    import struct

    data = bytearray(path.read_bytes())
    data[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    broken = path.with_name(f"broken_{offset}_{value}.nii")
    broken.write_bytes(bytes(data))
    return broken


@pytest.mark.parametrize("offset, value, expected", [
    (108, float("nan"), "its data offset (vox_offset) is nan"),
    (108, float("inf"), "its data offset (vox_offset) is inf"),
    (80, float("nan"), "its voxel size (pixdim) is (nan, 2.0, 2.0)"),
    (80, 0.0, "its voxel size (pixdim) is (0.0, 2.0, 2.0)"),
    (292, float("nan"), "its sform (srow_x, srow_y, srow_z) holds non-numbers"),
])
def test_a_broken_nifti_header_is_refused_naming_the_file(tmp_path, anatomical_path, offset, value, expected):
    plain = write(sitk.ReadImage(str(anatomical_path)), tmp_path / "head.nii")
    broken = nifti_with(plain, offset, "<f", value)
    with pytest.raises(DataError) as e:
        read_volume(broken)
    assert str(e.value).startswith(f"{broken}: has a broken header: ") and expected in str(e.value)


def test_pretraining_skips_a_file_with_an_infinite_offset_and_goes_on(tmp_path, anatomical_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(sitk.ReadImage(str(anatomical_path)), folder / "good.nii.gz")
    sitk.WriteImage(sitk.Flip(sitk.ReadImage(str(anatomical_path)), [True, False, False]), str(folder / "also.nrrd"))
    broken = nifti_with(write(sitk.ReadImage(str(anatomical_path)), folder / "base.nii"), 108, "<f", float("inf"))
    (folder / "base.nii").unlink()
    done = run("pretrain.py", "--data", folder, "--output-dir", tmp_path / "run", "--steps", "2", "--crop", "16", "16",
               "16", "--width", "4", "--workers", "0", "--spacing", "2", "--normalize", "mr", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert f"skipping {broken}: has a broken header" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------- outputs
def test_an_output_folder_behind_a_dangling_link_or_unwritable_is_refused_before_any_work(tmp_path, pair,
                                                                                       monkeypatch):
    from gvsl import outputs

    fixed, moving = pair
    link = tmp_path / "results"
    link.symlink_to(tmp_path / "nowhere")
    done = run("register.py", "--fixed", fixed, "--moving", moving, "--output-dir", link / "case1")
    assert done.returncode == 2 and f"{link} is a link to {tmp_path / 'nowhere'}, which does not exist" in done.stderr
    # a read-only file system (root ignores permission bits): creating a file there fails
    monkeypatch.setattr(outputs.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(OSError(30, "Read-only")))
    with pytest.raises(ValueError, match="cannot be written .* read-only file system"):
        outputs.check_output_folder(tmp_path / "new" / "out")


def test_two_runs_finishing_into_one_folder_leave_one_runs_set(tmp_path, monkeypatch):
    """Each run moves its files in under a lock on the folder: never one run's metrics.json with the
    other's transform.h5, even with slow renames."""
    import os
    import threading
    import time

    from gvsl import outputs

    real = os.replace

    def slow(src, dst):
        time.sleep(0.05)
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", slow)
    out = tmp_path / "out"
    names = ("metrics.json", "transform.h5", "warped.nii.gz", "report.png")

    def one_run(tag: str) -> None:
        with outputs.staged_files(out, replaces=names) as stage:
            for name in names:
                (stage / name).write_text(tag)

    threads = [threading.Thread(target=one_run, args=(tag,)) for tag in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({(out / name).read_text() for name in names}) == 1


@pytest.mark.parametrize("value", ["nan", "1", "-0.5", "0.99"])
def test_segment_overlap_out_of_range_is_refused_before_the_model_loads(tmp_path, anatomical_path, value):
    done = run("segment.py", "--model", tmp_path / "missing.pt", "--input", anatomical_path, "--output",
               tmp_path / "labels.nii.gz", "--overlap", value)
    assert done.returncode == 2 and "argument --overlap: must be between 0 and 0.9" in done.stderr
    assert "missing.pt" not in done.stderr  # refused before the model is looked at


# ---------------------------------------------------------------------------------------------- datasets and models
def labelled_dataset(tmp_path, anatomical_path, labels_field, values=(205, 420)) -> Path:
    img = sitk.ReadImage(str(anatomical_path), sitk.sitkFloat32)
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, 2.0))
    lab = np.zeros(smooth.shape, np.uint16)
    if values:
        lab[smooth > np.percentile(smooth, 50)] = values[0]
        lab[smooth > np.percentile(smooth, 85)] = values[1]
    labels = sitk.GetImageFromArray(lab)
    labels.CopyInformation(img)
    write(img, tmp_path / "images" / "case.nii.gz")
    write(labels, tmp_path / "labels" / "case.nii.gz")
    spec = {"training": [{"image": "images/case.nii.gz", "label": "labels/case.nii.gz"}], "labels": labels_field}
    path = tmp_path / "dataset.json"
    path.write_text(__import__("json").dumps(spec))
    return path


def finetune(dataset: Path, out: Path, **options):
    import warnings

    from gvsl.finetune import FinetuneConfig, train

    settings = dict(data=str(dataset), output_dir=str(out), steps=2, batch_size=2, crop=(16, 16, 16), width=4,
                    workers=0, spacing=(2.0, 2.0, 2.0), normalize="mr", val_every=2, log_every=1, progress=False,
                    device="cpu", norm="group")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(FinetuneConfig(**{**settings, **options}))


@pytest.mark.parametrize("labels, expected", [
    ({"0": "background", "-1": "x", "205": "a", "420": "b"}, "label value -1 (of 'x') is negative"),
    ({"0": "background", "1.5": "x", "205": "a", "420": "b"}, "label value '1.5' (of 'x') is not a whole number"),
    (["background", "a", "b"], "'labels' must map label values to names"),
    ({"background": 0, "a": [205, 420]}, "holds lists of values (nnU-Net's region-based training)"),
])
def test_dataset_json_label_variants_are_refused_naming_the_file(tmp_path, anatomical_path, labels, expected):
    dataset = labelled_dataset(tmp_path, anatomical_path, labels)
    with pytest.raises(DataError) as e:
        finetune(dataset, tmp_path / "run")
    assert str(e.value).startswith(f"{dataset}: ") and expected in str(e.value)


def test_nnunet_v2_labels_are_read_and_a_top_level_list_is_refused(tmp_path, anatomical_path):
    dataset = labelled_dataset(tmp_path, anatomical_path, {"background": 0, "grey": 205, "white": 420})
    model, _ = finetune(dataset, tmp_path / "run")
    spec = checkpoint.load(tmp_path / "run" / "gvsl_segmentation.pt").meta["labels"]
    assert spec["values"] == [0, 205, 420] and spec["names"] == ["background", "grey", "white"]
    dataset.write_text("[1, 2, 3]")
    with pytest.raises(DataError, match=r"dataset.json: a dataset.json must be an object"):
        finetune(dataset, tmp_path / "run2")


def test_label_maps_that_are_all_background_are_refused_before_training(tmp_path, anatomical_path):
    dataset = labelled_dataset(tmp_path, anatomical_path, {"0": "background", "1": "tumour"}, values=())
    with pytest.raises(DataError, match="every label map is all background"):
        finetune(dataset, tmp_path / "run")
    assert not (tmp_path / "run" / "gvsl_segmentation.pt").exists()


def test_a_damaged_checkpoint_names_the_file_and_what_is_missing(tmp_path):
    from gvsl.checkpoint import CheckpointError

    model = GVSLSegmenter(2, width=4)
    spec = LabelSpec([0, 1], ["background", "head"])
    path = checkpoint.save(tmp_path / "seg.pt", model, "segmentation", {"width": 4, "labels": spec.as_dict()})
    raw = torch.load(path, weights_only=True)
    for broken, expected in ((dict(raw, kind=None), "has kind None"),
                             ({k: v for k, v in raw.items() if k != "kind"}, "has no 'kind'"),
                             (dict(raw, meta={"width": 4}), "names no classes (meta 'labels')")):
        torch.save(broken, tmp_path / "broken.pt")
        with pytest.raises(CheckpointError) as e:
            checkpoint.load(tmp_path / "broken.pt")
        assert str(e.value).startswith(f"{tmp_path / 'broken.pt'}: a damaged") and expected in str(e.value)


def test_resuming_onto_a_dataset_with_other_classes_names_the_file(tmp_path, anatomical_path):
    from gvsl.training import TrainingError

    first = labelled_dataset(tmp_path / "a", anatomical_path, {"0": "background", "205": "a", "420": "b"})
    finetune(first, tmp_path / "run", steps=2, checkpoint_every=1)
    other = labelled_dataset(tmp_path / "b", anatomical_path, {"0": "background", "205": "a"}, values=(205, 205))
    with pytest.raises(TrainingError) as e:
        finetune(other, tmp_path / "run", steps=4, resume=True)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'run' / 'checkpoint_last.pt'}: cannot resume: its weights have shape")
    assert "--output-dir" in message
