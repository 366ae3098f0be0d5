"""Cohorts: one registration per subject, run on Dask workers that import torch once each.

Each subject's folder holds what ``register.py`` writes for that pair, because a worker runs
``register.py``'s own job on it (in process, its options checked by its own parser). The engine is
Dask distributed: an embedded ``LocalCluster`` by default, or a running scheduler (``scheduler``:
its address). A subject that fails is reported with its error and the others go on; a subject
whose folder already holds every output is not registered again, so a cohort resumes.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import importlib.util
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .discovery import discover, resolve
from .volumes import DataError

ROLES = ("fixed", "moving_labels", "fixed_labels", "moving_mask", "fixed_mask", "moving_landmarks", "fixed_landmarks")
SUMMARY = "cohort.csv"  # one row per subject, next to the subjects' folders


@dataclass
class Subject:
    name: str
    moving: Path
    files: dict[str, Path] = field(default_factory=dict)  # ROLES given for this subject alone

    def argv(self, fixed: str | Path | None, output_dir: Path) -> list[str]:
        """``register.py``'s arguments for this subject: its own files, then the cohort's fixed image."""
        given = {"fixed": fixed, **self.files}
        if given["fixed"] is None:
            raise DataError(f"subject {self.name}: no fixed image (give --fixed, or a 'fixed' column)")
        out = ["--moving", str(self.moving), "--output-dir", str(output_dir / self.name)]
        for role, path in given.items():
            out += [f"--{role.replace('_', '-')}", str(path)]
        return out


def subjects_from(source: str | Path) -> list[Subject]:
    """Subjects from a CSV (columns ``subject``, ``moving`` and optionally ROLES; relative paths are
    relative to the CSV) or from a folder of images (searched as pre-training searches; each image
    is a subject named after its file)."""
    source = Path(source)
    if source.suffix.lower() == ".csv" and source.is_file():
        return _from_csv(source)
    paths = discover(source)
    names = [_stem(p) for p in paths]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # one folder per subject: two images of one name would write into one folder
        names = [str(p.relative_to(source)).replace(os.sep, "_") for p in paths] if source.is_dir() else names
        names = [_stem(Path(n)) for n in names]
    return [Subject(n, p) for n, p in zip(names, paths)]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd", ".gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _from_csv(path: Path) -> list[Subject]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise DataError(f"{path}: no subjects (a header row with 'subject' and 'moving', then one row per subject)")
    columns = set(rows[0])
    missing = {"subject", "moving"} - columns
    if missing:
        raise DataError(f"{path}: the column(s) {', '.join(sorted(missing))} are missing (it has: "
                        f"{', '.join(sorted(c for c in columns if c))})")
    unknown = columns - {"subject", "moving", *ROLES}
    if unknown:
        raise DataError(f"{path}: unknown column(s) {', '.join(sorted(unknown))}; the known ones are subject, "
                        f"moving, {', '.join(ROLES)}")
    subjects, seen = [], set()
    for line, row in enumerate(rows, start=2):
        name, moving = (row["subject"] or "").strip(), (row["moving"] or "").strip()
        if not name or not moving:
            raise DataError(f"{path}, line {line}: 'subject' and 'moving' must both be given")
        if name in seen:
            raise DataError(f"{path}, line {line}: subject {name!r} appears twice (each has its own folder)")
        if os.sep in name or name in (".", ".."):
            raise DataError(f"{path}, line {line}: subject {name!r} cannot name a folder")
        seen.add(name)
        files = {role: resolve(path.parent, row[role].strip()) for role in ROLES if (row.get(role) or "").strip()}
        subjects.append(Subject(name, resolve(path.parent, moving), files))
    return subjects


def _register_script():
    """``register.py`` as a module, loaded once per worker process (it sits beside the package)."""
    module = sys.modules.get("gvsl_register_script")
    if module is None:
        script = Path(__file__).resolve().parents[1] / "register.py"
        spec = importlib.util.spec_from_file_location("gvsl_register_script", script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def keep_freed_memory() -> None:
    """Undo, in this process, what Dask's ``MALLOC_TRIM_THRESHOLD_=65536`` does to glibc: it also pins
    the mmap threshold at 128 KiB, so every large temporary of a registration was mapped and faulted in
    again at each step (a worker's registrations ran 1.6-1.8x slower than register.py's). These are the
    thresholds a plain process's malloc grows to by itself. Any worker, however started."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): no such setting
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 64 << 20)


_spare_helper: list = []  # this worker's next figure helper, started while it waits for its next subject


@contextlib.contextmanager
def _figure_helper():
    """register.py's figure helper (``ReportProcess``) for one subject, and a fresh one started for the
    next: it imports matplotlib while this worker waits, so each figure is drawn beside the
    registration, as register.py draws it, not after it (about 1 s a subject)."""
    from .report_process import ReportProcess

    drawer = _spare_helper.pop() if _spare_helper else ReportProcess.start()
    try:
        with drawer or contextlib.nullcontext():
            yield drawer
    finally:
        spare = ReportProcess.start()
        if spare is not None:
            _spare_helper.append(spare)


