"""Register or segment a cohort on Dask workers (torch is imported once per worker, not per subject),
or segment one target with labelled atlases (multi-atlas label fusion).

    python GVSLTrainer/cohort.py register --fixed ATLAS.nii.gz --moving scans/ --output-dir out
    python GVSLTrainer/cohort.py register --moving subjects.csv --output-dir out --mode rigid
    python GVSLTrainer/cohort.py segment --model seg.pt --input scans/ --output-dir out --format seg.nrrd
    python GVSLTrainer/cohort.py register --fixed A --moving scans/ --output-dir out --scheduler tcp://host:8786
    python GVSLTrainer/cohort.py label-fusion --target T.nii.gz --atlases atlases.csv --output T_labels.seg.nrrd
    python GVSLTrainer/cohort.py template --input scans/ --output-dir template --iterations 4

register: ``--moving`` is a folder (searched as pretrain.py searches; each image is a subject named
after its file) or a CSV with the columns subject and moving, and optionally fixed, moving_labels,
fixed_labels, moving_mask, fixed_mask, moving_landmarks and fixed_landmarks (paths relative to the
CSV). segment: ``--input`` is a folder, a list file, or a CSV with the columns subject and input.
Every other option is register.py's or segment.py's (see their --help) and applies to every subject.

Each subject's folder (OUT/<subject>/) holds what register.py writes, or what segment.py writes
(labels.<format>, and probabilities/ and classes.json on request); OUT/cohort.csv has one row per
subject, rewritten as each finishes (status, seconds, for registrations the similarity before and
after, Dice, folding, inverse consistency, TRE and warnings, the worker, and a failed one's error),
and at the end the outliers (a robust z-score beyond 3.5 of local NCC, Dice, folding or inverse
consistency). Registrations also get OUT/cohort_report.png: the atlas next to the mean of the warped
subjects, the quality figures per subject, and each warped mid-slice under the atlas's outline.
A subject whose folder is already complete, made from the same files and options, is not run
again: rerun the command to resume, or to redo what changed. Exit code: 0 when every subject is
done, 1 when some failed (the others are complete), 2 for unusable arguments, 130 when stopped by
Ctrl-C or SIGTERM (the subjects finished by then stay; the rest leave nothing behind).

label-fusion: every atlas (a CSV with the columns image and labels) is registered onto the target as
a cohort (into OUTPUT.registrations/, reused by a rerun), its labels carried along, and the labels
fused: by locally weighted voting (default; each atlas's vote weighed by the local correlation of
its warped image with the target, so a misregistered atlas counts little where it is wrong) or by
majority. OUTPUT.atlases.csv lists each atlas's agreement with the result.

template: an unbiased population template: the subjects averaged after an affine start (onto the
first subject, on a 4 mm working grid unless --spacing is given, without the final polish), then
--iterations times registered onto the current template, averaged, and moved to the mean shape (the
inverse of the mean displacement), sharpened where that helps. Each iteration's template and figures
are kept; a rerun resumes after the last complete iteration. Each subject's transforms to the final
template (the last registration composed with the last update) go to OUTPUT/subjects/<name>/.
"""
import argparse
import sys
from pathlib import Path
from typing import NoReturn

from gvsl.cli import exit_now, positive_int, run, sigterm_as_interrupt


