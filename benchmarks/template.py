"""A population template, side by side: cohort.py template against ants.build_template.

The subjects are the cohort benchmark's heads (the MNI T1 on its own oblique grid under a random
affine and a smooth field of 6-11 mm; benchmarks/cohort.py), whose deformations are drawn around the
MNI head: the shape both templates should approach. Both tools get the same subjects and iterations
and run on the same 2 cores (cohort.py: 2 workers of one thread; ANTs: its own threads). Then, the
same way for both:

- sharpness: every subject registered onto the template (gvsl, the same options for both), and the
  mean local correlation of the warped subjects with the template over its foreground;
- distance to the mean shape: the mean displacement of a deformable registration of the template
  onto the MNI head, inside the head (after an affine, so a template's pose does not count).

    python benchmarks/template.py --subjects 8 --iterations 3
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GVSLTrainer"))
_spec = importlib.util.spec_from_file_location("cohort_benchmark", Path(__file__).with_name("cohort.py"))
cohort_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cohort_benchmark)

from gvsl.cohort.template import _sharpness  # noqa: E402
from gvsl.registration import RegistrationOptions, register  # noqa: E402


def ants_template(scans: list[Path], iterations: int, out: Path) -> float:
    import ants

    start = time.perf_counter()
    template = ants.build_template(image_list=[ants.image_read(str(s)) for s in scans], iterations=iterations)
    ants.image_write(template, str(out))
    return time.perf_counter() - start


def sharpness(template: sitk.Image, scans: list[Path]) -> float:
    warped = [register(template, sitk.ReadImage(str(s), sitk.sitkFloat32)).warped for s in scans]
    return _sharpness(template, [sitk.Cast(w, sitk.sitkFloat32) for w in warped])


def distance_to_mean_shape(template: sitk.Image, head: sitk.Image) -> float:
    result = register(head, template, options=RegistrationOptions())
    grid = head
    total = sitk.TransformToDisplacementField(result.transform, sitk.sitkVectorFloat64, grid.GetSize(),
                                              grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
    linear = sitk.TransformToDisplacementField(result.affine, sitk.sitkVectorFloat64, grid.GetSize(),
                                               grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
    arr = sitk.GetArrayFromImage(head)
    inside = arr > 0.15 * arr.max()
    return float(np.linalg.norm(sitk.GetArrayFromImage(total) - sitk.GetArrayFromImage(linear), axis=-1)[inside].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--no-ants", action="store_true")
    p.add_argument("--gvsl-options", default="", help="register.py options for cohort.py template, quoted "
                                                      "(e.g. \"--iterations 50\")")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cohort_benchmark.make_cohort(folder, args.subjects, 6.0, 11.0)
        scans = sorted((folder / "scans").iterdir())
        head = sitk.ReadImage(str(folder / "atlas.nii.gz"), sitk.sitkFloat32)
        results = {}
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "GVSLTrainer" / "cohort.py"), "template", "--input",
                        str(folder / "scans"), "--output-dir", str(folder / "gvsl"), "--iterations",
                        str(args.iterations), "--no-progress", *shlex.split(args.gvsl_options)], check=True,
                       capture_output=True)
        results["gvsl"] = (time.perf_counter() - start, folder / "gvsl" / "template.nii.gz")
        if not args.no_ants:
            results["ants"] = (ants_template(scans, args.iterations, folder / "ants.nii.gz"), folder / "ants.nii.gz")
        for tool, (seconds, path) in results.items():
            template = sitk.ReadImage(str(path), sitk.sitkFloat32)
            row = {"tool": tool, "subjects": args.subjects, "iterations": args.iterations, "wall_s": round(seconds, 1),
                   **({"options": args.gvsl_options} if tool == "gvsl" and args.gvsl_options else {}),
                   "sharpness": round(sharpness(template, scans), 4),
                   "distance_to_mean_shape_mm": round(distance_to_mean_shape(template, head), 3)}
            print(json.dumps(row), flush=True)
        if "ants" in results:
            print(json.dumps({"summary": "wall time of gvsl as a share of ants.build_template's",
                              "ratio": round(results["gvsl"][0] / results["ants"][0], 2)}))


if __name__ == "__main__":
    main()