def register_subject(name: str, argv: list[str], threads: int) -> dict:
    """One subject on a worker: ``register.py``'s job in this process (torch, once imported, stays
    imported for the next subject). Returns the row of ``cohort.csv``; never raises for a bad subject."""
    import torch

    from .cli import EXPECTED

    torch.set_num_threads(threads)
    keep_freed_memory()
    start = time.perf_counter()
    printed = io.StringIO()
    row = {"subject": name, "status": "done", "seconds": 0.0, "error": "", "warnings": ""}
    try:
        script = _register_script()
        args = script.parse([*argv, "--no-progress"])
        with _figure_helper() as drawer, contextlib.redirect_stdout(printed):
            script.job(args, drawer)
        metrics = Path(args.output_dir) / "metrics.json"
        if metrics.is_file():
            import json

            found = json.loads(metrics.read_text())
            row["warnings"] = " ".join(w["code"] for w in found.get("warnings", []))
            similarity = found.get("similarity", {})
            row.update(similarity=similarity.get("name", ""), before=similarity.get("before", ""),
                       after=similarity.get("after", ""))
    except SystemExit as e:  # the parser refused this subject's arguments
        row.update(status="failed", error=f"invalid arguments (exit {e.code})")
    except EXPECTED as e:
        row.update(status="failed", error=str(e))
    except Exception as e:  # noqa: BLE001 - one subject's surprise must not stop the cohort
        row.update(status="failed", error=f"{type(e).__name__}: {e}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def is_done(folder: Path) -> bool:
    """Whether ``folder`` holds every output a registration writes (outputs appear only when complete)."""
    from .registration_io import FILES

    always = ("warped", "transform", "inverse", "affine", "metrics", "report")
    return all((folder / FILES[name]).is_file() for name in always)


WORKER_MEMORY_GB = 2.0  # a registration's peak: 0.75-0.85 GB for a head at 2 mm, the 160-voxel grid cap more


def local_cluster_size(workers: int | None, threads: int | None) -> tuple[int, int]:
    """(workers, threads per worker) of the embedded cluster: by default one single-threaded worker per
    core, as many as the memory holds at WORKER_MEMORY_GB each. On 2 cores, 2 x 1 registered 13.9
    subjects a minute, 1 x 2 11.0, a loop of register.py processes 9.3 (benchmarks/cohort.py)."""
    cores = os.cpu_count() or 1
    threads = threads or 1
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (AttributeError, ValueError, OSError):  # not POSIX: the cores decide
        memory_gb = float("inf")
    return workers or max(1, min(cores // threads, int(memory_gb // WORKER_MEMORY_GB))), threads


def register_cohort(fixed: str | Path | None, moving: str | Path | Sequence[Subject], output_dir: str | Path,
                    options: Sequence[str] = (), *, scheduler: str | None = None, client=None,
                    workers: int | None = None, threads_per_worker: int | None = None,
                    progress: bool = True) -> list[dict]:
    """Register every subject of ``moving`` (a folder, a CSV, or ``Subject``s) onto ``fixed`` (or each
    subject's own), with ``register.py``'s ``options`` (e.g. ``["--mode", "rigid"]``), into
    ``output_dir/<subject>/``; writes ``output_dir/cohort.csv`` and returns its rows.

    ``client``: a ``dask.distributed.Client`` to use; ``scheduler``: the address of a running one;
    neither: an embedded ``LocalCluster`` (``workers`` x ``threads_per_worker``, see ``local_cluster_size``).
    """
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    out = Path(output_dir)
    subjects = list(moving) if not isinstance(moving, (str, Path)) else subjects_from(moving)
    script = _register_script()
    for subject in subjects:  # every subject's arguments checked before any work
        argv = subject.argv(fixed, out) + list(options)
        try:
            script.parse(argv)
        except SystemExit:
            raise DataError(f"subject {subject.name}: register.py refused the arguments {' '.join(argv)}") from None
    todo = [s for s in subjects if not is_done(out / s.name)]
    rows = [{"subject": s.name, "status": "done earlier", "seconds": 0.0, "error": "", "warnings": ""}
            for s in subjects if s not in todo]
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if client is None:
            if scheduler:
                client = stack.enter_context(Client(scheduler))
                threads = threads_per_worker or 1
            else:
                n, threads = local_cluster_size(workers, threads_per_worker)
                cluster = stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                           dashboard_address=None, silence_logs=40))
                client = stack.enter_context(Client(cluster))
        else:
            threads = threads_per_worker or 1
        futures = [client.submit(register_subject, s.name, s.argv(fixed, out) + list(options), threads,
                                 key=f"gvsl-register-{s.name}-{time.time_ns()}", pure=False) for s in todo]
        with tqdm(total=len(todo), desc="Registering the cohort", unit="subject", disable=not progress) as bar:
            for future in as_completed(futures):
                row = future.result()
                rows.append(row)
                bar.update(1)
                if row["status"] == "failed":
                    bar.write(f"{row['subject']}: failed: {row['error']}")
    order = {s.name: i for i, s in enumerate(subjects)}
    rows.sort(key=lambda r: order[r["subject"]])
    write_summary(rows, out / SUMMARY)
    return rows


def write_summary(rows: list[dict], path: Path) -> None:
    columns = ["subject", "status", "seconds", "similarity", "before", "after", "warnings", "error"]
    temporary = path.with_name(f".{path.name}.partial")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)
