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
from conftest import untrained_segmentation_model
from gvsl.cohort import Subject, register_cohort, segment_cohort, subjects_from
from gvsl.volumes import DataError

ROOT = Path(__file__).resolve().parents[1] / "GVSLTrainer"
OPTIONS = ["--mode", "rigid", "--iterations", "20", "--spacing", "4"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """An atlas (the MNI T1 at 4 mm) and three subjects: known rigid motions of it, one file corrupt."""
    folder = tmp_path_factory.mktemp("cohort")
    atlas = synthetic.mni_at(4.0)
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
    assert subject.image == tmp_path / "scans/a.nii.gz" and subject.files == {"fixed_mask": tmp_path / "masks/a.nii.gz"}
    assert subject.options(fixed="atlas.nii.gz", fixed_mask="other.nii.gz") == [
        "--fixed", "atlas.nii.gz", "--fixed-mask", str(tmp_path / "masks/a.nii.gz")]  # its own file wins


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


def test_outliers_are_subjects_far_from_the_cohort_on_the_worse_side():
    from gvsl.cohort.quality import outliers

    rows = [{"subject": f"s{i}", "status": "done", "local_ncc_after": 0.30 + 0.01 * (i % 3), "folding_percent": 0.0,
             "inverse_consistency_mm": 0.2, "dice_mean": ""} for i in range(9)]
    rows[4]["local_ncc_after"] = 0.12  # a failed alignment
    rows[6]["local_ncc_after"] = 0.45  # better than the rest: not an outlier
    rows[7]["folding_percent"] = 2.5
    rows[8]["folding_percent"] = 0.05  # folding, but under the floor
    rows.append({"subject": "bad", "status": "failed", "local_ncc_after": ""})
    found = outliers(rows)
    assert sorted(found) == ["s4", "s7"]
    assert found["s4"].startswith("local NCC after 0.12 (robust z -") and "folding % 2.5" in found["s7"]
    assert outliers(rows[:4]) == {}  # too few subjects to judge


def test_a_subject_without_a_fixed_image_is_refused(tmp_path):
    with pytest.raises(DataError, match="subject A: no fixed image"):
        register_cohort(None, [Subject("A", tmp_path / "a.nii.gz")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


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
    assert f"quality at a glance: {out / 'cohort_report.png'}" in first.stdout
    report = sitk.ReadImage(str(out / "cohort_report.png"))
    assert report.GetSize()[0] > 1000 and float(rows["sub-01"]["local_ncc_after"]) > float(rows["sub-01"]["before"])

    alone = tmp_path / "alone"
    single = subprocess.run([sys.executable, str(ROOT / "register.py"), "--fixed", str(cohort / "atlas.nii.gz"),
                             "--moving", str(cohort / "scans" / "sub-02.nii.gz"), "--output-dir", str(alone),
                             "--no-progress", *OPTIONS], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    ours = sorted(p.name for p in (out / "sub-02").iterdir())
    assert [n for n in ours if not n.startswith(".")] == sorted(p.name for p in alone.iterdir())
    assert [n for n in ours if n.startswith(".")] == [".gvsl_cohort_inputs"]  # what a rerun compares
    ours, theirs = (sitk.ReadTransform(str(d / "affine.tfm")) for d in (out / "sub-02", alone))
    assert np.allclose(ours.GetParameters(), theirs.GetParameters(), atol=1e-3)

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    rows = {r["subject"]: r for r in csv.DictReader((out / "cohort.csv").open())}
    assert [rows[s]["status"] for s in ("sub-01", "sub-02")] == ["done earlier", "done earlier"]
    assert rows["sub-03"]["status"] == "failed" and again.returncode == 1


def test_a_running_scheduler_is_joined(cohort, tmp_path):
    """``scheduler``: the address of a Dask cluster started elsewhere (here, by the test)."""
    from dask.distributed import LocalCluster

    table = tmp_path / "subjects.csv"
    table.write_text(f"subject,moving,fixed\none,{cohort / 'scans' / 'sub-01.nii.gz'},{cohort / 'atlas.nii.gz'}\n")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        rows = register_cohort(None, table, tmp_path / "out", OPTIONS, scheduler=cluster.scheduler_address,
                               progress=False)
    assert [(r["subject"], r["status"]) for r in rows] == [("one", "done")]
    assert (tmp_path / "out" / "one" / "transform.h5").is_file()


def test_a_cohort_is_segmented_like_segment_py(cohort, tmp_path):
    """The model is loaded by each worker; each subject's folder holds what segment.py writes."""
    model = untrained_segmentation_model(tmp_path / "seg.pt", spacing=4.0)
    from dask.distributed import Client, LocalCluster

    from gvsl.segmentation import _load_segmenter

    table = tmp_path / "inputs.csv"
    scans = cohort / "scans"
    table.write_text(f"subject,input\nA,{scans / 'sub-01.nii.gz'}\nB,{scans / 'sub-03.nii.gz'}\n"
                     f"C,{scans / 'sub-02.nii.gz'}\n")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        rows = segment_cohort(model, table, tmp_path / "out", ["--overlap", "0.25"], classes=True, client=client,
                              progress=False)
        loads = client.run(lambda: _load_segmenter.cache_info())
    assert [(r["subject"], r["status"]) for r in rows] == [("A", "done"), ("B", "failed"), ("C", "done")]
    assert "sub-03.nii.gz" in rows[1]["error"]
    (info,) = loads.values()
    assert info.misses == 1 and info.hits >= 1  # the worker read and built the model once
    alone = tmp_path / "alone.nii.gz"
    single = subprocess.run([sys.executable, str(ROOT / "segment.py"), "--model", str(model), "--input",
                             str(cohort / "scans" / "sub-01.nii.gz"), "--output", str(alone), "--overlap", "0.25",
                             "--no-progress"], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    ours, theirs = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (tmp_path / "out" / "A" / "labels.nii.gz", alone))
    assert np.array_equal(ours, theirs)
    assert (tmp_path / "out" / "A" / "classes.json").is_file()
    again = segment_cohort(model, table, tmp_path / "out", ["--overlap", "0.25"], classes=True, workers=1,
                           progress=False)
    assert [r["status"] for r in again] == ["done earlier", "failed", "done earlier"]
    import os

    os.utime(scans / "sub-01.nii.gz")  # A's input rewritten: A is redone, C is not
    changed = segment_cohort(model, table, tmp_path / "out", ["--overlap", "0.25"], classes=True, workers=1,
                             progress=False)
    assert [r["status"] for r in changed] == ["done", "failed", "done earlier"]
    options = segment_cohort(model, table, tmp_path / "out", ["--overlap", "0.5"], classes=True, workers=1,
                             progress=False)
    assert [r["status"] for r in options] == ["done", "failed", "done"]  # other options: every subject redone


FAKE_SBATCH = """#!/bin/bash
# A stand-in for SLURM's sbatch on this machine: runs the job script at once, in the background.
cp "$1" "$FAKE_QUEUE/job.sh"
setsid bash "$FAKE_QUEUE/job.sh" > "$FAKE_QUEUE/job.log" 2>&1 < /dev/null &
echo $! > "$FAKE_QUEUE/job.pid"
echo "Submitted batch job 4242"
"""
FAKE_SCANCEL = """#!/bin/bash
kill -TERM -- -"$(cat "$FAKE_QUEUE/job.pid")" 2>/dev/null
echo "$@" > "$FAKE_QUEUE/cancelled"
"""


def test_workers_started_as_slurm_jobs_print_their_job_script(cohort, tmp_path):
    """--cluster slurm through dask-jobqueue, against stand-ins for sbatch and scancel that run the
    submitted script here: the script is printed, its workers register the subjects, the job is cancelled."""
    pytest.importorskip("dask_jobqueue")
    import os
    import stat

    bin_dir, queue = tmp_path / "bin", tmp_path / "queue"
    bin_dir.mkdir()
    queue.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_QUEUE=str(queue))
    table = tmp_path / "subjects.csv"
    table.write_text(f"subject,moving\none,{cohort / 'scans' / 'sub-01.nii.gz'}\ntwo,{cohort / 'scans' / 'sub-02.nii.gz'}\n")
    done = subprocess.run([sys.executable, str(ROOT / "cohort.py"), "register", "--fixed", str(cohort / "atlas.nii.gz"),
                           "--moving", str(table), "--output-dir", str(tmp_path / "out"), "--cluster", "slurm",
                           "--cores", "2", "--memory", "3GB", "--walltime", "00:20:00", "--no-progress", *OPTIONS],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (done.stderr, (queue / "job.log").read_text() if (queue / "job.log").exists() else "")
    assert "Submitting 1 job(s) of this script:" in done.stderr and "#SBATCH -t 00:20:00" in done.stderr
    assert "--nworkers 2" in (queue / "job.sh").read_text()  # one single-threaded worker per core
    rows = list(csv.DictReader((tmp_path / "out" / "cohort.csv").open()))
    assert [(r["subject"], r["status"]) for r in rows] == [("one", "done"), ("two", "done")]
    assert (queue / "cancelled").read_text().split() == ["4242"]


def test_a_subject_whose_worker_dies_is_named_and_the_summary_written(cohort, tmp_path):
    """A worker killed for its memory (the nanny's limit, far below a registration's) loses its subject:
    that subject fails with the reason, and cohort.csv is still written."""
    import dask
    from dask.distributed import Client, LocalCluster

    table = tmp_path / "subjects.csv"
    table.write_text(f"subject,moving,fixed\none,{cohort / 'scans' / 'sub-01.nii.gz'},{cohort / 'atlas.nii.gz'}\n")
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                         memory_limit="150MB") as cluster, Client(cluster) as client:
        rows = register_cohort(None, table, tmp_path / "out", OPTIONS, client=client, progress=False)
    assert [(r["subject"], r["status"]) for r in rows] == [("one", "failed")]
    assert "its worker was lost" in rows[0]["error"], rows[0]["error"]
    assert list(csv.DictReader((tmp_path / "out" / "cohort.csv").open()))[0]["status"] == "failed"


def test_a_real_scheduler_and_workers_survive_a_killed_worker(cohort, tmp_path):
    """`dask scheduler` and two `dask worker` processes started apart; one worker is killed once the first
    subject is done: every subject still completes, once, with the result register.py gives."""
    import json
    import os
    import signal
    import time

    scheduler_file = tmp_path / "scheduler.json"
    started = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file",
                                 str(scheduler_file), "--no-dashboard", "--host", "127.0.0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for name in ("w1", "w2"):
            started.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--name",
                                             name, "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        scans = cohort / "scans"
        table = tmp_path / "subjects.csv"
        table.write_text("subject,moving\n" + "".join(f"s{i},{scans / f'sub-0{1 + i % 2}.nii.gz'}\n" for i in range(4)))
        out = tmp_path / "out"
        run = subprocess.Popen([sys.executable, str(ROOT / "cohort.py"), "register", "--fixed",
                                str(cohort / "atlas.nii.gz"), "--moving", str(table), "--output-dir", str(out),
                                "--scheduler", address, "--no-progress", *OPTIONS],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not (out / "cohort.csv").exists() and run.poll() is None and time.time() < deadline + 300:
            time.sleep(0.1)
        os.kill(started[1].pid, signal.SIGKILL)  # worker w1, mid-run
        _, stderr = run.communicate(timeout=600)
    finally:
        for process in started:
            process.kill()
            process.wait()
    assert run.returncode == 0, stderr
    rows = list(csv.DictReader((out / "cohort.csv").open()))
    assert sorted(r["subject"] for r in rows) == ["s0", "s1", "s2", "s3"]  # each once
    assert all(r["status"] == "done" for r in rows), rows
    alone = tmp_path / "alone"
    single = subprocess.run([sys.executable, str(ROOT / "register.py"), "--fixed", str(cohort / "atlas.nii.gz"),
                             "--moving", str(scans / "sub-01.nii.gz"), "--output-dir", str(alone), "--no-progress",
                             *OPTIONS], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    for subject in ("s0", "s2"):
        ours, theirs = (sitk.ReadTransform(str(d / "affine.tfm")) for d in (out / subject, alone))
        assert np.allclose(ours.GetParameters(), theirs.GetParameters(), atol=1e-3)


def test_sigterm_stops_the_cohort_cleanly_and_a_rerun_finishes_it(cohort, tmp_path):
    """A batch scheduler's SIGTERM mid-cohort: the command ends with 130, the subjects finished stay
    complete and listed, nothing half-written is left, no worker outlives it, and a rerun does the rest."""
    import signal
    import time

    import psutil

    scans = cohort / "scans"
    table = tmp_path / "subjects.csv"
    table.write_text("subject,moving\n" + "".join(f"s{i},{scans / f'sub-0{1 + i % 2}.nii.gz'}\n" for i in range(6)))
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "cohort.py"), "register", "--fixed", str(cohort / "atlas.nii.gz"),
               "--moving", str(table), "--output-dir", str(out), "--workers", "1", "--no-progress", *OPTIONS]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = []
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        children = children or psutil.Process(process.pid).children(recursive=True)
        summary = out / "cohort.csv"
        if summary.is_file() and any(r["status"] == "done" for r in csv.DictReader(summary.open())):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted: the subjects already done are complete" in stderr
    _, alive = psutil.wait_procs(children, timeout=10)
    assert children and not [(c.pid, c.cmdline()) for c in alive if c.status() != psutil.STATUS_ZOMBIE]
    rows = list(csv.DictReader((out / "cohort.csv").open()))
    finished = [r["subject"] for r in rows if r["status"] == "done"]
    assert 1 <= len(finished) < 6
    assert not [p.name for p in out.iterdir() if ".partial" in p.name]
    from gvsl.cohort import registration_done

    folders = [p for p in out.iterdir() if p.is_dir()]  # a subject finished as the signal came may be there too
    assert set(finished) <= {p.name for p in folders} and all(registration_done(p) for p in folders)

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    rows = {r["subject"]: r["status"] for r in csv.DictReader((out / "cohort.csv").open())}
    assert all(rows[name] == "done earlier" for name in finished) and len(rows) == 6


def test_a_worker_reads_and_prepares_the_atlas_once_and_the_results_do_not_change(cohort, tmp_path, monkeypatch):
    """``run_subject`` keeps what depends only on the fixed image (``gvsl.registration.kept``): the atlas
    is read once for two subjects, again once its file changes, and each subject's result is the
    one it gets with nothing kept."""
    import os

    from gvsl.cohort.worker import load_script, run_subject
    from gvsl.registration import inputs, kept

    reads = []
    original = inputs.read_volume
    monkeypatch.setattr(inputs, "read_volume", lambda path: reads.append(Path(path).name) or original(path))
    atlas = tmp_path / "atlas.nii.gz"
    atlas.write_bytes((cohort / "atlas.nii.gz").read_bytes())

    def argv(name, out):
        return ["--fixed", str(atlas), "--moving", str(cohort / "scans" / f"{name}.nii.gz"), "--output-dir",
                str(tmp_path / out / name), *OPTIONS]

    try:
        for name in ("sub-01", "sub-02"):
            assert run_subject("register", name, argv(name, "kept"), 1)["status"] == "done"
        assert reads == ["atlas.nii.gz", "sub-01.nii.gz", "sub-02.nii.gz"]
        os.utime(atlas, ns=(0, 0))  # the atlas rewritten: read again
        assert run_subject("register", "sub-01", argv("sub-01", "again"), 1)["status"] == "done"
        assert reads[3:] == ["atlas.nii.gz", "sub-01.nii.gz"]
    finally:
        kept.keep_fixed(False)
    script = load_script("register")
    for name in ("sub-01", "sub-02"):
        script.job(script.parse([*argv(name, "fresh"), "--no-progress"]))
        ours, theirs = (sitk.ReadTransform(str(tmp_path / d / name / "affine.tfm")).GetParameters()
                        for d in ("kept", "fresh"))
        assert ours == theirs


def test_a_batch_registers_each_subject_as_it_is_registered_alone(cohort, tmp_path, monkeypatch):
    """``worker.register_batch`` (a GPU worker's task): the deformable stages of the subjects optimised as
    one batch, each subject's files those of its registration alone; the corrupt subject fails alone."""
    from gvsl.cohort.worker import register_batch, run_subject
    from gvsl.registration import deformable, kept

    sizes = []
    optimise = deformable.optimise
    monkeypatch.setattr(deformable, "optimise", lambda pyramids, *a: sizes.append(len(pyramids)) or optimise(pyramids, *a))

    options = ["--iterations", "30", "--spacing", "4"]  # deformable

    def argv(name, out):
        return ["--fixed", str(cohort / "atlas.nii.gz"), "--moving", str(cohort / "scans" / f"{name}.nii.gz"),
                "--output-dir", str(tmp_path / out / name), *options]

    names = ("sub-01", "sub-03", "sub-02")
    try:
        rows = register_batch([(name, argv(name, "batch")) for name in names], 1, 3, True)  # figures by helpers
        alone = [run_subject("register", name, argv(name, "alone"), 1) for name in ("sub-01", "sub-02")]
    finally:
        kept.keep_fixed(False)
    assert [(r["subject"], r["status"]) for r in rows] == [("sub-01", "done"), ("sub-03", "failed"), ("sub-02", "done")]
    assert sizes == [2, 1, 1]  # one batch of two, then each alone
    assert "sub-03.nii.gz" in rows[1]["error"] and not (tmp_path / "batch" / "sub-03").exists()
    assert [r["status"] for r in alone] == ["done", "done"]
    for name in ("sub-01", "sub-02"):
        batch, single = (tmp_path / d / name for d in ("batch", "alone"))
        assert sorted(p.name for p in batch.iterdir()) == sorted(p.name for p in single.iterdir())
        fields = [sitk.GetArrayFromImage(sitk.ReadImage(str(d / "displacement.nii.gz"))) for d in (batch, single)]
        assert np.abs(fields[0]).max() > 0.1  # a field was optimised
        # mm, against 4 mm voxels: batched matrix products may sum in another order (0.04 mm seen on 2 threads)
        assert np.abs(fields[0] - fields[1]).max() < 0.1
        affines = [sitk.ReadTransform(str(d / "affine.tfm")).GetParameters() for d in (batch, single)]
        assert np.allclose(affines[0], affines[1], atol=1e-6)


def test_gpu_workers_get_batches_that_keep_every_gpu_busy(monkeypatch):
    from gvsl.cohort.engine import batches, gpu_count, local_cluster_size

    assert [len(b) for b in batches(list(range(10)), 8, 2)] == [5, 5]
    assert [len(b) for b in batches(list(range(20)), 8, 1)] == [8, 8, 4]
    assert [len(b) for b in batches(list(range(3)), 1, 2)] == [1, 1, 1]
    for visible, count in (("0,1", 2), ("", 0), ("-1", 0), ("GPU-5f3a", 1)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert gpu_count() == count
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert local_cluster_size(None, None) == (2, 8)  # one worker per GPU, the cores shared


def test_the_atlas_features_are_computed_once_for_a_cohort_and_change_nothing(cohort, monkeypatch):
    """With keeping on (a worker), the atlas's side of the similarity (its levels, local-NCC moments)
    is computed for the first subject only; each result is the one it gets with nothing kept."""
    from gvsl import similarity
    from gvsl.registration import RegistrationOptions, kept, register

    atlas = sitk.ReadImage(str(cohort / "atlas.nii.gz"))
    subjects = [sitk.ReadImage(str(cohort / "scans" / f"{n}.nii.gz")) for n in ("sub-01", "sub-02")]
    options = RegistrationOptions(iterations=30, spacing=4.0)
    fresh = [register(atlas, s, options=options) for s in subjects]
    calls = []
    original = similarity.local_moments
    monkeypatch.setattr(similarity, "local_moments", lambda *a: calls.append(1) or original(*a))
    kept.keep_fixed(True)
    try:
        first = register(atlas, subjects[0], options=options)
        computed = len(calls)
        second = register(atlas, subjects[1], options=options)
    finally:
        kept.keep_fixed(False)
    # the second subject: only the quality figures' own (their NCC on the whole grid), none of the levels'
    assert computed >= 3 and len(calls) - computed == 1
    for alone, ours in zip(fresh, (first, second)):
        assert np.array_equal(sitk.GetArrayFromImage(alone.displacement), sitk.GetArrayFromImage(ours.displacement))
        assert alone.affine.GetParameters() == ours.affine.GetParameters()


def test_a_batch_that_runs_out_of_memory_goes_one_pair_at_a_time_and_a_failing_batch_fails_its_pairs_only(
        cohort, monkeypatch):
    import torch

    from gvsl.registration import RegistrationOptions, deformable, prepare
    from gvsl.registration.pipeline import register_batch, stages

    atlas = sitk.ReadImage(str(cohort / "atlas.nii.gz"))
    moving = [sitk.ReadImage(str(cohort / "scans" / f"{n}.nii.gz")) for n in ("sub-01", "sub-02")]
    deform, rigid = RegistrationOptions(iterations=20, spacing=4.0), RegistrationOptions(mode="rigid", spacing=4.0,
                                                                                         iterations=20)
    optimise, sizes = deformable.optimise, []

    def short_of_memory(pyramids, *args):
        sizes.append(len(pyramids))
        if len(pyramids) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return optimise(pyramids, *args)

    monkeypatch.setattr(deformable, "optimise", short_of_memory)
    results = register_batch([stages(prepare(atlas, m, options=deform)) for m in moving], 2)
    assert sizes == [2, 1, 1] and all(r.displacement is not None for r in results)

    def broken(pyramids, *args):
        raise RuntimeError("the device fell over (simulated)")

    monkeypatch.setattr(deformable, "optimise", broken)
    results = register_batch([stages(prepare(atlas, moving[0], options=deform)),
                              stages(prepare(atlas, moving[1], options=rigid))], 2)
    assert isinstance(results[0], RuntimeError) and "fell over" in str(results[0])
    assert results[1].displacement is None and results[1].metrics["mode"] == "rigid"  # not in the batch: finished
