"""Cohorts on Dask: every subject's folder holds what register.py writes for that pair alone, a bad
subject is named and the others complete, and a rerun resumes instead of starting again."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import synthetic
from gvsl.cohort import Subject, subjects_from
from gvsl.volumes import DataError

ROOT = Path(__file__).resolve().parents[1] / "GVSLTrainer"
OPTIONS = ["--mode", "rigid", "--iterations", "20", "--spacing", "4"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """An atlas (the MNI T1 at 4 mm) and three subjects: known rigid motions of it, one file corrupt."""
    folder = tmp_path_factory.mktemp("cohort")
    t1 = synthetic.mni("t1")
    atlas = sitk.Resample(t1, [int(round(n / 4)) for n in t1.GetSize()], sitk.Transform(), sitk.sitkLinear,
                          t1.GetOrigin(), [4.0] * 3, t1.GetDirection(), 0.0)
    sitk.WriteImage(atlas, str(folder / "atlas.nii.gz"))
    scans = folder / "scans"
    scans.mkdir()
    centre = atlas.TransformContinuousIndexToPhysicalPoint(((np.array(atlas.GetSize()) - 1) / 2).tolist())
    for i, name in enumerate(("sub-01", "sub-02")):
        motion = sitk.Euler3DTransform(centre, *np.radians([4.0 * (i + 1), -3.0, 2.0]), (3.0 * (i + 1), -2.0, 4.0))
        sitk.WriteImage(synthetic.moved_in_space(atlas, motion), str(scans / f"{name}.nii.gz"))
    (scans / "sub-03.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    return folder


def test_the_subjects_of_a_folder_and_of_a_csv(cohort, tmp_path):
    found = subjects_from(cohort / "scans")
    assert [s.name for s in found] == ["sub-01", "sub-02", "sub-03"]
    table = tmp_path / "subjects.csv"
    table.write_text("subject,moving,fixed_mask\nA,scans/a.nii.gz,masks/a.nii.gz\n")
    (subject,) = subjects_from(table)
    assert subject.moving == tmp_path / "scans/a.nii.gz" and subject.files == {"fixed_mask": tmp_path / "masks/a.nii.gz"}
    argv = subject.argv("atlas.nii.gz", tmp_path / "out")
    assert argv == ["--moving", str(tmp_path / "scans/a.nii.gz"), "--output-dir", str(tmp_path / "out" / "A"),
                    "--fixed", "atlas.nii.gz", "--fixed-mask", str(tmp_path / "masks/a.nii.gz")]


@pytest.mark.parametrize("text, problem", [
    ("subject,image\nA,a.nii.gz\n", "column(s) moving are missing"),
    ("subject,moving,colour\nA,a.nii.gz,red\n", "unknown column(s) colour"),
    ("subject,moving\nA,a.nii.gz\nA,b.nii.gz\n", "appears twice"),
    ("subject,moving\n", "no subjects"),
])
def test_a_bad_csv_is_named_with_its_problem(tmp_path, text, problem):
    table = tmp_path / "subjects.csv"
    table.write_text(text)
    with pytest.raises(DataError, match=str(table).replace("\\", "\\\\")) as caught:
        subjects_from(table)
    assert problem in str(caught.value)


def test_a_subject_without_a_fixed_image_is_refused(tmp_path):
    with pytest.raises(DataError, match="subject A: no fixed image"):
        Subject("A", tmp_path / "a.nii.gz").argv(None, tmp_path)


def test_a_cohort_registers_like_register_py_names_the_bad_subject_and_resumes(cohort, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "cohort.py"), "register", "--fixed", str(cohort / "atlas.nii.gz"),
               "--moving", str(cohort / "scans"), "--output-dir", str(out), "--workers", "2",
               "--threads-per-worker", "1", "--no-progress", *OPTIONS]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stderr  # one subject failed, the others are complete
    assert "sub-03" in first.stderr and "sub-03.nii.gz" in first.stderr
    rows = {r["subject"]: r for r in csv.DictReader((out / "cohort.csv").open())}
    assert [rows[s]["status"] for s in ("sub-01", "sub-02", "sub-03")] == ["done", "done", "failed"]
    assert not (out / "sub-03").exists() or not any((out / "sub-03").iterdir())  # nothing half-written

    alone = tmp_path / "alone"
    single = subprocess.run([sys.executable, str(ROOT / "register.py"), "--fixed", str(cohort / "atlas.nii.gz"),
                             "--moving", str(cohort / "scans" / "sub-02.nii.gz"), "--output-dir", str(alone),
                             "--no-progress", *OPTIONS], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    assert sorted(p.name for p in (out / "sub-02").iterdir()) == sorted(p.name for p in alone.iterdir())
    ours, theirs = (sitk.ReadTransform(str(d / "affine.tfm")) for d in (out / "sub-02", alone))
    assert np.allclose(ours.GetParameters(), theirs.GetParameters(), atol=1e-3)

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    rows = {r["subject"]: r for r in csv.DictReader((out / "cohort.csv").open())}
    assert [rows[s]["status"] for s in ("sub-01", "sub-02")] == ["done earlier", "done earlier"]
    assert rows["sub-03"]["status"] == "failed" and again.returncode == 1


def test_a_running_scheduler_is_joined(cohort, tmp_path):
    """``scheduler``: the address of a Dask cluster started elsewhere (here, by the test)."""
    from dask.distributed import LocalCluster

    from gvsl.cohort import register_cohort

    table = tmp_path / "subjects.csv"
    table.write_text(f"subject,moving,fixed\none,{cohort / 'scans' / 'sub-01.nii.gz'},{cohort / 'atlas.nii.gz'}\n")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        rows = register_cohort(None, table, tmp_path / "out", OPTIONS, scheduler=cluster.scheduler_address,
                               progress=False)
    assert [(r["subject"], r["status"]) for r in rows] == [("one", "done")]
    assert (tmp_path / "out" / "one" / "transform.h5").is_file()
