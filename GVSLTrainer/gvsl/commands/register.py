"""Register a moving volume to a fixed volume in physical space: rigid, affine, or affine + deformable.

    python GVSLTrainer/register.py                                   # a built-in pair of real T1 heads
    python GVSLTrainer/register.py --fixed F.nii.gz --moving M.nrrd --output-dir out
    python GVSLTrainer/register.py --fixed T1.nii.gz --moving CT.nrrd --similarity auto   # CT <-> MR
    python GVSLTrainer/register.py --fixed F --moving M --mode rigid --fixed-mask brain.nii.gz \\
        --initial-transform start.h5 --fixed-landmarks F.mrk.json --moving-landmarks M.mrk.json

Writes warped.nii.gz (moving on the fixed grid), transform.h5 (fixed -> moving, as ITK resampling
expects) and inverse.h5, affine.tfm and displacement.nii.gz (the two parts: the field is applied
first, then the affine; in the rigid and affine modes there is no field and transform.h5 is the
linear transform alone), warped_labels.nii.gz, metrics.json and report.png.
"""
import argparse
import contextlib
import importlib
from functools import partial
from pathlib import Path
from typing import NoReturn

from gvsl.cli import exit_now, positive_float, positive_int, run
from gvsl.report_process import ReportProcess


def parse(argv=None) -> argparse.Namespace:
    from gvsl.choices import DEVICES, INITIALISATIONS, MODES, SIMILARITIES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixed", help="fixed image (NIfTI, NRRD, MHA...); omitted: the built-in demo pair")
    p.add_argument("--moving", help="moving image, registered onto the fixed one")
    p.add_argument("--output-dir", default=None, help="where the outputs go (default: gvsl_runs/register, "
                                                      "or gvsl_runs/demo_register for the demo pair)")
    p.add_argument("--model", help="a GVSL checkpoint (this project's or an official GVSL_epoch_*.pth) whose "
                                   "prediction starts the optimisation; omitted: start from the identity")
    p.add_argument("--fixed-labels", help="label map on the fixed image, for Dice")
    p.add_argument("--moving-labels", help="label map on the moving image, warped with the result")
    p.add_argument("--mode", choices=MODES, default="deformable",
                   help="rigid (3 rotations, 3 translations), affine (12 parameters), or deformable (affine, then "
                        "a diffeomorphic velocity field; default)")
    p.add_argument("--similarity", choices=SIMILARITIES, default="auto",
                   help="ncc: local normalised cross-correlation (same modality); mind: MIND-SSC descriptors (any "
                        "pair, e.g. CT <-> MR); mi: mutual information; auto (default): mind when the images look "
                        "like different modalities, else ncc (metrics.json says which and why)")
    p.add_argument("--fixed-mask", help="mask on the fixed image (any geometry; non-zero = use): the similarity "
                                        "counts only where both masks hold, e.g. to leave out a tumour or the table")
    p.add_argument("--moving-mask", help="mask on the moving image (any geometry), warped with the moving image")
    p.add_argument("--initial-transform", help="a linear fixed -> moving transform (.h5, .tfm, .txt; ITK's "
                                               "resampling direction, as Slicer saves it) applied first")
    p.add_argument("--fixed-landmarks", help="landmarks on the fixed image: Slicer .mrk.json, .fcsv, or a CSV of "
                                             "x,y,z (LPS unless its header says RAS); target registration error "
                                             "before and after goes to metrics.json and report.png")
    p.add_argument("--moving-landmarks", help="the corresponding landmarks on the moving image")
    p.add_argument("--iterations", type=positive_int, default=None,
                   help="optimisation budget (default 100): each linear level runs half of it, the deformable "
                        "stage 80%% over its three levels")
    p.add_argument("--spacing", type=positive_float, default=None, help="working grid spacing in mm (default: the "
                        "model's, else the fixed image's median spacing, at least 2)")
    p.add_argument("--normalize", nargs="+", choices=("auto", "ct", "mr"), default=["auto"], metavar="PRESET",
                   help="intensity preset, one for both images or one each (fixed moving): ct (Hounsfield units "
                        "[-1024, 1024]), mr (0.5-99.5 percentiles), auto (default: ct for an image that holds "
                        "Hounsfield units, each image its own)")
    p.add_argument("--initialisation", choices=INITIALISATIONS, default=None,
                   help="initial alignment: auto (default: where the headers place the images when they overlap "
                        "well, else the centres of intensity mass, and the search compares the two and, for a "
                        "partial field of view, shifts along its short axis), moments, geometry (geometric "
                        "centres), or none (trust the headers; the default with --initial-transform)")
    p.add_argument("--no-rotation-search", dest="rotation_search", action="store_false",
                   help="skip the search over large rotations (125 orientations up to 60 degrees per axis, "
                        "kept only when one matches better than the start)")
    tuning = p.add_argument_group("tuning (the defaults are measured on the benchmark; see docs/registration.md)")
    tuning.add_argument("--smooth-weight", type=float, default=None,
                        help="weight of the velocity field's smoothness (default 1; higher: smoother, less local)")
    tuning.add_argument("--ncc-window", type=positive_int, default=None,
                        help="local NCC window in voxels of the working grid, odd (default 7)")
    tuning.add_argument("--levels", type=positive_int, choices=(1, 2, 3), default=None,
                        help="deformable resolution levels, coarse to fine (default 3: quarter, half, full)")
    tuning.add_argument("--no-polish", dest="polish", action="store_false",
                        help="rigid/affine: skip the last refinement on the original images (1-3 s faster, "
                             "0.1-0.5 mm less exact)")
    tuning.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch and SimpleITK (default: all the cores)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    if (args.fixed is None) != (args.moving is None):
        p.error("give both --fixed and --moving, or neither for the demo pair")
    if (args.fixed_landmarks is None) != (args.moving_landmarks is None):
        p.error("give both --fixed-landmarks and --moving-landmarks")
    if len(args.normalize) > 2:
        p.error("--normalize takes one preset for both images, or two (fixed moving)")
    return args


