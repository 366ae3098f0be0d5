#!/usr/bin/env python
"""Register a moving volume to a fixed volume (affine + deformable) in physical space.

    python GVSLTrainer/register.py                                   # a built-in pair of real T1 heads
    python GVSLTrainer/register.py --fixed F.nii.gz --moving M.nrrd --output-dir out
    python GVSLTrainer/register.py --fixed F --moving M --model gvsl_pretrained.pt \\
        --fixed-labels FL.nii.gz --moving-labels ML.nii.gz --output-dir out

Writes warped.nii.gz (moving on the fixed grid), transform.h5 (fixed -> moving, as ITK resampling
expects) and inverse.h5, affine.tfm and displacement.nii.gz (the two parts: the field is applied
first, then the affine), warped_labels.nii.gz, metrics.json and report.png.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from gvsl.cli import run  # noqa: E402
from gvsl.runtime import DEVICES  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixed", help="fixed image (NIfTI, NRRD, MHA...); omitted: the built-in demo pair")
    p.add_argument("--moving", help="moving image, registered onto the fixed one")
    p.add_argument("--output-dir", default=None, help="where the outputs go (default: gvsl_runs/register, "
                                                      "or gvsl_runs/demo_register for the demo pair)")
    p.add_argument("--model", help="a GVSL checkpoint (this project's or an official GVSL_epoch_*.pth) whose "
                                   "prediction starts the optimisation; omitted: start from the identity")
    p.add_argument("--fixed-labels", help="label map on the fixed image, for Dice")
    p.add_argument("--moving-labels", help="label map on the moving image, warped with the result")
    p.add_argument("--iterations", type=int, default=None, help="deformable optimisation iterations over all levels (default 100)")
    p.add_argument("--spacing", type=float, default=None, help="working grid spacing in mm (default: the "
                        "model's, else the fixed image's median spacing, at least 2)")
    p.add_argument("--normalize", choices=("auto", "ct", "mr"), default="auto",
                   help="intensity preset (auto: ct when the fixed image holds Hounsfield units)")
    p.add_argument("--initialisation", choices=("moments", "geometry", "none"), default="moments",
                   help="initial alignment: centres of intensity mass, geometric centres, or none (trust the "
                        "images' physical positions)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    if (args.fixed is None) != (args.moving is None):
        p.error("give both --fixed and --moving, or neither for the demo pair")
    return args


def job(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from gvsl import checkpoint, data, demo
    from gvsl.registration import RegistrationOptions, register
    from gvsl.registration_io import save_registration

    if args.fixed is None:
        fixed_path, moving_path = demo.demo_registration_pair()
        out = Path(args.output_dir or "gvsl_runs/demo_register")
    else:
        fixed_path, moving_path = Path(args.fixed), Path(args.moving)
        out = Path(args.output_dir or "gvsl_runs/register")
    fixed, moving = data.read_volume(fixed_path), data.read_volume(moving_path)
    fixed_labels = data.read_labels(args.fixed_labels) if args.fixed_labels else None
    moving_labels = data.read_labels(args.moving_labels) if args.moving_labels else None
    model = checkpoint.load(args.model) if args.model else None
    if model is not None:
        checkpoint.build_gvsl(model)  # fail now, not after preprocessing, if it is not a GVSL model
    opts = RegistrationOptions(device=args.device, normalize=args.normalize, initialisation=args.initialisation,
                               spacing=args.spacing)
    if args.iterations is not None:
        opts.iterations = args.iterations
    with tqdm(total=100, desc="Registering", unit="%", disable=not args.progress,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}") as bar:
        def progress(stage: str, fraction: float) -> None:
            bar.set_description(f"Registering ({stage})", refresh=False)
            bar.update(round(100 * fraction) - bar.n)

        result = register(fixed, moving, fixed_labels, moving_labels, model, opts, progress)
    files = save_registration(result, fixed, out)
    m = result.metrics
    print(f"Registered {moving_path.name} to {fixed_path.name} in {m['runtime_s']} s on {m['device']}: "
          f"local NCC {m['ncc_before']} -> {m['ncc_after']}, folding {m['folding_percent']}%")
    print(f"Outputs in {out.resolve()}; figure: {files['report'].resolve()}")


def main(argv=None) -> int:
    args = parse(argv)
    return run(lambda: job(args))


if __name__ == "__main__":
    sys.exit(main())
