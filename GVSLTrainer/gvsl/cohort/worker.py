"""What a Dask worker runs for one subject: ``register.py``'s or ``segment.py``'s own job, in process.

The worker imports torch (and loads the scripts) once and keeps them for the next subject.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import io
import json
import os
import sys
import time
from pathlib import Path

TOOLS = ("register", "segment")


def load_script(tool: str):
    """The command module of ``register.py`` or ``segment.py`` (``gvsl.commands.<tool>``)."""
    return importlib.import_module(f"gvsl.commands.{tool}")


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
def _figure_helper(spare_cores: bool):
    """Where the worker has ``spare_cores`` (a GPU worker, or a local cluster with fewer threads than
    cores), register.py's figure helper (``ReportProcess``) for one subject, and a fresh one started for
    the next: it imports matplotlib while this worker waits, so each figure is drawn on a spare core
    beside the registration, as register.py draws it. Elsewhere none (the figure is drawn here): the
    cores are the workers', and a helper per subject paid Python's start and matplotlib's import again
    each time (about 1.3 s of CPU a subject against 0.3-0.8 s for a figure drawn in a worker that has
    matplotlib loaded; 2 workers on 2 cores registered 20 subjects in 77-92 s over two runs, 100 s before)."""
    from ..report_process import ReportProcess

    if not spare_cores:
        yield None
        return
    drawer = _spare_helper.pop() if _spare_helper else ReportProcess.start()
    try:
        with drawer or contextlib.nullcontext():
            yield drawer
    finally:
        spare = ReportProcess.start()
        if spare is not None:
            _spare_helper.append(spare)


def _current_worker():
    """The Dask worker this runs on, or None."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def _choose_gpu(worker) -> None:
    """A GPU worker of a job with several GPUs takes its own, by its index in the job (dask-jobqueue
    names a job's workers <job>-<index>); the scripts' ``cuda`` is then that device."""
    if worker is None or "GPU" not in worker.state.total_resources:
        return
    import torch

    index = str(worker.name).rsplit("-", 1)[-1]
    if torch.cuda.device_count() > 1 and index.isdigit():
        torch.cuda.set_device(int(index) % torch.cuda.device_count())


def _worker(threads: int):
    """This process set up for a cohort's subjects (once per task; cheap after the first): its threads,
    memory thresholds, the kept atlas, its GPU. Returns the Dask worker, or None."""
    import torch

    from ..registration.kept import keep_fixed

    torch.set_num_threads(threads)
    keep_freed_memory()
    keep_fixed()  # the atlas is read and prepared once per worker
    worker = _current_worker()
    _choose_gpu(worker)
    return worker


def _row(name: str, worker) -> dict:
    return {"subject": name, "status": "done", "seconds": 0.0, "error": "", "warnings": "",
            "worker": "" if worker is None else str(worker.name)}


def _failed(row: dict, error: BaseException) -> None:
    """A subject's row, failed with ``error``: one subject's surprise must not stop the cohort."""
    from ..cli import EXPECTED

    if isinstance(error, SystemExit):  # the parser refused this subject's arguments
        row.update(status="failed", error=f"invalid arguments (exit {error.code})")
    elif isinstance(error, EXPECTED):
        row.update(status="failed", error=str(error))
    else:
        row.update(status="failed", error=f"{type(error).__name__}: {error}")


