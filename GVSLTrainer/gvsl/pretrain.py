"""GVSL self-supervised pre-training: the job behind ``GVSLTrainer/pretrain.py``.

One process per device; under torchrun every rank joins a DistributedDataParallel group and
draws its own pairs. Everything random is a function of (seed, step, rank), so a resumed run
continues exactly where an interrupted one stopped.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import augment, checkpoint, data, demo, runtime
from .config import PretrainConfig, to_dict
from .logs import TrainingLog
from .losses import GVSLLoss
from .networks import GVSL

log = logging.getLogger(__name__)

LAST = "checkpoint_last.pt"
FINAL = "gvsl_pretrained.pt"
LOSS_TERMS = ("ncc", "smooth", "mse", "total")
# Options a resumed run must share with the run it continues.
RESUME_FIXED = ("width", "crop", "batch_size", "seed", "normalize", "spacing", "lr")


class TrainingError(RuntimeError):
    pass


def amp_settings(cfg: PretrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is needed)."""
    if not cfg.amp:
        return None, False
    if device.type != "cuda":
        warnings.warn(f"--amp applies to CUDA only; training in float32 on {device.type}", stacklevel=2)
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1009 + rank


def model_meta(cfg: PretrainConfig, paths: list[Path]) -> dict:
    return {"width": cfg.width, "in_channels": 1, "normalize": cfg.normalize, "spacing": list(cfg.spacing),
            "crop": list(cfg.crop), "config": to_dict(cfg), "data": cfg.data or "built-in demo",
            "num_volumes": len(paths)}


def _check_resumable(ckpt: checkpoint.Checkpoint, cfg: PretrainConfig) -> None:
    saved = ckpt.meta.get("config", {})
    now = to_dict(cfg)
    diff = {k: (saved.get(k), now[k]) for k in RESUME_FIXED
            if k in saved and _as_list(saved[k]) != _as_list(now[k])}
    if diff:
        detail = ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in diff.items())
        raise TrainingError(f"{ckpt.path}: cannot resume with different options ({detail})")


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


