"""Workers started as batch jobs through dask-jobqueue (SLURM, PBS, SGE, LSF): an optional extra."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from ..volumes import DataError

CLUSTERS = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
# how each scheduler is asked for GPUs; sites differ (PBS Pro wants them in its select statement): the
# printed job script shows what is submitted
GPU_DIRECTIVES = {"slurm": "--gres=gpu:{n}", "pbs": "-l ngpus={n}", "sge": "-l gpu={n}", "lsf": '-gpu "num={n}"'}


@dataclass
class JobQueue:
    """Batch jobs that each start Dask workers: one single-threaded worker per core, or one worker per
    GPU (advertising a ``GPU`` resource, which the cohort's tasks then ask for)."""
    kind: str
    jobs: int = 1
    cores: int = 1  # per job
    memory: str = "4GB"  # per job
    walltime: str = "01:00:00"
    gpus_per_job: int = 0
    queue: str | None = None

    @property
    def workers_per_job(self) -> int:
        return self.gpus_per_job or self.cores

    @property
    def threads_per_worker(self) -> int:
        return max(1, self.cores // self.workers_per_job)

    def start(self):
        """The dask-jobqueue cluster, its job script printed (to stderr) and ``jobs`` jobs submitted."""
        if self.kind not in CLUSTERS:
            raise DataError(f"--cluster must be one of {', '.join(CLUSTERS)}, got {self.kind!r}")
        try:
            import dask_jobqueue
        except ImportError:
            raise DataError(f"--cluster {self.kind} needs dask-jobqueue: pip install dask-jobqueue") from None
        gpus = self.gpus_per_job
        cluster = getattr(dask_jobqueue, CLUSTERS[self.kind])(
            cores=self.cores, processes=self.workers_per_job, memory=self.memory, walltime=self.walltime,
            queue=self.queue, job_name="gvsl-cohort",
            job_extra_directives=[GPU_DIRECTIVES[self.kind].format(n=gpus)] if gpus else [],
            worker_extra_args=["--resources", "GPU=1"] if gpus else [],
            scheduler_options={"dashboard_address": None})
        print(f"Submitting {self.jobs} job(s) of this script:\n{cluster.job_script()}", file=sys.stderr, flush=True)
        cluster.scale(jobs=self.jobs)
        return cluster