def options_from(args: argparse.Namespace):
    """register.py's arguments as ``RegistrationOptions``, checked."""
    from gvsl.registration import RegistrationOptions
    from gvsl.registration.options import finest_levels

    opts = RegistrationOptions(mode=args.mode, similarity=args.similarity, device=args.device,
                               normalize=args.normalize[0] if len(args.normalize) == 1 else tuple(args.normalize),
                               initialisation=args.initialisation, spacing=args.spacing,
                               rotation_search=args.rotation_search, polish=args.polish)
    if args.iterations is not None:
        opts.iterations = args.iterations
    for name in ("smooth_weight", "ncc_window"):
        if getattr(args, name) is not None:
            setattr(opts, name, getattr(args, name))
    if args.levels is not None:
        opts.levels = finest_levels(args.levels)
    opts.check()
    return opts


def job(args: argparse.Namespace, drawer: ReportProcess | None = None) -> None:
    from tqdm.auto import tqdm

    from gvsl.registration import register_prepared
    from gvsl.registration.inputs import naming_the_files
    from gvsl.registration_io import send_panels

    out, prepared, labels, model = begin(args)
    with tqdm(total=100, desc="Registering", unit="%", disable=not args.progress,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}") as bar:
        def progress(stage: str, fraction: float) -> None:
            bar.set_description(f"Registering ({stage})", refresh=False)
            bar.update(round(100 * fraction) - bar.n)

        on_images = None if drawer is None else partial(send_panels, drawer, prepared.fixed)
        with naming_the_files(args):
            result = register_prepared(prepared, model=model, progress=progress, on_images=on_images, **labels)
    end(args, out, prepared, result, drawer)


def begin(args: argparse.Namespace) -> tuple:
    """(output folder, ``Prepared`` pair, its label maps, model or None): the job up to the registration
    itself, the output folder checked before any work. A cohort's batch runs this per subject."""
    from concurrent.futures import ThreadPoolExecutor

    from gvsl import demo
    from gvsl.outputs import check_output_folder
    from gvsl.registration.inputs import read_and_prepare, read_model
    from gvsl.registration_io import FILES

    if args.fixed is None:
        args.fixed, args.moving = demo.demo_registration_pair()
        out = Path(args.output_dir or "gvsl_runs/demo_register")
    else:
        out = Path(args.output_dir or "gvsl_runs/register")
    given = (args.fixed, args.moving, args.fixed_labels, args.moving_labels, args.fixed_mask, args.moving_mask,
             args.initial_transform, args.fixed_landmarks, args.moving_landmarks, args.model)
    check_output_folder(out, given, tuple(FILES.values()))  # before any work, not after it
    opts = options_from(args)
    if args.threads:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

    # Reading and preparing need no torch: without a model (whose file needs torch) they run in a
    # thread while torch loads here (SimpleITK and NumPy release the interpreter's lock).
    with ThreadPoolExecutor(1) as pool:
        ready = pool.submit(read_and_prepare, args, opts) if args.model is None else None
        importlib.import_module("gvsl.registration.pipeline")  # torch, imported while the files are read

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)

        model = read_model(args.model) if args.model else None
        prepared, labels = ready.result() if ready is not None else read_and_prepare(args, opts, model)
    return out, prepared, labels, model


def end(args: argparse.Namespace, out: Path, prepared, result, drawer: ReportProcess | None = None) -> None:
    """Write the result's files (the figure by ``drawer`` if there is one) and say where they are."""
    from gvsl.registration_io import save_registration, summary

    files = save_registration(result, prepared.fixed, out, drawer)
    print(summary(result.metrics, Path(args.moving).name, Path(args.fixed).name))
    print(f"Outputs in {out.resolve()}; figure: {files['report'].resolve()}")


def main(argv=None) -> int:
    with ReportProcess.start() or contextlib.nullcontext() as drawer:  # before torch: see gvsl.report_process
        args = parse(argv)
        return run(lambda: job(args, drawer), interrupted="nothing was written (outputs appear only when complete)")


def script(argv=None) -> NoReturn:
    """Run as a command (``GVSLTrainer/register.py``, ``gvsl register``) and end the process."""
    exit_now(main(argv))
