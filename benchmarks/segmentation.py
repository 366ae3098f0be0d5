#!/usr/bin/env python
"""Segmentation: inference cost on a large CT, and what GVSL pre-training buys when fine-tuning.

    python benchmarks/segmentation.py inference [--size 512 512 300] [--width 32] [--device cpu]
    python benchmarks/segmentation.py learning-curve [--pretrain-steps 400] [--finetune-steps 240]
    python benchmarks/segmentation.py compare [--steps 600] [--seeds 0 1]
    python benchmarks/segmentation.py pretext [--pretrain-steps 300]

``inference`` segments a CT-sized volume (real anatomy, the MNI head resampled onto a
0.7 x 0.7 x 1.0 mm grid of the given size, in Hounsfield-like units) with a width-32 model at the
fine-tuning defaults (1.5 mm, 128^3 windows, overlap 0.5). Weights are random: they do not change
the cost. Same-run baseline: the network alone (one forward pass per window), so the ratio shows
what the pipeline (pre-processing, blending, resampling back) adds. Peak memory is the process's
maximum resident set.

``learning-curve`` builds a small real task (the MNI T1 under random deformations and intensity
changes, grey/white-matter labels from the MNI probability maps; training and validation cases
deformed differently), pre-trains a GVSL model on the training images without their labels, then
fine-tunes from scratch and from that backbone with the same seed, steps and data, and prints the
validation Dice of both at every validation. One JSON line per measurement.

``compare`` measures fine-tuning on small structures against MONAI's standard recipe
(``monai_recipe.py``): five regions of the Neuromorphometrics atlas from 82000 down to 375 voxels,
on cases made from the MNI T1 by random deformations and intensity curves; GVSL from scratch, GVSL
from a backbone pre-trained on the training images, and BasicUNet with RandCropByLabelClassesd,
DiceCELoss and Adam, with the same cases, split, steps, crop, batch, learning rate and seed. Prints
per-class and mean held-out Dice at every validation. Its pre-training is followed by the check
that ``pretext`` runs alone.

``pretext`` pre-trains as ``compare`` does, then registers held-out pairs of crops with the
pre-trained network (``pretext_check.py``): local NCC and label Dice unregistered, after its affine,
and after affine and displacement. Where the Z-matching heads learned nothing the three agree, and
pre-training was restoration alone.
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GVSLTrainer"))
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import synthetic  # noqa: E402
from gvsl import checkpoint  # noqa: E402
from gvsl.labels import LabelSpec  # noqa: E402
from gvsl.networks import GVSLSegmenter  # noqa: E402
from gvsl.runtime import autocast_dtype, resolve_device, synchronize  # noqa: E402
from gvsl.segmentation import SegmentationOptions, segment  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


def ct_like(size: tuple[int, int, int], spacing=(0.7, 0.7, 1.0)) -> sitk.Image:
    """The MNI head on a CT-sized grid, intensities stretched to [-1000, 1000]."""
    t1 = synthetic.mni("t1")
    centre = t1.TransformContinuousIndexToPhysicalPoint(((np.array(t1.GetSize()) - 1) / 2).tolist())
    origin = np.array(centre) - (np.array(size) - 1) * np.array(spacing) / 2
    img = sitk.Resample(t1, list(size), sitk.Transform(), sitk.sitkLinear, origin.tolist(), list(spacing),
                        t1.GetDirection(), 0.0, sitk.sitkFloat32)
    return img * (2000.0 / 100.0) - 1000.0


def inference(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    spec = LabelSpec([0, 1, 2], ["background", "grey matter", "white matter"])
    model = GVSLSegmenter(spec.num_classes, width=args.width)
    opts = SegmentationOptions(device=args.device, tta=args.tta, amp=args.amp)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(Path(tmp) / "model.pt", model, "segmentation", {
            "width": args.width, "in_channels": 1, "labels": spec.as_dict(), "normalize": "ct",
            "spacing": [1.5] * 3, "crop": [args.window] * 3})
        ckpt = checkpoint.load(path)
        image = ct_like(tuple(args.size))
        rss_input = peak_rss_gb()
        # pay one-off costs (imports, oneDNN kernel selection) before timing
        segment(ct_like((64, 64, 64)), ckpt, opts)
        t0 = time.perf_counter()
        result = segment(image, ckpt, opts, progress=args.progress)
        total = time.perf_counter() - t0
    assert result.labels.GetSize() == image.GetSize()

    # baseline in the same run: the network alone, once per window of the same sliding-window grid
    from gvsl.data import Preprocessing
    from gvsl.segmentation import window_count

    window = (args.window,) * 3
    prepared = tuple(Preprocessing((1.5,) * 3, "ct").prepare(image)[1].shape)
    n_windows = window_count(prepared, window, opts.overlap) * (4 if args.tta else 1)
    x = torch.zeros(opts.sw_batch_size, 1, *window, device=device)
    model = model.to(device).eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype(device), enabled=args.amp):
        model(x)
        synchronize(device)
        t0 = time.perf_counter()
        model(x)
        synchronize(device)
        per_batch = time.perf_counter() - t0
    network_only = per_batch * n_windows / opts.sw_batch_size
    print(json.dumps({"benchmark": "segmentation_inference", "size": list(image.GetSize()),
                      "spacing": list(image.GetSpacing()), "width": args.width, "window": args.window,
                      "tta": args.tta, "amp": args.amp, "device": str(device), "windows": n_windows,
                      "wall_s": round(total, 1), "network_only_s": round(network_only, 1),
                      "ratio_total_to_network": round(total / network_only, 2),
                      "input_gb": round(np.prod(image.GetSize()) * 4 / 1024 ** 3, 2),
                      "rss_before_gb": round(rss_input, 2), "peak_rss_gb": round(peak_rss_gb(), 2),
                      "threads": torch.get_num_threads()}), flush=True)


def make_task(folder: Path, n_cases: int, pretrain_cases: list[int]) -> Path:
    """An MSD-style dataset.json of deformed MNI heads (1.5 mm) with grey/white-matter labels, and
    ``unlabelled.txt`` listing the images of ``pretrain_cases`` (the self-supervised part)."""
    entries = synthetic.labelled_cases(folder, synthetic.mni("t1"), synthetic.tissue_labels(),
                                       {1: "grey matter", 2: "white matter"}, n_cases, (112, 128, 112), 1.5,
                                       angle_step=0.1, angle_period=3, seed=100, max_field_mm=6.0,
                                       intensity_scale=100.0, noise_max=4)
    (folder / "unlabelled.txt").write_text("\n".join(entries[i]["image"] for i in pretrain_cases))
    return folder / "dataset.json"


def learning_curve(args: argparse.Namespace) -> None:
    import csv

    from gvsl import finetune, pretrain
    from gvsl.config import PretrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n, val_fraction = args.cases + 2, 2 / (args.cases + 2)
        train_idx, _ = finetune.split_cases(n, val_fraction, seed=args.seed)  # the split fine-tuning will use
        dataset = make_task(tmp / "task", n, train_idx)  # pre-training never sees the validation cases
        common = dict(crop=tuple(args.crop), width=args.width, batch_size=2, spacing=(1.5, 1.5, 1.5),
                      normalize="mr", workers=0, progress=args.progress, cache_dir=str(tmp / "cache"),
                      device=args.device, seed=args.seed, norm=finetune.FinetuneConfig.norm)  # one network
        t0 = time.perf_counter()
        pretrain.train(PretrainConfig(data=str(tmp / "task/unlabelled.txt"), output_dir=str(tmp / "pre"),
                                      steps=args.pretrain_steps, checkpoint_every=10 ** 9, lr=args.pretrain_lr,
                                      **common))
        print(json.dumps({"benchmark": "segmentation_pretrain", "steps": args.pretrain_steps,
                          "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
        curves = {}
        for name, pre in (("scratch", None), ("gvsl", str(tmp / "pre/gvsl_pretrained.pt"))):
            out = tmp / f"ft_{name}"
            t0 = time.perf_counter()
            _, best = finetune.train(finetune.FinetuneConfig(
                data=str(dataset), output_dir=str(out), steps=args.finetune_steps, val_every=args.val_every,
                val_fraction=val_fraction, pretrained=pre, lr=args.lr, checkpoint_every=10 ** 9,
                **common))
            with open(out / "log.csv") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) % args.val_every == 0]
            curves[name] = {int(r["step"]): round(float(r["val_dice"]), 4) for r in rows}
            wall = time.perf_counter() - t0
            print(json.dumps({"benchmark": "segmentation_finetune", "init": name, "best_val_dice": round(best, 4),
                              "val_dice_by_step": curves[name], "steps": args.finetune_steps, "wall_s": round(wall, 1),
                              "steps_per_s_with_validation": round(args.finetune_steps / wall, 2)}), flush=True)
        steps = sorted(set(curves["scratch"]) & set(curves["gvsl"]))
        print(json.dumps({"benchmark": "segmentation_learning_curve", "steps": steps,
                          "scratch": [curves["scratch"][s] for s in steps], "gvsl": [curves["gvsl"][s] for s in steps],
                          "width": args.width, "crop": args.crop, "pretrain_steps": args.pretrain_steps,
                          "training_cases": args.cases, "seed": args.seed}), flush=True)


class AtlasTask(NamedTuple):
    dataset: Path  # dataset.json of the labelled cases
    entries: list[dict]
    train_idx: list[int]
    val_idx: list[int]
    unlabelled: list[str]  # the images pre-training sees: training cases and the extra unlabelled ones

    @property
    def val_fraction(self) -> float:
        return len(self.val_idx) / len(self.entries)


def atlas_options(args: argparse.Namespace) -> dict:
    """The settings that pre-training and fine-tuning share on the atlas task."""
    return dict(crop=tuple(args.crop), width=args.width, batch_size=args.batch_size, spacing=(1.5, 1.5, 1.5),
                normalize="mr", workers=0, progress=args.progress, device=args.device, norm=args.norm)


def atlas_split(tmp: Path, args: argparse.Namespace) -> AtlasTask:
    """The atlas task of ``compare`` and ``pretext``: cases are fixed by their index, and one held-out
    split serves every run."""
    from gvsl import finetune

    import monai_recipe

    n = args.cases + args.held_out
    dataset = monai_recipe.atlas_task(tmp / "task", n + args.unlabelled_cases)
    spec = json.loads(dataset.read_text())
    entries, extra = spec["training"][:n], spec["training"][n:]
    dataset.write_text(json.dumps({**spec, "training": entries}))  # the extra cases' labels go unused
    train_idx, val_idx = finetune.split_cases(n, args.held_out / n, seed=0)
    unlabelled = [entries[i]["image"] for i in train_idx] + [e["image"] for e in extra]
    return AtlasTask(dataset, entries, train_idx, val_idx, unlabelled)


def pretrain_and_check(tmp: Path, args: argparse.Namespace, task: AtlasTask) -> Path:
    """Pre-train on the task's unlabelled images, then register held-out pairs with the result
    (``pretext_check``); prints a JSON line for each, returns the pre-trained checkpoint."""
    from gvsl import data, pretrain
    from gvsl.config import PretrainConfig

    import pretext_check

    (tmp / "unlabelled.txt").write_text("\n".join(task.unlabelled))
    t0 = time.perf_counter()
    options = atlas_options(args)
    pretrain.train(PretrainConfig(data=str(tmp / "unlabelled.txt"), output_dir=str(tmp / "pre"),
                                  steps=args.pretrain_steps, checkpoint_every=10 ** 9, cache_dir=str(tmp / "pc"),
                                  seed=0, lr=args.pretrain_lr, **options))
    wall = time.perf_counter() - t0
    with open(tmp / "pre/log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses = {f"{k}_{when}": round(float(row[k]), 4) for when, row in (("first", rows[0]), ("last", rows[-1]))
              for k in ("ncc", "mse")}  # the pretext tasks, first and last logging window
    print(json.dumps({"benchmark": "segmentation_compare_pretrain", "steps": args.pretrain_steps,
                      "images": len(task.unlabelled), **losses, "wall_s": round(wall, 1)}), flush=True)

    final = tmp / "pre" / pretrain.FINAL
    held_out = [task.entries[i] for i in task.val_idx]
    if len(held_out) < 2:
        print("No registration check: it needs 2 or more held-out cases", file=sys.stderr)
        return final
    model = checkpoint.build_gvsl(checkpoint.load(final)).to(resolve_device(args.device))
    preprocessing = data.Preprocessing(options["spacing"], options["normalize"])
    store = data.VolumeStore([Path(e["image"]) for e in held_out], preprocessing, tmp / "hc", progress=False,
                             labels=[Path(e["label"]) for e in held_out],
                             spec=LabelSpec.from_mapping(json.loads(task.dataset.read_text())["labels"]))
    quality = pretext_check.registration_quality(model, [store[i] for i in range(len(store))], args.crop,
                                                 args.check_positions)
    pairs = args.check_positions * len(held_out) * (len(held_out) - 1)
    print(json.dumps({"benchmark": "segmentation_pretext", "steps": args.pretrain_steps,
                      "images": len(task.unlabelled), "pairs": pairs, **quality}), flush=True)
    return final


def pretext(args: argparse.Namespace) -> None:
    """Pre-train on the atlas task's unlabelled images and check that the result registers held-out pairs."""
    with tempfile.TemporaryDirectory() as tmp:
        pretrain_and_check(Path(tmp), args, atlas_split(Path(tmp), args))