def run_subject(tool: str, name: str, argv: list[str], threads: int, spare_cores: bool = False) -> dict:
    """One subject: ``tool``'s job in this process, quietly. Returns its row of ``cohort.csv``; never raises
    for a bad subject (its error is in the row). ``spare_cores``: see ``_figure_helper``."""
    worker = _worker(threads)
    start = time.perf_counter()
    row = _row(name, worker)
    try:
        script = load_script(tool)
        args = script.parse([*argv, "--no-progress"])
        with contextlib.redirect_stdout(io.StringIO()):
            if tool == "register":
                with _figure_helper(spare_cores) as drawer:
                    script.job(args, drawer)
                row.update(registration_figures(Path(args.output_dir) / "metrics.json"))
                record_inputs(Path(args.output_dir), argv)
            else:
                script.job(args)
                record_inputs(Path(args.output).parent, argv)
    except (SystemExit, Exception) as e:  # noqa: BLE001
        _failed(row, e)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def register_batch(subjects: list[tuple[str, list[str]]], threads: int, batch_size: int,
                   spare_cores: bool = False) -> list[dict]:
    """Several subjects of ``cohort.py register`` (sharing the atlas) at once: each read, prepared and
    aligned linearly in turn, their deformable stages optimised as batches of up to ``batch_size``
    pairs (``deformable.optimise_jobs``, capped by the device's free memory), then each one's files
    written as register.py writes them. Each subject's row as ``run_subject`` gives it, its seconds
    its own stages plus an equal share of the batch's. With ``spare_cores``, each figure is drawn by a
    helper started before the batch (see ``_figure_helper``), while the files are written."""
    from ..report_process import ReportProcess
    from ..registration.inputs import named_error
    from ..registration.options import RegistrationError
    from ..registration.pipeline import register_batch as register_together, stages

    worker = _worker(threads)
    script = load_script("register")
    rows, started = [], []
    for name, argv in subjects:
        start = time.perf_counter()
        row = _row(name, worker)
        rows.append(row)
        try:
            args = script.parse([*argv, "--no-progress"])
            with contextlib.redirect_stdout(io.StringIO()):
                out, prepared, labels, model = script.begin(args)
            started.append((row, argv, args, out, prepared, stages(prepared, model=model, **labels)))
        except (SystemExit, Exception) as e:  # noqa: BLE001
            _failed(row, e)
        row["seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    drawers = [ReportProcess.start() if spare_cores else None for _ in started]  # matplotlib loads meanwhile
    results = register_together([run for *_, run in started], batch_size)
    share = (time.perf_counter() - start) / max(1, len(started))
    for (row, argv, args, out, prepared, _), result, drawer in zip(started, results, drawers):
        start = time.perf_counter()
        try:
            if isinstance(result, BaseException):
                raise named_error(args, result) if isinstance(result, RegistrationError) else result
            with contextlib.redirect_stdout(io.StringIO()), drawer or contextlib.nullcontext():
                script.end(args, out, prepared, result, drawer)
            row.update(registration_figures(out / "metrics.json"))
            record_inputs(out, argv)
        except (SystemExit, Exception) as e:  # noqa: BLE001
            _failed(row, e)
            if drawer is not None:
                drawer.close()
        row["seconds"] += share + time.perf_counter() - start
    for row in rows:
        row["seconds"] = round(row["seconds"], 2)
    return rows


def registration_figures(metrics: Path) -> dict:
    """The quality figures of one registration that ``cohort.csv`` lists, from its metrics.json."""
    found = json.loads(metrics.read_text())
    similarity = found.get("similarity", {})
    dice = [v for v in (found.get("dice_after") or {}).values() if v is not None]
    return {"warnings": " ".join(w["code"] for w in found.get("warnings", [])), "similarity": similarity.get("name", ""),
            "before": similarity.get("before", ""), "after": similarity.get("after", ""),
            "local_ncc_after": found.get("ncc_after", ""),
            "dice_mean": round(sum(dice) / len(dice), 4) if dice else "", "folding_percent": found.get("folding_percent", ""),
            "inverse_consistency_mm": (found.get("inverse_consistency_mm") or {}).get("mean", ""),
            "tre_after_mm": (found.get("tre_after") or {}).get("mean_mm", ""), "device": found.get("device", "")}


INPUTS_RECORD = ".gvsl_cohort_inputs"  # in each subject's folder: what it was made from (``inputs_digest``)


def inputs_digest(argv: list[str]) -> str:
    """A digest of a subject's arguments and of each file they name (path, size, modification time): a
    rerun redoes the subject when it changes."""
    parts = list(argv)
    for value in argv:
        path = Path(value)
        if path.is_file():
            stat = path.stat()
            parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def record_inputs(folder: Path, argv: list[str]) -> None:
    temporary = folder / f"{INPUTS_RECORD}.partial"
    temporary.write_text(inputs_digest(argv))
    os.replace(temporary, folder / INPUTS_RECORD)


def same_inputs(folder: Path, argv: list[str]) -> bool:
    record = folder / INPUTS_RECORD
    return record.is_file() and record.read_text().strip() == inputs_digest(argv)
