"""GVSL self-supervised pre-training: the job behind ``GVSLTrainer/pretrain.py``.

One process per device; under torchrun every rank joins a DistributedDataParallel group and
draws its own pairs. Everything random is a function of (seed, step, rank), so a resumed run
continues exactly where an interrupted one stopped.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from . import augment, checkpoint, data, demo, runtime
from .config import PretrainConfig, to_dict
from .logs import TrainingLog
from .losses import GVSLLoss
from .networks import GVSL, check_input_size
from .training import RunTimeEstimate, TrainingError, TrainingRun, step_seed

FINAL = "gvsl_pretrained.pt"
LOSS_TERMS = ("ncc", "smooth", "mse", "total")
# Options a resumed run must share with the run it continues.
RESUME_FIXED = ("width", "norm", "crop", "batch_size", "seed", "normalize", "spacing", "lr")


def model_meta(cfg: PretrainConfig, paths: list[Path], skipped: dict[str, str] | None = None,
               presets: dict | None = None) -> dict:
    return {"width": cfg.width, "norm": cfg.norm, "in_channels": 1, "normalize": cfg.normalize,
            "normalize_chosen": data.chosen_presets(presets or {}),
            "spacing": list(cfg.spacing), "crop": list(cfg.crop), "config": to_dict(cfg),
            "data": cfg.data or "built-in demo", "num_volumes": len(paths), "skipped": skipped or {}}


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
    from tqdm.auto import tqdm

    run = TrainingRun(cfg, "pretrain")
    check_input_size(tuple(cfg.crop), cfg.norm)  # before any preprocessing
    paths = data.discover(cfg.data) if cfg.data else demo.demo_paths()
    cfg.normalize = cfg.normalize or "auto"
    store = run.store(paths, data.Preprocessing(tuple(cfg.spacing), cfg.normalize))
    if run.show:
        print(data.presets_line(cfg.normalize, store.presets))
    runtime.seed_everything(cfg.seed)
    model = run.prepare(GVSL(width=cfg.width, norm=cfg.norm))
    start = run.resume(RESUME_FIXED)
    pairs = data.PairCrops(store, cfg.crop, cfg.seed, length=cfg.steps * run.dist.world_size * cfg.batch_size)
    loader = run.loader(pairs)
    stepper = TrainingStep(run.wrapped(), run.optimizer, run.scaler,
                           GVSLLoss(cfg.ncc_weight, cfg.smooth_weight, cfg.mse_weight, cfg.ncc_window),
                           run.amp_dtype, run.channels_last)
    gen = torch.Generator(device=run.device)
    meta = model_meta(cfg, store.paths, {str(p): why for p, why in store.skipped.items()}, store.presets)
    logbook = TrainingLog(run.out, start, [*LOSS_TERMS, "steps_per_s", "data_wait_share"], enabled=run.dist.is_main)

    bar = tqdm(total=cfg.steps, initial=start, desc="Pre-training", unit="step", disable=not run.show,
               dynamic_ncols=True)
    estimate = RunTimeEstimate(cfg, run.device, start, tqdm.write if run.dist.is_main else None)
    model.train()
    step = start
    sums = {k: 0.0 for k in LOSS_TERMS}
    data_time, window_start, window_steps = 0.0, time.perf_counter(), 0

    def save_now() -> int:
        run.save_last(step, meta)
        return step

    try:
        with run.checkpoint_on_interrupt(save_now):
            t_wait = time.perf_counter()
            for fixed, moving in loader:
                data_time += time.perf_counter() - t_wait
                gen.manual_seed(step_seed(cfg.seed, step, run.dist.rank))
                terms = stepper(fixed, moving, gen)
                if not torch.isfinite(terms["total"]):
                    raise TrainingError(f"the loss became {terms['total'].item()} at step {step + 1} "
                                        f"({', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
                                        f"try a lower --lr, or resume from {run.last}")
                step += 1
                estimate.step(step)
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
                    save_now()
                t_wait = time.perf_counter()
    finally:
        bar.close()
        logbook.close()

    if step > start or not (run.out / FINAL).is_file():
        save_now()
        if run.dist.is_main:
            final = checkpoint.save(run.out / FINAL, model, "pretrain", {**meta, "steps": step})
            print(f"Pre-trained model: {final.resolve()}\nLogs: {logbook.path.resolve()} and "
                  f"{(run.out / 'tensorboard').resolve()}")
            if store.skipped:
                print(store.skipped_summary())
    run.dist.barrier()
    return model
