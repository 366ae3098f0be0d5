"""What a cohort costs end to end: cohort.py on Dask next to register.py run once per subject.

Subjects: the MNI T1 at 2 mm moved by known rigid motions (one per seed), onto the template at 2 mm,
with register.py's defaults (deformable). Each configuration is timed from process start to every
subject's outputs written, in one run, and reported as subjects per minute with the ratio to the loop:

    python benchmarks/cohort.py --subjects 6 [--configurations loop 1x2 2x1]

Prints one JSON line per configuration, then a summary line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))
import synthetic  # noqa: E402


def make_cohort(folder: Path, n: int) -> Path:
    t1 = synthetic.mni("t1")
    atlas = sitk.Resample(t1, [int(round(s / 2)) for s in t1.GetSize()], sitk.Transform(), sitk.sitkLinear,
                          t1.GetOrigin(), [2.0] * 3, t1.GetDirection(), 0.0)
    sitk.WriteImage(atlas, str(folder / "atlas.nii.gz"))
    (folder / "scans").mkdir()
    centre = atlas.TransformContinuousIndexToPhysicalPoint(((np.array(atlas.GetSize()) - 1) / 2).tolist())
    rng = np.random.default_rng(0)
    for i in range(n):
        motion = sitk.Euler3DTransform(centre, *np.radians(rng.uniform(-8, 8, 3)), rng.uniform(-8, 8, 3).tolist())
        sitk.WriteImage(synthetic.moved_in_space(atlas, motion), str(folder / "scans" / f"sub-{i:02d}.nii.gz"))
    return folder


def run(configuration: str, folder: Path, out: Path) -> float:
    scans = sorted((folder / "scans").iterdir())
    start = time.perf_counter()
    if configuration == "loop":
        for scan in scans:
            subprocess.run([sys.executable, str(ROOT / "GVSLTrainer" / "register.py"), "--fixed",
                            str(folder / "atlas.nii.gz"), "--moving", str(scan), "--output-dir",
                            str(out / scan.name.split(".")[0]), "--no-progress"], check=True, capture_output=True)
    else:
        workers, threads = configuration.split("x")
        subprocess.run([sys.executable, str(ROOT / "GVSLTrainer" / "cohort.py"), "register", "--fixed",
                        str(folder / "atlas.nii.gz"), "--moving", str(folder / "scans"), "--output-dir", str(out),
                        "--workers", workers, "--threads-per-worker", threads, "--no-progress"],
                       check=True, capture_output=True)
    seconds = time.perf_counter() - start
    written = [d for d in out.iterdir() if (d / "metrics.json").is_file()]
    assert len(written) == len(scans), f"{configuration}: {len(written)} of {len(scans)} subjects written"
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=6)
    p.add_argument("--configurations", nargs="+", default=["loop", "1x2", "2x1"],
                   help="loop (register.py per subject) or WORKERSxTHREADS of cohort.py's local cluster")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_cohort(Path(tmp), args.subjects)
        for configuration in args.configurations:
            seconds = run(configuration, folder, Path(tmp) / f"out-{configuration}")
            results[configuration] = seconds
            print(json.dumps({"configuration": configuration, "subjects": args.subjects, "wall_s": round(seconds, 1),
                              "subjects_per_minute": round(60 * args.subjects / seconds, 2)}), flush=True)
    if "loop" in results:
        print(json.dumps({"summary": "ratio to the loop of register.py processes (>1: the cohort is faster)",
                          **{c: round(results["loop"] / s, 2) for c, s in results.items() if c != "loop"}}))


if __name__ == "__main__":
    main()
