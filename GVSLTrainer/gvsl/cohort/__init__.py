"""Cohorts: one registration or segmentation per subject, on Dask workers that import torch once each.

Each subject's folder holds what ``register.py`` or ``segment.py`` writes for it, because a worker
runs that script's own job (in process, its options checked by its own parser). The engine is Dask
distributed: an embedded ``LocalCluster`` by default, or a running scheduler (``scheduler``: its
address). A subject that fails is reported with its error and the others go on; a subject whose
folder already holds every output, made from the same files and options, is not run again, so a
cohort resumes and redoes what changed.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from ..volumes import DataError
from .engine import SUMMARY, local_cluster_size, run_cohort  # noqa: F401
from .subjects import REGISTER_ROLES, Subject, subjects_from  # noqa: F401
from .report import REPORT, cohort_report  # noqa: F401
from .worker import registration_figures, same_inputs

SEGMENT_FORMATS = ("nii.gz", "seg.nrrd", "nrrd", "mha")


def registration_done(folder: Path) -> bool:
    """Whether ``folder`` holds every output a registration writes (outputs appear only when complete)."""
    from ..registration_io import FILES

    return all((folder / FILES[name]).is_file() for name in ("warped", "transform", "inverse", "affine", "metrics",
                                                             "report"))


def register_cohort(fixed: str | Path | None, moving: str | Path | Sequence[Subject], output_dir: str | Path,
                    options: Sequence[str] = (), **engine) -> list[dict]:
    """Register every subject of ``moving`` (a folder, a CSV, or ``Subject``s) onto ``fixed`` (or each
    subject's own), with ``register.py``'s ``options`` (e.g. ``["--mode", "rigid"]``), into
    ``output_dir/<subject>/``; writes ``output_dir/cohort.csv`` (outliers named) and ``cohort_report.png``
    (onto the atlas: ``fixed``, or the subjects' most common one) and returns its rows. ``engine``:
    ``scheduler``, ``client``, ``workers``, ``threads_per_worker``, ``progress`` (``run_cohort``)."""
    out = Path(output_dir)
    subjects = list(moving) if not isinstance(moving, (str, Path)) else subjects_from(moving)
    jobs = []
    for s in subjects:
        if fixed is None and "fixed" not in s.files:
            raise DataError(f"subject {s.name}: no fixed image (give --fixed, or a 'fixed' column)")
        jobs.append((s.name, ["--moving", str(s.image), "--output-dir", str(out / s.name),
                              *s.options(fixed=fixed), *options]))
    done = {name: registration_figures(out / name / "metrics.json") for name, argv in jobs
            if registration_done(out / name) and same_inputs(out / name, argv)}
    rows = run_cohort("register", jobs, out, done, **engine)
    atlases = Counter(str(fixed or s.files["fixed"]) for s in subjects)
    cohort_report(atlases.most_common(1)[0][0], out, rows, {r["subject"]: r["outlier"] for r in rows if r.get("outlier")})
    return rows


def segment_cohort(model: str | Path, inputs: str | Path | Sequence[Subject], output_dir: str | Path,
                   options: Sequence[str] = (), *, output_format: str = "nii.gz", probabilities: bool = False,
                   classes: bool = False, **engine) -> list[dict]:
    """Segment every subject of ``inputs`` (a folder, list file, CSV with ``subject`` and ``input``, or
    ``Subject``s) with ``model``, with ``segment.py``'s ``options`` (e.g. ``["--overlap", "0.25"]``), into
    ``output_dir/<subject>/labels.<output_format>`` (with ``probabilities/`` and ``classes.json`` on
    request); writes ``output_dir/cohort.csv`` and returns its rows. ``engine``: see ``register_cohort``."""
    if output_format not in SEGMENT_FORMATS:
        raise DataError(f"output format must be one of {', '.join(SEGMENT_FORMATS)}, got {output_format!r}")
    out = Path(output_dir)
    subjects = list(inputs) if not isinstance(inputs, (str, Path)) else subjects_from(inputs, "input", ())
    jobs, done = [], {}
    for s in subjects:
        folder = out / s.name
        argv = ["--model", str(model), "--input", str(s.image), "--output", str(folder / f"labels.{output_format}")]
        argv += ["--probabilities", str(folder / "probabilities")] if probabilities else []
        argv += ["--classes", str(folder / "classes.json")] if classes else []
        jobs.append((s.name, [*argv, *options]))
        wanted = [folder / f"labels.{output_format}"] + ([folder / "classes.json"] if classes else [])
        if (all(p.is_file() for p in wanted) and (not probabilities or (folder / "probabilities").is_dir())
                and same_inputs(folder, jobs[-1][1])):
            done[s.name] = {}
    return run_cohort("segment", jobs, out, done, **engine)