class TrainingStep:
    """Augment a batch of pairs on the device, then one optimisation step (the benchmark times this too)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 loss_fn: GVSLLoss, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                 aug_cfg: augment.AugmentConfig | None = None):
        self.model, self.optimizer, self.scaler, self.loss_fn = model, optimizer, scaler, loss_fn
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        self.aug_cfg = aug_cfg or augment.AugmentConfig()
        self.device = next(model.parameters()).device

    def augment(self, fixed: torch.Tensor, moving: torch.Tensor, gen: torch.Generator):
        fixed = fixed.to(self.device, non_blocking=True)
        moving = moving.to(self.device, non_blocking=True)
        with torch.no_grad():
            views = augment.pretraining_views(fixed, moving, gen, self.aug_cfg)
        if self.channels_last:
            views = tuple(t.contiguous(memory_format=torch.channels_last_3d) for t in views)
        return views

    def optimise(self, fixed: torch.Tensor, damaged: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with autocast:
            result = self.model(damaged, moving)
            terms = self.loss_fn(fixed, result.warped, result.restored, result.displacement)
        if torch.isfinite(terms["total"]):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(terms["total"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return {k: v.detach() for k, v in terms.items()}

    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return self.optimise(*self.augment(fixed, moving, gen))


def train(cfg: PretrainConfig) -> GVSL:
    """Run (or resume) pre-training; returns the trained network (unwrapped, on its device)."""
    dist = runtime.init_distributed(cfg.device)
    device = runtime.resolve_device(cfg.device, dist.local_rank)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    show = cfg.progress and dist.is_main

    paths = data.discover(cfg.data) if cfg.data else demo.demo_paths()
    preprocessing = data.Preprocessing(tuple(cfg.spacing), cfg.normalize)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    if not dist.is_main:
        dist.barrier()  # let rank 0 decode and cache every volume first
    store = data.VolumeStore(paths, preprocessing, cache, progress=show)
    if dist.is_main:
        dist.barrier()

    runtime.seed_everything(cfg.seed)
    model = GVSL(width=cfg.width).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    amp_dtype, need_scaler = amp_settings(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=need_scaler)

    start = 0
    last = out / LAST
    if cfg.resume:
        if last.is_file():
            ckpt = checkpoint.load(last, map_location=device)
            if ckpt.training_state is None:
                raise TrainingError(f"{last}: holds no training state to resume from")
            _check_resumable(ckpt, cfg)
            model.load_state_dict(ckpt.state_dict)
            optimizer.load_state_dict(ckpt.training_state["optimizer"])
            scaler.load_state_dict(ckpt.training_state["scaler"])
            runtime.set_rng_state(ckpt.training_state["rng"])
            start = int(ckpt.training_state["step"])
            if show:
                print(f"Resuming from {last} at step {start}")
        elif show:
            print(f"--resume: no {last} yet, starting from step 0")
    if start >= cfg.steps and show:
        print(f"Already at step {start} of {cfg.steps}: nothing to train")

    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.enabled else model
    pairs = data.PairCrops(store, cfg.crop, cfg.seed, length=cfg.steps * dist.world_size * cfg.batch_size)
    loader = DataLoader(pairs, batch_size=cfg.batch_size,
                        sampler=data.StepSampler(start, cfg.steps, cfg.batch_size, dist.rank, dist.world_size),
                        num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if cfg.workers else None)
    stepper = TrainingStep(ddp, optimizer, scaler, GVSLLoss(cfg.ncc_weight, cfg.smooth_weight, cfg.mse_weight,
                                                           cfg.ncc_window), amp_dtype, cfg.channels_last)
    gen = torch.Generator(device=device)
    meta = model_meta(cfg, store.paths)
    logbook = TrainingLog(out, start, [*LOSS_TERMS, "steps_per_s", "data_wait_share"], enabled=dist.is_main)

    def save_last(step: int) -> None:
        if dist.is_main:
            checkpoint.save(last, model, "pretrain", meta, training_state={
                "step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": runtime.rng_state()})

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=start, desc="Pre-training", unit="step", disable=not show,
               dynamic_ncols=True)
    model.train()
    step = start
    sums = {k: 0.0 for k in LOSS_TERMS}
    data_time, window_start, window_steps = 0.0, time.perf_counter(), 0
    try:
        t_wait = time.perf_counter()
        for fixed, moving in loader:
            data_time += time.perf_counter() - t_wait
            gen.manual_seed(step_seed(cfg.seed, step, dist.rank))
            terms = stepper(fixed, moving, gen)
            if not torch.isfinite(terms["total"]):
                raise TrainingError(f"the loss became {terms['total'].item()} at step {step + 1} "
                                    f"({', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
                                    f"try a lower --lr, or resume from {last}")
            step += 1
            window_steps += 1
            for k in LOSS_TERMS:
                sums[k] += terms[k].item()
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                values = {k: v / window_steps for k, v in sums.items()}
                values.update(steps_per_s=window_steps / elapsed, data_wait_share=data_time / elapsed)
                logbook.write(step, values)
                bar.set_postfix(loss=f"{values['total']:.4f}", ncc=f"{values['ncc']:.4f}",
                                mse=f"{values['mse']:.4f}")
                sums = {k: 0.0 for k in LOSS_TERMS}
                data_time, window_start, window_steps = 0.0, time.perf_counter(), 0
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_last(step)
            t_wait = time.perf_counter()
    except KeyboardInterrupt:
        save_last(step)
        if dist.is_main:
            print(f"\nInterrupted at step {step}; saved {last}. Continue with --resume.")
        raise
    finally:
        bar.close()
        logbook.close()

    if step > start or not (out / FINAL).is_file():
        save_last(step)
        if dist.is_main:
            final = checkpoint.save(out / FINAL, model, "pretrain", {**meta, "steps": step})
            print(f"Pre-trained model: {final.resolve()}\nLogs: {logbook.path.resolve()} and "
                  f"{(out / 'tensorboard').resolve()}")
    dist.barrier()
    return model

