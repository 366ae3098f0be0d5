#!/usr/bin/env python
"""Time GVSL pre-training steps, and a reference-style step on the same data, model and machine.

Prints one JSON line per implementation and one with their ratio:
    python benchmarks/pretrain_step.py --crop 64 64 64 --batch-size 1 --width 32 --device cpu --steps 5

Times are medians over --steps after --warmup steps. "data_share" is the part of a step spent
waiting for the DataLoader plus augmenting on the device. Peak memory is the GPU's
max_memory_allocated on CUDA, else the process's peak resident set size (which only grows, so
the baseline, measured second, reports the higher of the two).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GVSLTrainer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gvsl import data, demo, runtime  # noqa: E402
from gvsl.losses import GVSLLoss  # noqa: E402
from gvsl.networks import GVSL  # noqa: E402
from gvsl.pretrain import TrainingStep  # noqa: E402
from gvsl.training import amp_settings  # noqa: E402
from gvsl.config import PretrainConfig  # noqa: E402
import reference_style  # noqa: E402



def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(args, store, device):
    pairs = data.PairCrops(store, args.crop, seed=0, length=(args.steps + args.warmup + 1) * args.batch_size)
    loader = torch.utils.data.DataLoader(pairs, batch_size=args.batch_size, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    return iter(loader)


def time_gvsl(args, store, device) -> dict:
    torch.manual_seed(0)
    model = GVSL(width=args.width).to(device)
    args.channels_last = runtime.use_channels_last(args.channels_last, device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    cfg = PretrainConfig(amp=args.amp)
    amp_dtype, need_scaler = amp_settings(cfg, device)
    stepper = TrainingStep(model, torch.optim.Adam(model.parameters(), 1e-4),
                           torch.amp.GradScaler(device.type, enabled=need_scaler), GVSLLoss(), amp_dtype,
                           args.channels_last)
    gen = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, shares = [], []
    it = batches(args, store, device)
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        fixed, moving = next(it)
        views = stepper.augment(fixed, moving, gen)
        runtime.synchronize(device)
        t1 = time.perf_counter()
        stepper.optimise(*views)
        runtime.synchronize(device)
        t2 = time.perf_counter()
        if i >= args.warmup:
            steps.append(t2 - t0)
            shares.append((t1 - t0) / (t2 - t0))
    if args.profile:
        print(json.dumps(profile_step(stepper, it, gen, device, args.profile)), flush=True)
    return summary("gvsl", args, steps, statistics.median(shares), device, amp=str(amp_dtype) if amp_dtype else None,
                   cudnn_benchmark=torch.backends.cudnn.benchmark, channels_last=args.channels_last)


def profile_step(stepper: TrainingStep, it, gen: torch.Generator, device: torch.device, top: int) -> dict:
    """The costliest kernels of one more step, by their own device time: where a precision's time goes."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    views = stepper.augment(*next(it), gen)
    runtime.synchronize(device)
    with profile(activities=activities) as prof:
        stepper.optimise(*views)
        runtime.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    return {"profile": "one step", "amp": str(stepper.amp_dtype), "total_ms": round(total / 1e3, 1),
            "top": [{"name": e.key[:90], "ms": round(getattr(e, key) / 1e3, 2), "calls": e.count}
                    for e in events[:top]]}


def time_reference_style(args, store, device) -> dict:
    torch.manual_seed(0)
    model = GVSL(width=args.width).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    rng = np.random.default_rng(0)
    gen = torch.Generator(device=device).manual_seed(0)
    steps = []
    it = batches(args, store, device)
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        fixed, moving = next(it)
        reference_style.step(model, opt, fixed.to(device), moving.to(device), rng, gen)
        runtime.synchronize(device)
        if i >= args.warmup:
            steps.append(time.perf_counter() - t0)
    return summary("reference-style", args, steps, None, device)


def summary(impl, args, steps, share, device, **extra) -> dict:
    median = statistics.median(steps)
    voxels = args.batch_size * int(np.prod(args.crop))
    return {"impl": impl, "device": str(device), "crop": list(args.crop), "batch_size": args.batch_size,
            "width": args.width, "steps": len(steps), "median_step_s": round(median, 4),
            "voxels_per_s": round(voxels / median), "data_share": None if share is None else round(share, 4),
            "peak_memory_mb": round(peak_memory_mb(device), 1), "threads": torch.get_num_threads(), **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crop", type=int, nargs=3, default=[64, 64, 64], metavar=("D", "H", "W"))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--device", default="auto", choices=runtime.DEVICES)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="bf16/fp16 autocast (CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last-3d memory format (default: as pre-training, on the CPU only)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the reference-style baseline")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="let cuDNN time its convolution algorithms once per shape, as training does on CUDA")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one step and print its N costliest device kernels as JSON")
    args = p.parse_args()
    device = runtime.resolve_device(args.device)
    if args.cudnn_benchmark:
        runtime.tune_convolutions(device)
    with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = data.VolumeStore(demo.demo_paths(), data.Preprocessing((1.5,) * 3, "mr"), cache, progress=False)
        ours = time_gvsl(args, store, device)
        print(json.dumps(ours), flush=True)
        if args.baseline:
            ref = time_reference_style(args, store, device)
            print(json.dumps(ref), flush=True)
            print(json.dumps({"comparison": "reference-style / gvsl median step time",
                              "ratio": round(ref["median_step_s"] / ours["median_step_s"], 2)}), flush=True)


if __name__ == "__main__":
    main()