def compare(args: argparse.Namespace) -> None:
    """GVSL fine-tuning from scratch and from a GVSL backbone against MONAI's recipe on the atlas task:
    the same cases, held-out split, steps, crop, batch, learning rate and seed."""
    from gvsl import finetune

    import monai_recipe

    names = list(monai_recipe.REGIONS.values())

    def show(run: str, seed: int, step: int, per_class: list[float]) -> None:
        print(json.dumps({"benchmark": "segmentation_compare", "run": run, "seed": seed, "step": step,
                          "mean_dice": round(float(np.mean(per_class)), 4), **dict(zip(names, per_class))}), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        task = atlas_split(tmp, args)
        entries, train_idx, val_idx = task.entries, task.train_idx, task.val_idx
        common = {**atlas_options(args), "lr": args.lr}
        if "gvsl_pretrained" in args.runs:
            pretrain_and_check(tmp, args, task)
        # GVSL's training options under test; runs are labelled by those that differ from the defaults
        options = {"augment": args.augment, "intensity_augment": args.intensity_augment,
                   "augment_rate": args.augment_rate, "lr_schedule": args.lr_schedule,
                   "warmup_steps": args.warmup_steps, "foreground_rate": args.foreground_rate}
        defaults = finetune.FinetuneConfig()
        changes = [f"{k.replace('_', ' ')} {v}" for k, v in {**options, "norm": args.norm}.items()
                   if getattr(defaults, k) != v]
        changed = f" ({', '.join(changes)})" if changes else ""
        for seed in args.seeds:
            for run, pre in (("gvsl_scratch", None), ("gvsl_pretrained", str(tmp / "pre/gvsl_pretrained.pt"))):
                if run not in args.runs:
                    continue
                out = tmp / f"{run}_{seed}"
                t0 = time.perf_counter()
                finetune.train(finetune.FinetuneConfig(
                    data=str(task.dataset), output_dir=str(out), steps=args.steps, val_every=args.val_every,
                    val_fraction=task.val_fraction, pretrained=pre, checkpoint_every=10 ** 9, seed=seed,
                    cache_dir=str(tmp / "fc"), **options, **common))
                label = run + changed
                for step, per_class in monai_recipe.gvsl_curve(out / "log.csv").items():
                    show(label, seed, step, per_class)
                print(json.dumps({"benchmark": "segmentation_compare_wall", "run": label, "seed": seed,
                                  "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
            if "monai_basicunet" not in args.runs:
                continue
            t0 = time.perf_counter()
            monai_recipe.monai_recipe([entries[i] for i in train_idx], [entries[i] for i in val_idx], args.steps,
                                      args.crop, args.batch_size, args.lr, seed, args.val_every, args.device,
                                      report=lambda step, per_class: show("monai_basicunet", seed, step, per_class),
                                      features=monai_recipe.BASIC_UNET_FEATURES[args.width])
            print(json.dumps({"benchmark": "segmentation_compare_wall", "run": "monai_basicunet", "seed": seed,
                              "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)


def main() -> None:
    from monai_recipe import BASIC_UNET_FEATURES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    inf = sub.add_parser("inference", help="wall time and peak memory on a CT-sized volume")
    inf.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], help="x y z voxels")
    inf.add_argument("--width", type=int, default=32)
    inf.add_argument("--window", type=int, default=128)
    inf.add_argument("--tta", action="store_true")
    inf.add_argument("--amp", action="store_true", help="mixed precision for the network (GPU)")
    lc = sub.add_parser("learning-curve", help="fine-tuning from scratch vs from a GVSL backbone")
    lc.add_argument("--cases", type=int, default=4, help="training cases (2 more are validation)")
    lc.add_argument("--width", type=int, default=8)
    lc.add_argument("--crop", type=int, nargs=3, default=[48, 48, 48])
    lc.add_argument("--pretrain-steps", type=int, default=400)
    lc.add_argument("--pretrain-lr", type=float, default=1e-3)
    lc.add_argument("--finetune-steps", type=int, default=240)
    lc.add_argument("--val-every", type=int, default=40)
    lc.add_argument("--lr", type=float, default=1e-3)
    lc.add_argument("--seed", type=int, default=0, help="weights, crops, augmentation and the validation split")
    from gvsl.augment import SPATIAL_LEVELS
    from gvsl.choices import NORMS
    from gvsl.finetune import FinetuneConfig
    from gvsl.schedule import SCHEDULES

    gvsl = FinetuneConfig()  # GVSL's options default to fine-tuning's own defaults
    cmp = sub.add_parser("compare", help="GVSL fine-tuning (scratch, pre-trained) vs MONAI's recipe, small "
                                         "structures of an atlas")
    pre = sub.add_parser("pretext", help="pre-train on the atlas task, then register held-out pairs with the "
                                         "result: whether the Z-matching heads learned")
    for p in (cmp, pre):
        p.add_argument("--cases", type=int, default=6, help="training cases")
        p.add_argument("--held-out", type=int, default=2, help="held-out cases")
        p.add_argument("--width", type=int, default=8, choices=sorted(BASIC_UNET_FEATURES),
                       help="GVSL's width; MONAI's BasicUNet gets a similar parameter count (8: 1.4 M, 16: 5.8 M)")
        p.add_argument("--crop", type=int, nargs=3, default=[32, 32, 32])
        p.add_argument("--batch-size", type=int, default=2)
        p.add_argument("--pretrain-steps", type=int, default=300)
        p.add_argument("--pretrain-lr", type=float, default=1e-3)
        p.add_argument("--unlabelled-cases", type=int, default=0,
                       help="more cases, made as the others, that only pre-training sees (without labels), as "
                            "self-supervised learning has more unlabelled scans than labelled ones")
        p.add_argument("--check-positions", type=int, default=30,
                       help="crop places of the held-out registration check (each registers every ordered pair "
                            "of held-out cases)")
        p.add_argument("--norm", default=gvsl.norm, choices=NORMS,
                       help="GVSL's normalisation, in pre-training and fine-tuning alike")
    cmp.add_argument("--steps", type=int, default=600)
    cmp.add_argument("--val-every", type=int, default=150)
    cmp.add_argument("--lr", type=float, default=1e-3)
    cmp.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    cmp.add_argument("--runs", nargs="+", default=["gvsl_scratch", "gvsl_pretrained", "monai_basicunet"],
                     choices=["gvsl_scratch", "gvsl_pretrained", "monai_basicunet"])
    cmp.add_argument("--augment", default=gvsl.augment, choices=SPATIAL_LEVELS,
                     help="GVSL's spatial augmentation (MONAI's recipe here has none)")
    cmp.add_argument("--intensity-augment", action=argparse.BooleanOptionalAction, default=gvsl.intensity_augment)
    cmp.add_argument("--augment-rate", type=float, default=gvsl.augment_rate, help="GVSL's share of augmented crops")
    cmp.add_argument("--warmup-steps", type=int, default=gvsl.warmup_steps,
                     help="GVSL's warm-up (at most a tenth of --steps)")
    cmp.add_argument("--foreground-rate", type=float, default=gvsl.foreground_rate,
                     help="GVSL's share of class-centred crops (default: n/(n+1) for n classes)")
    cmp.add_argument("--lr-schedule", default=gvsl.lr_schedule, choices=SCHEDULES,
                     help="GVSL's schedule (MONAI's recipe here keeps the rate constant)")
    for p in (inf, lc, cmp, pre):
        p.add_argument("--device", default="cpu")
        p.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    jobs = {"inference": inference, "learning-curve": learning_curve, "compare": compare, "pretext": pretext}
    jobs[args.what](args)


if __name__ == "__main__":
    main()
