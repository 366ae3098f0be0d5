#!/usr/bin/env python
"""Registration accuracy and speed: gvsl next to ANTs, elastix and SimpleITK, on pairs with a known truth.

Cases (real anatomy, the MNI ICBM152 T1, with a known transform, so end-point errors are exact):

* ``same``: T1 <-> T1, a random affine plus an 8 mm smooth field onto an oblique, anisotropic grid;
  gvsl (deformable) vs ANTs SyN, elastix affine + B-spline, SimpleITK affine + B-spline.
* ``multimodal``: the same warp, a T1 fixed and a pseudo-CT moving (Hounsfield units, a skull the
  skull-stripped T1 does not show); gvsl vs ANTs SyN (mutual information) and elastix (Mattes MI).
* ``rigid`` / ``affine``: a known rigid / affine motion; gvsl's rigid / affine modes vs ANTs
  ``Rigid`` / ``Affine`` and elastix's rigid / affine maps; landmark error (TRE) at six points.
* ``slab20`` / ``slab40`` / ``slab80`` / ``half``: a partial field of view, an axial slab of the T1 head
  (20, 40, 80 mm, or its upper half) on its own 1 x 1 x 2 mm grid, moved by a known rigid transform
  (up to 10 degrees and 10 mm; seed 0: not moved, already in place), onto the whole head at 2 mm;
  ``slab40ct``: the 40 mm T1 slab onto a CT-like head; ``slab20fixed`` / ``slab40fixed``: the other way
  round, the whole head onto the slab (an intra-operative reference). Errors are measured inside the slab; gvsl's
  rigid and deformable modes vs ANTs ``Rigid`` and ``SyN`` and elastix's default rigid and
  affine + B-spline maps. A method that fails outright is reported as failed, with its error.
* ``--cli``: register.py end to end (process start to outputs written) on the same and multimodal
  pairs, next to ANTs SyN's registration itself and a whole ANTs process doing the same job, in one
  run, with the breakdown (imports, registration, the rest: reading, outputs, figure).

Prints one JSON line per method and case, then one summary line per (case, method):

    python benchmarks/registration.py --cases same multimodal rigid affine --seeds 0 1 [--cli]

ANTs needs ``pip install antspyx``, elastix ``pip install itk-elastix``; a missing package is
reported and skipped. One-off import costs are paid before in-process timing (see warm_up).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GVSLTrainer"))
sys.path.insert(0, str(ROOT / "Testing"))

import synthetic  # noqa: E402
from gvsl import checkpoint  # noqa: E402
from gvsl.registration import RegistrationOptions, register  # noqa: E402


def run_gvsl(fixed, moving, mode="deformable", model=None, iterations=None, spacing=None, device="auto"):
    opts = RegistrationOptions(mode=mode, spacing=spacing, device=device)
    if iterations:
        opts.iterations = iterations
    return register(fixed, moving, model=checkpoint.load(model) if model else None, options=opts).transform


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
        field = itk.transformix_deformation_field(m, result, output_directory=tmp)  # not into the cwd
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


def warm_up(device: str = "auto") -> None:
    """Pay one-off costs before in-process timing: ANTs' and ITK's libraries, and on a GPU the context
    and kernel loading of a first registration (a tiny one)."""
    for name in ("ants", "itk"):
        try:
            __import__(name)
        except ImportError:
            pass
    t1 = synthetic.mni("t1")
    small = sitk.Resample(t1, [24, 28, 24], sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(), [8.0] * 3,
                          t1.GetDirection(), 0.0)
    run_gvsl(small, small, iterations=2, spacing=8.0, device=device)


def cases(names, seeds, device="auto"):
    """(case, seed, (fixed, moving, fixed_labels, moving_labels, truth), {method: callable})."""
    for seed in seeds:
        for name in names:
            if name == "same":
                data = synthetic.synthetic_pair(seed)
                methods = {"gvsl": partial(run_gvsl, device=device), "ants_syn": run_ants, "elastix": run_elastix,
                           "sitk": run_sitk}
            elif name == "multimodal":
                data = synthetic.multimodal_pair(seed)
                methods = {"gvsl": partial(run_gvsl, device=device), "ants_syn": run_ants, "elastix": run_elastix}
            elif name == "rigid":
                fixed, moving, truth, _, _ = synthetic.rigid_case(seed)
                labels = synthetic.tissue_labels()
                data = (fixed, moving, sitk.Resample(labels, fixed, truth, sitk.sitkNearestNeighbor, 0), labels, truth)
                methods = {"gvsl_rigid": partial(run_gvsl, mode="rigid", device=device),
                           "ants_rigid": lambda f, m: run_ants(f, m, "Rigid"),
                           "elastix_rigid": lambda f, m: run_elastix(f, m, ("rigid",))}
            else:
                data = synthetic.affine_case(seed)
                methods = {"gvsl_affine": partial(run_gvsl, mode="affine", device=device),
                           "ants_affine": lambda f, m: run_ants(f, m, "Affine"),
                           "elastix_affine": lambda f, m: run_elastix(f, m, ("affine",))}
            yield name, seed, data, methods


PARTIAL = {"slab20": 20.0, "slab40": 40.0, "slab80": 80.0, "half": None, "slab40ct": 40.0,
           "slab20fixed": 20.0, "slab40fixed": 40.0}


def partial_case(name: str, seed: int, device: str = "auto"):
    """(fixed, moving, truth) of a partial field of view and the methods to run on it; seed 0 leaves the
    slab in place (the truth is the identity), others move it."""
    fixed, moving, truth = synthetic.slab_case(PARTIAL[name], seed or None)
    if name.endswith("fixed"):  # the slab is the reference (an intra-operative scan), the whole head moves
        fixed, moving, truth = moving, fixed, truth.GetInverse()
    if name.endswith("ct"):
        fixed = sitk.Resample(synthetic.pseudo_ct(seed), fixed, sitk.Transform(), sitk.sitkLinear, -1000.0)
    methods = {"gvsl_rigid": partial(run_gvsl, mode="rigid", device=device),
               "gvsl": partial(run_gvsl, device=device),
               "ants_rigid": lambda f, m: run_ants(f, m, "Rigid"), "ants_syn": run_ants,
               "elastix_rigid": lambda f, m: run_elastix(f, m, ("rigid",)), "elastix": run_elastix}
    return (fixed, moving, truth), methods


def evaluate_partial(transform, fixed, moving, truth) -> dict:
    error = synthetic.slab_error(transform, truth, fixed, moving)
    return {"error_mean_mm": round(float(error.mean()), 3), "error_p95_mm": round(float(np.percentile(error, 95)), 3)}


def landmark_error(transform, truth, fixed) -> float:
    """Mean distance at six fixed points around the brain centre (as the tests place landmarks)."""
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint(((np.array(fixed.GetSize()) - 1) / 2).tolist()))
    points = centre + np.random.default_rng(7).uniform(-40, 40, (6, 3))
    return float(np.mean([np.linalg.norm(np.subtract(transform.TransformPoint(p.tolist()), truth.TransformPoint(p.tolist())))
                          for p in points]))


def timed_process(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


ANTS_JOB = """import sys, ants
f, m = ants.image_read(sys.argv[1]), ants.image_read(sys.argv[2])
out = ants.registration(f, m, type_of_transform="SyN", outprefix=sys.argv[3] + "/r")
ants.image_write(out["warpedmovout"], sys.argv[3] + "/warped.nii.gz")
"""


def command_line(name: str, seed: int, data, device: str = "auto", repeat: int = 1) -> dict:
    """register.py end to end against ANTs SyN on the same files, in one run; the breakdown from a
    separate import-only process and from the run's own metrics.json. With ``repeat``, the tools take
    turns that many times and the medians are reported: this machine's speed drifts within minutes."""
    fixed, moving, fixed_labels, moving_labels, truth = data
    ants, missing = None, ""
    try:
        import ants
    except ImportError as e:
        missing = f"skipped: {e}"
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {k: f"{tmp}/{k}.nii.gz" for k in ("fixed", "moving")}
        sitk.WriteImage(fixed, files["fixed"])
        sitk.WriteImage(moving, files["moving"])
        ants_dir = Path(tmp) / "ants"
        ants_dir.mkdir()
        for turn in range(repeat):
            out = f"{tmp}/out{turn}"
            times.setdefault("gvsl_cli_s", []).append(timed_process([
                sys.executable, str(ROOT / "GVSLTrainer" / "register.py"), "--fixed", files["fixed"], "--moving",
                files["moving"], "--output-dir", out, "--no-progress", "--device", device]))
            metrics = json.loads(Path(f"{out}/metrics.json").read_text())
            times.setdefault("gvsl_registration_s", []).append(metrics["runtime_s"])
            times.setdefault("gvsl_imports_s", []).append(timed_process([
                sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import gvsl.cli, gvsl.registration.pipeline, "
                "gvsl.registration.inputs, gvsl.registration_io, tqdm.auto", str(ROOT / "GVSLTrainer")]))
            if ants is None:
                continue
            times.setdefault("ants_process_s", []).append(timed_process([
                sys.executable, "-c", ANTS_JOB, files["fixed"], files["moving"], str(ants_dir)]))
            fa, ma = ants.image_read(files["fixed"]), ants.image_read(files["moving"])
            start = time.perf_counter()
            ants.registration(fa, ma, type_of_transform="SyN", outprefix=f"{tmp}/r")
            times.setdefault("ants_syn_registration_s", []).append(time.perf_counter() - start)
    row = {"case": name, "seed": seed, "benchmark": "command_line", "device": device, "repeat": repeat,
           **{k: float(np.median(v)) for k, v in times.items()}}
    row["gvsl_rest_s"] = row["gvsl_cli_s"] - row["gvsl_imports_s"] - row["gvsl_registration_s"]
    row["gvsl_stages_s"] = metrics["timing_s"]  # of the last turn
    if missing:
        row["ants"] = missing
        return _rounded(row)
    row["ratio_cli_to_syn_registration"] = row["gvsl_cli_s"] / row["ants_syn_registration_s"]
    row["ratio_cli_to_ants_process"] = row["gvsl_cli_s"] / row["ants_process_s"]
    if repeat > 1:
        row["ratio_per_turn"] = [round(g / a, 3) for g, a in zip(times["gvsl_cli_s"], times["ants_syn_registration_s"])]
    return _rounded(row)


