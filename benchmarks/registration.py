#!/usr/bin/env python
"""Registration accuracy and speed: gvsl next to ANTs SyN and SimpleITK affine + B-spline (Mattes MI).

Pairs are real anatomy with a known deformation (the MNI ICBM152 T1 warped by a random affine
within the GVSL head's bounds plus a smooth field, on an oblique, anisotropic fixed grid), so the
end-point error against the truth is exact; Dice is over grey/white-matter labels. Prints one
JSON line per method and pair, then one summary line per method:

    python benchmarks/registration.py --seeds 0 1 [--model gvsl_pretrained.pt] [--methods gvsl ants sitk]

ANTs needs ``pip install antspyx``; a method whose package is missing is reported and skipped.
One-off import costs are paid before timing (see warm_up), for every method alike.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GVSLTrainer"))
sys.path.insert(0, str(ROOT / "Testing"))

import synthetic  # noqa: E402
from gvsl import checkpoint  # noqa: E402
from gvsl.registration import RegistrationOptions, register  # noqa: E402


def run_gvsl(fixed, moving, model=None, iterations=None, spacing=None):
    opts = RegistrationOptions(spacing=spacing)
    if iterations:
        opts.iterations = iterations
    res = register(fixed, moving, model=checkpoint.load(model) if model else None, options=opts)
    return res.transform


def run_sitk(fixed, moving):
    """A typical SimpleITK pipeline: multi-resolution affine, then a B-spline, both on Mattes MI."""
    f, m = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, 0)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    affine = reg.Execute(f, m)
    bspline = sitk.BSplineTransformInitializer(f, [8, 8, 8], order=3)
    reg2 = sitk.ImageRegistrationMethod()
    reg2.SetMetricAsMattesMutualInformation(32)
    reg2.SetMetricSamplingStrategy(reg2.RANDOM)
    reg2.SetMetricSamplingPercentage(0.2, 0)
    reg2.SetInterpolator(sitk.sitkLinear)
    reg2.SetOptimizerAsLBFGSB(1e-5, 100, 5, 1000)
    reg2.SetShrinkFactorsPerLevel([2, 1])
    reg2.SetSmoothingSigmasPerLevel([1, 0])
    reg2.SetMovingInitialTransform(affine)
    reg2.SetInitialTransform(bspline, inPlace=True)
    reg2.Execute(f, m)
    return sitk.CompositeTransform([affine, bspline])  # B-spline first, then the affine


def run_ants(fixed, moving, kind="SyN"):
    """antspyx with its defaults for ``kind`` (SyN, Rigid, Affine): mutual information in every stage."""
    import ants

    with tempfile.TemporaryDirectory() as tmp:
        fp, mp = f"{tmp}/f.nii.gz", f"{tmp}/m.nii.gz"
        sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), fp)
        sitk.WriteImage(sitk.Cast(moving, sitk.sitkFloat32), mp)
        fa, ma = ants.image_read(fp), ants.image_read(mp)
        out = ants.registration(fa, ma, type_of_transform=kind, outprefix=f"{tmp}/r")
        parts = [sitk.DisplacementFieldTransform(sitk.ReadImage(p, sitk.sitkVectorFloat64)) if p.endswith(".nii.gz")
                 else sitk.ReadTransform(p) for p in out["fwdtransforms"]]
        if len(parts) == 1:
            return parts[0]
        warp, aff = parts
        # ANTs lists [warp, affine]; find the order that reproduces its own resampling
        reference = sitk.GetArrayFromImage(sitk.ReadImage(_write(ants, out["warpedmovout"], f"{tmp}/w.nii.gz")))
        best = None
        for order in ([aff, warp], [warp, aff]):
            t = sitk.CompositeTransform(order)
            err = np.abs(sitk.GetArrayFromImage(sitk.Resample(moving, fixed, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
                         - reference).mean()
            if best is None or err < best[0]:
                best = (err, t)
        return best[1]


def run_elastix(fixed, moving, maps=("affine", "bspline")):
    """itk-elastix (the engine of SlicerElastix) with its default parameter maps (Mattes MI)."""
    import itk

    with tempfile.TemporaryDirectory() as tmp:
        fp, mp = f"{tmp}/f.nii.gz", f"{tmp}/m.nii.gz"
        sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), fp)
        sitk.WriteImage(sitk.Cast(moving, sitk.sitkFloat32), mp)
        f, m = itk.imread(fp, itk.F), itk.imread(mp, itk.F)
        params = itk.ParameterObject.New()
        for name in maps:
            params.AddParameterMap(params.GetDefaultParameterMap(name))
        _, result = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
        field = itk.transformix_deformation_field(m, result)
        arr = itk.array_from_image(field).astype(np.float64)
    image = sitk.GetImageFromArray(arr, isVector=True)
    image.CopyInformation(fixed)
    return sitk.DisplacementFieldTransform(image)


def _write(ants, image, path):
    ants.image_write(image, path)
    return path


def evaluate(transform, fixed, moving_labels, fixed_labels, truth) -> dict:
    est = synthetic.transform_field(transform, fixed)
    ref = synthetic.transform_field(truth, fixed)
    arr = sitk.GetArrayFromImage(fixed)
    mask = arr > 0.15 * arr.max()
    epe = np.linalg.norm(est - ref, axis=-1)[mask]
    warped = sitk.GetArrayFromImage(sitk.Resample(moving_labels, fixed, transform, sitk.sitkNearestNeighbor, 0))
    fl = sitk.GetArrayFromImage(fixed_labels)
    dice = {name: float(2 * ((warped == v) & (fl == v)).sum() / ((warped == v).sum() + (fl == v).sum()))
            for name, v in (("gm", 1), ("wm", 2))}
    field = sitk.GetImageFromArray(est, isVector=True)
    field.CopyInformation(fixed)
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    return {"epe_mean_mm": round(float(epe.mean()), 3), "epe_p95_mm": round(float(np.percentile(epe, 95)), 3),
            "dice_gm": round(dice["gm"], 4), "dice_wm": round(dice["wm"], 4),
            "folding_percent": round(float((jac <= 0).mean() * 100), 4)}


def warm_up(methods) -> None:
    """Pay one-off import costs before timing: ANTs' libraries, and the compiler stack that PyTorch
    imports when the first optimiser of a process is built (about 3 s here)."""
    import torch
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    if "ants" in methods:
        try:
            import ants  # noqa: F401
        except ImportError:
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=["gvsl", "ants", "sitk"], choices=["gvsl", "ants", "sitk"])
    p.add_argument("--model", help="a GVSL checkpoint for a 'gvsl+model' run as well")
    p.add_argument("--iterations", type=int, help="gvsl deformable iterations")
    p.add_argument("--spacing", type=float, help="gvsl working grid spacing, mm")
    args = p.parse_args()
    methods = {"gvsl": lambda f, m: run_gvsl(f, m, None, args.iterations, args.spacing), "ants": run_ants,
               "sitk": run_sitk}
    if args.model:
        methods["gvsl+model"] = lambda f, m: run_gvsl(f, m, args.model, args.iterations, args.spacing)
        args.methods.append("gvsl+model")
    warm_up(args.methods)
    rows = []
    for seed in args.seeds:
        fixed, moving, fixed_labels, moving_labels, truth = synthetic.synthetic_pair(seed)
        for name in args.methods:
            try:
                start = time.perf_counter()
                transform = methods[name](fixed, moving)
                wall = time.perf_counter() - start
            except ImportError as e:
                print(json.dumps({"method": name, "skipped": str(e)}), flush=True)
                continue
            row = {"method": name, "seed": seed, "wall_s": round(wall, 2),
                   **evaluate(transform, fixed, moving_labels, fixed_labels, truth)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        print(json.dumps({"summary": name, **{k: round(float(np.mean([r[k] for r in mine])), 4)
                                              for k in ("wall_s", "epe_mean_mm", "dice_gm", "dice_wm",
                                                        "folding_percent")}}), flush=True)


if __name__ == "__main__":
    main()
