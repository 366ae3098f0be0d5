#!/usr/bin/env python
"""Register a cohort onto an atlas (or each subject onto its own fixed image), on Dask workers.

    python GVSLTrainer/cohort.py register --fixed ATLAS.nii.gz --moving scans/ --output-dir out
    python GVSLTrainer/cohort.py register --moving subjects.csv --output-dir out --mode rigid
    python GVSLTrainer/cohort.py register --fixed A --moving scans/ --output-dir out --scheduler tcp://host:8786

``--moving``: a folder (searched as pretrain.py searches; each image is a subject named after its
file) or a CSV with the columns subject and moving, and optionally fixed, moving_labels,
fixed_labels, moving_mask, fixed_mask, moving_landmarks and fixed_landmarks (paths relative to the
CSV). Every other option is register.py's (see register.py --help) and applies to every subject.

Each subject's folder (OUT/<subject>/) holds what register.py writes; OUT/cohort.csv has one row per
subject (status, seconds, similarity before and after, warnings, the error of a failed one). A
subject whose folder is already complete is not registered again: rerun the command to resume.
Each worker imports torch once and registers one subject after another. Exit code: 0 when every
subject is registered, 1 when some failed (the others are complete), 2 for unusable arguments.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from gvsl.cli import exit_now, positive_int, run  # noqa: E402


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    r = commands.add_parser("register", help="register every subject; register.py's options apply to each",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--fixed", help="the atlas every subject is registered onto (or a 'fixed' column in the CSV)")
    r.add_argument("--moving", required=True, help="a folder of images, or a CSV of subjects")
    r.add_argument("--output-dir", required=True, help="one folder per subject in it, and cohort.csv")
    engine = r.add_argument_group("engine (Dask distributed)")
    engine.add_argument("--scheduler", help="the address of a running Dask scheduler (e.g. tcp://host:8786) "
                                            "whose workers have gvsl installed; omitted: a local cluster")
    engine.add_argument("--workers", type=positive_int, help="local cluster: worker processes (default: one per "
                                                             "core, as many as the memory holds at 2 GB each)")
    engine.add_argument("--threads-per-worker", type=positive_int,
                        help="torch threads in each worker (default: 1; on 2 cores 2 workers x 1 thread registered "
                             "1.26x as many subjects a minute as 1 x 2)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p.parse_known_args(argv)


def job(args: argparse.Namespace, options: list[str]) -> int:
    from gvsl.cohort import SUMMARY, register_cohort

    rows = register_cohort(args.fixed, args.moving, args.output_dir, options, scheduler=args.scheduler,
                           workers=args.workers, threads_per_worker=args.threads_per_worker, progress=args.progress)
    failed = [r for r in rows if r["status"] == "failed"]
    done = len(rows) - len(failed)
    print(f"{done} of {len(rows)} subjects registered; summary: {Path(args.output_dir, SUMMARY).resolve()}")
    for row in failed:
        print(f"failed: {row['subject']}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    args, options = parse(argv)
    status = []
    code = run(lambda: status.append(job(args, options)),
               interrupted="the subjects already registered are complete; rerun the command to resume")
    return code or (status[0] if status else 0)


if __name__ == "__main__":
    exit_now(main())
