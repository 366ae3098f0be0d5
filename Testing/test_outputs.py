"""Outputs appear whole or not at all, and what a killed process left half-written goes at the next run."""
import subprocess
import sys

import SimpleITK as sitk
import torch

from gvsl.checkpoint import atomic_save
import gzip

import numpy as np

from gvsl.outputs import staged_files, write_image, write_stored_gzip


def test_temporaries_of_killed_processes_go_and_those_of_running_ones_stay(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = {tmp_path / f".out.partial-{dead}-abc": "dir", tmp_path / f".labels.{dead}.partial.nii.gz": "file",
                 tmp_path / f".checkpoint_last.pt.{dead}.tmp": "file"}
        running = {tmp_path / f".out.partial-{alive.pid}-xyz": "dir",
                   tmp_path / f".checkpoint_last.pt.{alive.pid}.tmp": "file"}
        for path, kind in {**stale, **running}.items():
            path.mkdir() if kind == "dir" else path.write_bytes(b"half-written")
        with staged_files(tmp_path / "out") as stage:
            (stage / "a.txt").write_text("done")
        write_image(sitk.Image([4, 4, 4], sitk.sitkUInt8), tmp_path / "labels.nii.gz")
        atomic_save({"x": torch.zeros(1)}, tmp_path / "checkpoint_last.pt")
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in running)
        assert (tmp_path / "out" / "a.txt").read_text() == "done" and (tmp_path / "labels.nii.gz").is_file()
    finally:
        alive.kill()
        alive.wait()


def test_a_field_written_as_stored_gzip_reads_back_exactly_and_leaves_no_temporary(tmp_path):
    rng = np.random.default_rng(0)
    field = sitk.GetImageFromArray(rng.normal(size=(6, 7, 8, 3)).astype(np.float32), isVector=True)
    field.SetSpacing((1.5, 2.0, 2.5))
    field.SetOrigin((-3.0, 4.0, 5.0))
    path = write_stored_gzip(field, tmp_path / "displacement.nii.gz")
    back = sitk.ReadImage(str(path))
    assert back.GetSpacing() == field.GetSpacing() and back.GetOrigin() == field.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(field))
    with gzip.open(path) as f:  # a gzip, its bytes stored: no smaller than the raw field
        assert len(f.read()) <= path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["displacement.nii.gz"]
