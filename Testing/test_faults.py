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

from conftest import write
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
    torch.manual_seed(0)
    spec = LabelSpec([0, 1], ["background", "head"], [(0, 0, 0), (1, 0, 0)])
    model = checkpoint.save(tmp_path / "seg.pt", GVSLSegmenter(2, width=4), "segmentation", {
        "width": 4, "in_channels": 1, "labels": spec.as_dict(), "normalize": "mr", "spacing": [2.0] * 3,
        "crop": [16, 16, 16]})
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


def test_an_intact_gzip_stream_passes(tmp_path, anatomical_path):
    path = write(sitk.ReadImage(str(anatomical_path)), tmp_path / "fine.nii.gz")
    assert gzip.decompress(path.read_bytes())  # a valid stream
    assert read_volume(path).GetSize() == (33, 41, 25)
