"""Multi-atlas segmentation, side by side: cohort.py label-fusion against ANTs SyN + joint label fusion.

The heads are the cohort benchmark's (the MNI T1 on its own oblique grid under a random affine and a
smooth field of 6-11 mm, the AAL regions carried along; benchmarks/cohort.py). The first ``--atlases``
are atlases, the next ``--targets`` are held-out targets whose own AAL labels are the truth. Per
target, in one run:

- ``gvsl_weighted`` / ``gvsl_majority``: ``cohort.py label-fusion`` end to end (2 workers), then the
  same registrations fused by majority;
- ``gvsl_best_atlas`` / ``gvsl_mean_atlas``: the single atlases' propagated labels (the best, the mean);
- ``ants_jlf``: antspyx SyN of every atlas onto the target (2 processes of one ITK thread, as the
  cohort benchmark runs ANTs), labels by nearest neighbour, then ``ants.joint_label_fusion`` with its
  defaults on a head mask; ``ants_majority``: the same registrations fused by majority.

Dice is the mean over the AAL regions present in the target. Prints one JSON line per target and
method, then a summary with the means:

    python benchmarks/label_fusion.py --atlases 5 --targets 2
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GVSLTrainer"))
_spec = importlib.util.spec_from_file_location("cohort_benchmark", Path(__file__).with_name("cohort.py"))
cohort_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cohort_benchmark)

from gvsl.cohort.fusion import fuse  # noqa: E402


def mean_dice(found: np.ndarray, truth: np.ndarray) -> float:
    scores = [2 * ((found == v) & (truth == v)).sum() / ((found == v).sum() + (truth == v).sum())
              for v in np.unique(truth[truth > 0])]
    return float(np.mean(scores))


def _ants_pair(target: str, atlas: str, labels: str, out: str) -> float:
    import ants

    start = time.perf_counter()
    fixed = ants.image_read(target)
    result = ants.registration(fixed, ants.image_read(atlas), type_of_transform="SyN", outprefix=f"{out}_")
    ants.image_write(result["warpedmovout"], f"{out}_warped.nii.gz")
    warped = ants.apply_transforms(fixed, ants.image_read(labels), result["fwdtransforms"],
                                   interpolator="nearestNeighbor")
    ants.image_write(warped, f"{out}_labels.nii.gz")
    return time.perf_counter() - start


def run_ants(target: Path, atlases: list[tuple[Path, Path]], work: Path) -> dict:
    import ants

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    start = time.perf_counter()
    outs = [str(work / f"ants_{i}") for i in range(len(atlases))]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_ants_pair, [str(target)] * len(atlases), [str(a) for a, _ in atlases],
                      [str(lab) for _, lab in atlases], outs))
    registered = time.perf_counter() - start
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "2"  # JLF on both cores
    fixed = ants.image_read(str(target))
    mask = ants.get_mask(fixed)
    images = [ants.image_read(f"{o}_warped.nii.gz") for o in outs]
    labels = [ants.image_read(f"{o}_labels.nii.gz") for o in outs]
    jlf = ants.joint_label_fusion(fixed, mask, atlas_list=images, label_list=labels)
    ants.image_write(jlf["segmentation"], str(work / "ants_jlf.nii.gz"))
    return {"seconds": time.perf_counter() - start, "registration_s": registered,
            "jlf": sitk.GetArrayFromImage(sitk.ReadImage(str(work / "ants_jlf.nii.gz"))),
            "images": [sitk.ReadImage(f"{o}_warped.nii.gz") for o in outs],
            "labels": [sitk.ReadImage(f"{o}_labels.nii.gz") for o in outs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlases", type=int, default=5)
    p.add_argument("--targets", type=int, default=2)
    p.add_argument("--no-ants", action="store_true")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cohort_benchmark.make_cohort(folder, args.atlases + args.targets, 6.0, 11.0)
        names = [f"sub-{i:02d}" for i in range(args.atlases + args.targets)]
        atlases = [(folder / "scans" / f"{n}.nii.gz", folder / "labels" / f"{n}.nii.gz") for n in names[:args.atlases]]
        (folder / "atlases.csv").write_text("image,labels\n" + "".join(f"{a},{lab}\n" for a, lab in atlases))
        for name in names[args.atlases:]:
            target = folder / "scans" / f"{name}.nii.gz"
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels" / f"{name}.nii.gz")))
            out = folder / f"{name}_fused.nii.gz"
            start = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "GVSLTrainer" / "cohort.py"), "label-fusion", "--target",
                            str(target), "--atlases", str(folder / "atlases.csv"), "--output", str(out),
                            "--no-progress"], check=True, capture_output=True)
            seconds = time.perf_counter() - start
            work = Path(f"{out}.registrations")
            warped = [sitk.ReadImage(str(work / a.name.split(".")[0] / "warped.nii.gz")) for a, _ in atlases]
            labels = [sitk.ReadImage(str(work / a.name.split(".")[0] / "warped_labels.nii.gz")) for a, _ in atlases]
            target_image = sitk.ReadImage(str(target))
            singles = [mean_dice(sitk.GetArrayFromImage(lab), truth) for lab in labels]
            found = {"gvsl_weighted": (mean_dice(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), truth), seconds),
                     "gvsl_majority": (mean_dice(sitk.GetArrayFromImage(
                         fuse(target_image, warped, labels, "majority").labels), truth), None),
                     "gvsl_best_atlas": (max(singles), None), "gvsl_mean_atlas": (float(np.mean(singles)), None)}
            if not args.no_ants:
                ants_dir = folder / f"{name}_ants"
                ants_dir.mkdir()
                ants = run_ants(target, atlases, ants_dir)
                found["ants_jlf"] = (mean_dice(ants["jlf"], truth), ants["seconds"])
                found["ants_majority"] = (mean_dice(sitk.GetArrayFromImage(
                    fuse(target_image, ants["images"], ants["labels"], "majority").labels), truth), None)
            for method, (dice, wall) in found.items():
                row = {"target": name, "method": method, "atlases": args.atlases, "dice_aal": round(dice, 4)}
                if wall is not None:
                    row["wall_s"] = round(wall, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    methods = sorted({r["method"] for r in rows})
    summary = {m: round(float(np.mean([r["dice_aal"] for r in rows if r["method"] == m])), 4) for m in methods}
    walls = {f"{m}_wall_s": round(float(np.mean([r["wall_s"] for r in rows if r["method"] == m and "wall_s" in r])), 1)
             for m in methods if any("wall_s" in r for r in rows if r["method"] == m)}
    print(json.dumps({"summary": "mean AAL Dice over the targets, and wall time per target", **summary, **walls}))


if __name__ == "__main__":
    main()
