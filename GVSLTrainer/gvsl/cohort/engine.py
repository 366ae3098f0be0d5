"""The Dask side of a cohort: the cluster (embedded, or a running scheduler), the tasks, the summary."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from ..outputs import remove_stale, write_csv
from ..volumes import DataError
from .jobqueue import JobQueue
from .quality import outliers
from .worker import load_script, register_batch, run_subject

SUMMARY = "cohort.csv"  # one row per subject, next to the subjects' folders


WORKER_MEMORY_GB = 2.0  # a registration's peak: 0.75-0.85 GB for a head at 2 mm, the 160-voxel grid cap more


GPU_BATCH = 8  # subjects a GPU worker's task holds by default (fewer if its free memory holds fewer)


def gpu_count() -> int:
    """The NVIDIA GPUs this process may use, without importing torch (2 s): CUDA_VISIBLE_DEVICES, else the
    driver's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def local_cluster_size(workers: int | None, threads: int | None) -> tuple[int, int]:
    """(workers, threads per worker) of the embedded cluster: by default one worker per GPU with the
    cores shared among them, else one single-threaded worker per core, as many as the memory holds at
    WORKER_MEMORY_GB each. On 2 cores, 2 x 1 registered 13.9 subjects a minute, 1 x 2 11.0, a loop of
    register.py processes 9.3 (benchmarks/cohort.py, 6 heads); 20 heads at commit 74fdb5d: 2 x 1 16.8,
    1 x 1 10.7, the loop 10.5."""
    cores = os.cpu_count() or 1
    gpus = gpu_count()
    if gpus:
        workers = workers or gpus
        return workers, threads or max(1, cores // workers)
    threads = threads or 1
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (AttributeError, ValueError, OSError):  # not POSIX: the cores decide
        memory_gb = float("inf")
    return workers or max(1, min(cores // threads, int(memory_gb // WORKER_MEMORY_GB))), threads


@contextlib.contextmanager
def local_client(workers: int | None = None, threads_per_worker: int | None = None):
    """(client, threads per task) of an embedded ``LocalCluster`` (``local_cluster_size``), closed on
    exit. A template holds one across its rounds: starting one costs 3-5 s on 2 cores."""
    from dask.distributed import Client, LocalCluster

    n, threads = local_cluster_size(workers, threads_per_worker)
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40,
                      resources={"GPU": 1} if gpu_count() else None) as cluster, Client(cluster) as client:
        yield client, threads


def is_local(client) -> bool:
    """Whether ``client``'s workers run on this machine (an embedded cluster)."""
    from dask.distributed import LocalCluster

    return isinstance(getattr(client, "cluster", None), LocalCluster)


def gpu_workers(client) -> int:
    """How many of the cluster's workers advertise a GPU."""
    return sum("GPU" in (w.get("resources") or {}) for w in client.scheduler_info()["workers"].values())


def batches(todo: list, size: int, workers: int) -> list[list]:
    """``todo`` in tasks of up to ``size``, but no fewer tasks than ``workers`` (every GPU busy)."""
    size = max(1, min(size, -(-len(todo) // max(1, workers))))
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def run_cohort(tool: str, jobs: list[tuple[str, list[str]]], output_dir: Path, done: dict[str, dict], *,
               scheduler: str | None = None, client=None, workers: int | None = None,
               threads_per_worker: int | None = None, jobqueue: JobQueue | None = None,
               batch_size: int | None = None, progress: bool = True) -> list[dict]:
    """Run ``tool`` on every (subject, its arguments) of ``jobs`` not in ``done`` (complete earlier: its
    row's figures), one task each; write ``output_dir/cohort.csv`` and return its rows, in the order of
    ``jobs``, the outliers among them named in their ``outlier`` column (``quality.outliers``).

    ``client``: a ``dask.distributed.Client`` to use; ``scheduler``: the address of a running one;
    ``jobqueue``: workers started as batch jobs; none of them: an embedded ``LocalCluster``
    (``workers`` x ``threads_per_worker``, see ``local_cluster_size``).
    Every subject's arguments are checked by the tool's parser before any work.

    Registrations on GPU workers (``GPU`` resource) go ``batch_size`` (default GPU_BATCH) to a task,
    their deformable stages batched (``worker.register_batch``); elsewhere one a task unless
    ``batch_size`` says otherwise (on 2 CPU cores a batch of 2 or 4 was 10 % slower than one at a time)."""
    from dask.distributed import Client, as_completed
    from tqdm.auto import tqdm

    script = load_script(tool)
    for name, argv in jobs:
        try:
            script.parse(argv)
        except SystemExit:
            raise DataError(f"subject {name}: {tool}.py refused the arguments {' '.join(argv)}") from None
    rows = [{"subject": name, "status": "done earlier", "seconds": 0.0, "error": "", "warnings": "", **done[name]}
            for name, _ in jobs if name in done]
    order = {name: i for i, (name, _) in enumerate(jobs)}

    def summarise() -> None:
        rows.sort(key=lambda r: order[r["subject"]])
        write_summary(rows, output_dir / SUMMARY)

    todo = [(name, argv) for name, argv in jobs if name not in done]
    output_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        threads = threads_per_worker or 1
        resources = None
        if client is None and scheduler:
            client = stack.enter_context(Client(scheduler))
        elif client is None and jobqueue is not None:
            client = stack.enter_context(Client(stack.enter_context(jobqueue.start())))
            threads = threads_per_worker or jobqueue.threads_per_worker
            resources = {"GPU": 1} if jobqueue.gpus_per_job else None
        elif client is None:
            # runs after the cluster is closed (its workers gone): what they left mid-subject when stopped
            stack.callback(lambda: [remove_stale(output_dir, f".{name}.partial-", "-") for name, _ in todo])
            client, threads = stack.enter_context(local_client(workers, threads_per_worker))
        gpus = gpu_workers(client) or (jobqueue.jobs * jobqueue.gpus_per_job if jobqueue else 0)  # jobs may be queued
        if gpus and resources is None:
            resources = {"GPU": 1}
        size = batch_size or (GPU_BATCH if gpus else 1)
        # a figure helper per subject pays where cores would idle: beside a GPU, or more cores than threads
        spare = bool(gpus) or (is_local(client) and len(client.nthreads()) * threads < (os.cpu_count() or 1))
        if tool == "register" and size > 1:
            futures = {client.submit(register_batch, chunk, threads, size, spare, pure=False, resources=resources,
                                     key=f"gvsl-register-{chunk[0][0]}-{len(chunk)}-{time.time_ns()}"):
                       [name for name, _ in chunk] for chunk in batches(todo, size, gpus or len(client.nthreads()))}
        else:
            futures = {client.submit(run_subject, tool, name, argv, threads, spare,
                                     key=f"gvsl-{tool}-{name}-{time.time_ns()}", pure=False, resources=resources):
                       [name] for name, argv in todo}
        verb = "Registering" if tool == "register" else "Segmenting"
        if progress and getattr(client, "dashboard_link", None) and (scheduler or jobqueue):
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        failed = 0
        try:
            with tqdm(total=len(todo), desc=f"{verb} the cohort", unit="subject", disable=not progress) as bar:
                for future in as_completed(futures):
                    try:
                        found = future.result()
                        found = found if isinstance(found, list) else [found]
                    except Exception as e:  # noqa: BLE001 - its workers died (out of memory, killed) after Dask's reruns
                        found = [{"subject": name, "status": "failed", "seconds": "", "warnings": "",
                                  "error": f"its worker was lost ({type(e).__name__}: {e})"} for name in futures[future]]
                    rows.extend(found)
                    summarise()  # as subjects finish
                    for row in found:
                        failed += row["status"] == "failed"
                        if row["status"] == "failed":
                            bar.write(f"{row['subject']}: failed: {row['error']}")
                    bar.set_postfix(failed=failed, refresh=False)
                    bar.update(len(found))
        finally:  # interrupted too: the subjects done so far are listed
            summarise()
    for name, why in outliers(rows).items():
        next(r for r in rows if r["subject"] == name)["outlier"] = why
    summarise()
    return rows


def write_summary(rows: list[dict], path: Path) -> None:
    columns = ["subject", "status", "seconds", "similarity", "before", "after", "dice_mean", "folding_percent",
               "inverse_consistency_mm", "tre_after_mm", "local_ncc_after", "warnings", "outlier", "worker", "device",
               "error"]
    write_csv(rows, columns, path)