def _engine(p: argparse.ArgumentParser) -> None:
    from gvsl.cohort.jobqueue import CLUSTERS

    engine = p.add_argument_group("engine (Dask distributed)")
    engine.add_argument("--scheduler", help="the address of a running Dask scheduler (e.g. tcp://host:8786) "
                                            "whose workers have gvsl installed; omitted: a local cluster")
    engine.add_argument("--workers", type=positive_int, help="local cluster: worker processes (default: one per "
                                                             "GPU, else one per core, as many as the memory holds at "
                                                             "2 GB each)")
    engine.add_argument("--threads-per-worker", type=positive_int,
                        help="torch threads in each worker (default: the cores shared among GPU workers, else 1; on 2 "
                             "cores 2 workers x 1 thread registered 1.26x as many subjects a minute as 1 x 2)")
    engine.add_argument("--batch-size", type=positive_int,
                        help="registrations: subjects per task, their deformable stages optimised as one batch "
                             "(default: 8 on GPU workers, fewer if the GPU's free memory holds fewer; 1 on CPUs, where "
                             "batches were 10%% slower)")
    jobs = p.add_argument_group("batch jobs (dask-jobqueue, an optional extra: pip install dask-jobqueue)")
    jobs.add_argument("--cluster", choices=CLUSTERS, help="start the workers as batch jobs of this scheduler; the job "
                                                          "script is printed before it is submitted")
    jobs.add_argument("--jobs", type=positive_int, default=1, help="jobs to submit (default: 1)")
    jobs.add_argument("--cores", type=positive_int, default=1, help="cores per job: one worker each (default: 1)")
    jobs.add_argument("--memory", default="4GB", help="memory per job (default: 4GB; about 2 GB a worker)")
    jobs.add_argument("--walltime", default="01:00:00", help="per job (default: 01:00:00)")
    jobs.add_argument("--gpus-per-job", type=positive_int, help="GPUs per job: one worker each, and the subjects' "
                                                                "tasks ask for a GPU")
    jobs.add_argument("--queue", help="the queue or partition")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    from gvsl.cohort import SEGMENT_FORMATS
    from gvsl.cohort.fusion import METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    r = commands.add_parser("register", help="register every subject; register.py's options apply to each",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--fixed", help="the atlas every subject is registered onto (or a 'fixed' column in the CSV)")
    r.add_argument("--moving", required=True, help="a folder of images, or a CSV of subjects")
    r.add_argument("--output-dir", required=True, help="one folder per subject in it, and cohort.csv")
    _engine(r)
    s = commands.add_parser("segment", help="segment every subject; segment.py's options apply to each",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", required=True, help="a fine-tuned model (gvsl_segmentation.pt), loaded once per worker")
    s.add_argument("--input", required=True, help="a folder of images, a list file, or a CSV (subject, input)")
    s.add_argument("--output-dir", required=True, help="one folder per subject in it, and cohort.csv")
    s.add_argument("--format", choices=SEGMENT_FORMATS, default="nii.gz", help="of each label map (labels.FORMAT)")
    s.add_argument("--probabilities", action="store_true", help="also write each subject's probability maps")
    s.add_argument("--classes", action="store_true", help="also write each subject's classes.json")
    _engine(s)
    f = commands.add_parser("label-fusion", help="segment a target with labelled atlases: each registered onto it, "
                                                 "their labels fused (no model); register.py's options apply",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--target", required=True, help="the image to segment")
    f.add_argument("--atlases", required=True, help="a CSV with the columns image and labels (and optionally subject)")
    f.add_argument("--output", required=True, help="the fused label map (.nii.gz, .nrrd, or .seg.nrrd with the "
                                                   "segments' names and colours)")
    f.add_argument("--method", choices=METHODS, default="weighted",
                   help="weighted (default): each atlas's vote weighed by how well its warped image matches the "
                        "target around the voxel; majority: one vote each")
    f.add_argument("--probabilities", metavar="DIR", help="also write each label's share of the votes here")
    f.add_argument("--work-dir", help="where the atlases' registrations go (default: OUTPUT.registrations/); a "
                                      "rerun reuses them")
    _engine(f)
    t = commands.add_parser("template", help="build a population template from the subjects; register.py's options "
                                             "apply to each registration",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--input", required=True, help="a folder of images, or a CSV of subjects (subject, moving)")
    t.add_argument("--output-dir", required=True, help="template.nii.gz, each iteration's template, template.csv, "
                                                       "template_iterations.png and each subject's transforms")
    t.add_argument("--iterations", type=positive_int, default=4, help="template iterations after the affine start "
                                                                      "(default 4)")
    t.add_argument("--registration-iterations", type=positive_int, metavar="N",
                   help="register.py's --iterations for each registration (its optimiser budget; --iterations here "
                        "counts the template's iterations); default: 50 in the rounds before the last, which the "
                        "next round refines, and register.py's 100 in the last")
    t.add_argument("--sharpen", choices=("auto", "always", "never"), default="auto",
                   help="Laplacian sharpening of each iteration's average: auto (default) keeps it where the "
                        "subjects match the sharpened template better")
    _engine(t)
    return p.parse_known_args(argv)


def job(args: argparse.Namespace, options: list[str]) -> int:
    from gvsl.cohort import REPORT, SUMMARY, register_cohort, segment_cohort

    from gvsl.cohort.jobqueue import JobQueue

    jobqueue = None
    if args.cluster:
        jobqueue = JobQueue(args.cluster, args.jobs, args.cores, args.memory, args.walltime, args.gpus_per_job or 0,
                            args.queue)
    engine = dict(scheduler=args.scheduler, workers=args.workers, threads_per_worker=args.threads_per_worker,
                  jobqueue=jobqueue, batch_size=args.batch_size, progress=args.progress)
    if args.command == "template":
        from gvsl.cohort.template import FIGURE, build_template

        if args.registration_iterations:
            options = [*options, "--iterations", str(args.registration_iterations)]
        built = build_template(args.input, args.output_dir, options, iterations=args.iterations, sharpen=args.sharpen,
                               **engine)
        last = built["iterations"][-1]
        print(f"Template: {Path(built['template']).resolve()} after {args.iterations} iterations (sharpness "
              f"{last['sharpness']}, last mean displacement {last['mean_displacement_mm']} mm); every iteration in "
              f"{Path(args.output_dir, FIGURE).resolve()}")
        return 0
    if args.command == "label-fusion":
        from gvsl.cohort.label_fusion import label_fusion

        done = label_fusion(args.target, args.atlases, args.output, options, method=args.method,
                            probabilities=args.probabilities, work_dir=args.work_dir, **engine)
        print(f"Fused {done['atlases']} atlases ({args.method} voting) into {Path(done['output']).resolve()}: "
              f"{', '.join(n for n in done['names'][1:])}; each atlas's agreement in "
              f"{Path(str(done['output']) + '.atlases.csv').resolve()}")
        return 1 if done["failed"] else 0
    if args.command == "register":
        rows = register_cohort(args.fixed, args.moving, args.output_dir, options, **engine)
    else:
        rows = segment_cohort(args.model, args.input, args.output_dir, options, output_format=args.format,
                              probabilities=args.probabilities, classes=args.classes, **engine)
    failed = [r for r in rows if r["status"] == "failed"]
    verb = "registered" if args.command == "register" else "segmented"
    print(f"{len(rows) - len(failed)} of {len(rows)} subjects {verb}; summary: {Path(args.output_dir, SUMMARY).resolve()}")
    if Path(args.output_dir, REPORT).is_file() and args.command == "register":
        print(f"quality at a glance: {Path(args.output_dir, REPORT).resolve()}")
    for row in rows:
        if row.get("outlier"):
            print(f"outlier: {row['subject']}: {row['outlier']}")
    for row in failed:
        print(f"failed: {row['subject']}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    args, options = parse(argv)
    status = []
    with sigterm_as_interrupt():
        code = run(lambda: status.append(job(args, options)),
                   interrupted="the subjects already done are complete; rerun the command to resume")
    return code or (status[0] if status else 0)


def script(argv=None) -> NoReturn:
    """Run as a command (``GVSLTrainer/cohort.py``, ``gvsl cohort``) and end the process."""
    exit_now(main(argv))