def _rounded(row: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["same", "multimodal", "rigid", "affine"],
                   choices=["same", "multimodal", "rigid", "affine", *PARTIAL])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", help="only these methods (e.g. gvsl ants_syn)")
    p.add_argument("--model", help="a GVSL checkpoint for a 'gvsl+model' run on the deformable cases as well")
    p.add_argument("--cli", action="store_true", help="also time the command line end to end against ANTs SyN")
    p.add_argument("--repeat", type=int, default=1,
                   help="--cli: the two tools take turns this many times; medians are reported")
    p.add_argument("--device", default="auto", help="gvsl's device (auto, cpu, cuda, mps); the peers run on the CPU")
    args = p.parse_args()
    warm_up(args.device)
    rows = []
    for name in [c for c in args.cases if c in PARTIAL]:
        for seed in args.seeds:
            rows += run_partial(name, seed, args)
    for name, seed, data, methods in cases([c for c in args.cases if c not in PARTIAL], args.seeds, args.device):
        fixed, moving, fixed_labels, moving_labels, truth = data
        if args.model and "gvsl" in methods:
            methods["gvsl+model"] = partial(run_gvsl, model=args.model, device=args.device)
        for method, run in methods.items():
            if args.methods and method not in args.methods:
                continue
            try:
                start = time.perf_counter()
                transform = run(fixed, moving)
                wall = time.perf_counter() - start
            except ImportError as e:
                print(json.dumps({"case": name, "method": method, "skipped": str(e)}), flush=True)
                continue
            row = {"case": name, "method": method, "seed": seed, "device": args.device if "gvsl" in method else "cpu",
                   "wall_s": round(wall, 2),
                   **evaluate(transform, fixed, moving_labels, fixed_labels, truth)}
            if name in ("rigid", "affine"):
                row["tre_mean_mm"] = round(landmark_error(transform, truth, fixed), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.cli and name in ("same", "multimodal"):
            print(json.dumps(command_line(name, seed, data, args.device, args.repeat)), flush=True)
    keys = ("wall_s", "epe_mean_mm", "dice_gm", "dice_wm", "folding_percent", "tre_mean_mm", "error_mean_mm",
            "error_p95_mm")
    for case, method in dict.fromkeys((r["case"], r["method"]) for r in rows):
        mine = [r for r in rows if r["case"] == case and r["method"] == method and "failed" not in r]
        failed = sum(r["case"] == case and r["method"] == method and "failed" in r for r in rows)
        means = {k: round(float(np.mean([r[k] for r in mine])), 4) for k in keys if mine and k in mine[0]}
        print(json.dumps({"summary": method, "case": case, **means, **({"failed": failed} if failed else {})}),
              flush=True)


def run_partial(name: str, seed: int, args) -> list[dict]:
    (fixed, moving, truth), methods = partial_case(name, seed, args.device)
    rows = []
    for method, run in methods.items():
        if args.methods and method not in args.methods:
            continue
        row = {"case": name, "method": method, "seed": seed, "device": args.device if "gvsl" in method else "cpu"}
        try:
            start = time.perf_counter()
            transform = run(fixed, moving)
            row["wall_s"] = round(time.perf_counter() - start, 2)
        except ImportError as e:
            print(json.dumps({**row, "skipped": str(e)}), flush=True)
            continue
        except Exception as e:  # elastix stops on a thin slab ("too many samples map outside moving image buffer")
            row["failed"] = str(e).strip().splitlines()[-1][:200]
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        row.update(evaluate_partial(transform, fixed, moving, truth))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
