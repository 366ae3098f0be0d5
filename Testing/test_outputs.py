"""Outputs appear whole or not at all, and what a killed process left half-written goes at the next run."""
import subprocess
import sys

import SimpleITK as sitk
import torch

from gvsl.checkpoint import atomic_save
from gvsl.outputs import staged_files, write_image


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
