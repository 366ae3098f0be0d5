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
def _figure_helper():
    """register.py's figure helper (``ReportProcess``) for one subject, and a fresh one started for the
    next: it imports matplotlib while this worker waits, so each figure is drawn beside the
    registration, as register.py draws it, not after it (about 1 s a subject)."""
    from ..report_process import ReportProcess

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


def run_subject(tool: str, name: str, argv: list[str], threads: int) -> dict:
    """One subject: ``tool``'s job in this process, quietly. Returns its row of ``cohort.csv``; never raises
    for a bad subject (its error is in the row)."""
    import torch

    from ..cli import EXPECTED
    from ..registration.kept import keep_fixed

    torch.set_num_threads(threads)
    keep_freed_memory()
    keep_fixed()  # the atlas is read and prepared once per worker
    worker = _current_worker()
    _choose_gpu(worker)
    start = time.perf_counter()
    row = {"subject": name, "status": "done", "seconds": 0.0, "error": "", "warnings": "",
           "worker": "" if worker is None else str(worker.name)}
    try:
        script = load_script(tool)
        args = script.parse([*argv, "--no-progress"])
        with contextlib.redirect_stdout(io.StringIO()):
            if tool == "register":
                with _figure_helper() as drawer:
                    script.job(args, drawer)
                row.update(registration_figures(Path(args.output_dir) / "metrics.json"))
                record_inputs(Path(args.output_dir), argv)
            else:
                script.job(args)
                record_inputs(Path(args.output).parent, argv)
    except SystemExit as e:  # the parser refused this subject's arguments
        row.update(status="failed", error=f"invalid arguments (exit {e.code})")
    except EXPECTED as e:
        row.update(status="failed", error=str(e))
    except Exception as e:  # noqa: BLE001 - one subject's surprise must not stop the cohort
        row.update(status="failed", error=f"{type(e).__name__}: {e}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


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
