"""What every training job needs around its loop: process group and device, cached volumes,
optimiser and AMP, resume, DistributedDataParallel, a step-indexed loader, and checkpoints that
survive interruptions. Pre-training and fine-tuning share it.
"""
from __future__ import annotations

import contextlib
import shutil
import re
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from . import checkpoint, data, runtime
from .config import TrainConfig, to_dict

LAST = "checkpoint_last.pt"


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM and SIGINT: a scheduler (Slurm, ``kill -- -PGID``) or Ctrl-C
    signals the whole process group, and a worker that died first took the run down ("DataLoader
    worker is killed by signal") before it could save. The main process saves, then stops them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainingError(RuntimeError):
    pass


def amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is needed)."""
    if not cfg.amp:
        return None, False
    if device.type != "cuda":
        warnings.warn(f"--amp applies to CUDA only; training in float32 on {device.type}", stacklevel=2)
        return None, False
    dtype = runtime.autocast_dtype(device)
    return dtype, dtype == torch.float16  # fp16 needs a gradient scaler


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1009 + rank


def _check_same_options(ckpt: checkpoint.Checkpoint, cfg: TrainConfig, fixed: tuple[str, ...]) -> None:
    """A resumed run is the interrupted run: options that change it are refused by name."""
    def plain(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    saved, now = ckpt.meta.get("config", {}), to_dict(cfg)
    diff = {k: (saved.get(k), now[k]) for k in fixed if k in saved and plain(saved[k]) != plain(now[k])}
    if diff:
        detail = ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in diff.items())
        raise TrainingError(f"{ckpt.path}: cannot resume with different options ({detail})")


def _duration(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days} d {hours} h" if days else f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s"


class RunTimeEstimate:
    """Says once, after the first steps, how long the whole run will take, and on a CPU, where that is
    over a day, which options make it practical: the paper's 200,000 steps at width 32 on 128^3 crops
    take about 48 s a step on 2 cores, about 110 days."""
    TIMED = 3  # steps timed after the first (which pays for the warm-up)

    def __init__(self, cfg: TrainConfig, device: torch.device, start: int, say: Callable[[str], None] | None):
        self.cfg, self.device, self.start, self.say = cfg, device, start, say
        self.began = None

    def step(self, step: int) -> None:
        if self.say is None:
            return
        if step == self.start + 1:
            self.began = time.perf_counter()
        elif self.began is not None and step == self.start + 1 + self.TIMED:
            per_step = (time.perf_counter() - self.began) / self.TIMED
            left = per_step * (self.cfg.steps - step)
            self.say(f"Estimated time: {_duration(left)} for the {self.cfg.steps - step} steps left, at "
                     f"{per_step:.2f} s a step on {self.device.type} (validations and checkpoints not counted)")
            if self.device.type == "cpu" and left > 86400:
                self.say(f"On a CPU that is over a day. Practical options: fewer --steps (e.g. 3000), a smaller "
                         f"--width (8 or 16; now {self.cfg.width}) and --crop (e.g. 64 64 64; now "
                         f"{' '.join(map(str, self.cfg.crop))}), a coarser --spacing, or a GPU (--device cuda)")
            self.say = None


class TrainingRun:
    def __init__(self, cfg: TrainConfig, kind: str):
        self.cfg, self.kind = cfg, kind
        self.dist = runtime.init_distributed(cfg.device)
        self.device = runtime.resolve_device(cfg.device, self.dist.local_rank)
        self.out = Path(cfg.output_dir)
        self.last = self.out / LAST
        self._claim_output()
        self.out.mkdir(parents=True, exist_ok=True)
        self.show = cfg.progress and self.dist.is_main
        self.start = 0
        self.extra: dict[str, Any] = {}

    def _claim_output(self) -> None:
        """An OUTPUT holding an earlier run is continued (--resume) or replaced (--overwrite: its logs and
        TensorBoard files go too, so that nothing of the two runs mixes); never overwritten silently."""
        earlier = [p.name for p in (self.last, self.out / "log.csv") if p.is_file()]
        if self.cfg.resume and not self.last.is_file():  # a typo in --output-dir would silently start anew
            raise TrainingError(f"--resume: {self.out} holds no {LAST}, so there is no run to resume; check "
                                "--output-dir, or leave out --resume to start a new run")
        if not earlier or self.cfg.resume:
            return
        if not self.cfg.overwrite:
            raise TrainingError(f"{self.out}: holds an earlier run ({', '.join(earlier)}); continue it with --resume, "
                                "replace it with --overwrite, or choose another --output-dir")
        if self.dist.is_main:
            for name in ("log.csv", "learning_curve.png", LAST):
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
        self.dist.barrier()

    def store(self, paths, preprocessing: data.Preprocessing, **labelled) -> data.VolumeStore:
        """Rank 0 decodes and caches every volume first; the others then read the cache."""
        cache = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.out / "cache"
        if not self.dist.is_main:
            self.dist.barrier()
        store = data.VolumeStore(paths, preprocessing, cache, progress=self.show, **labelled)
        if self.dist.is_main:
            self.dist.barrier()
        return store

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model, build Adam over its trainable parameters and the AMP scaler."""
        model = model.to(self.device)
        self.channels_last = runtime.use_channels_last(self.cfg.channels_last, self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        runtime.tune_convolutions(self.device)
        self.model = model
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.cfg.lr)
        self.amp_dtype, need_scaler = amp_settings(self.cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=need_scaler)
        return model

    def resume(self, fixed: tuple[str, ...] = ()) -> int:
        """With --resume, restore model, optimiser, scaler, RNG and step from checkpoint_last.pt, once
        the options named in ``fixed`` are found equal to the interrupted run's."""
        if self.cfg.resume:
            if self.last.is_file():
                ckpt = checkpoint.load(self.last, map_location=self.device)
                if ckpt.training_state is None:
                    raise TrainingError(f"{self.last}: holds no training state to resume from")
                _check_same_options(ckpt, self.cfg, fixed)
                before = ckpt.meta.get("config", {}).get("steps")
                if before is not None and before != self.cfg.steps and self.dist.is_main:  # allowed: said, not refused
                    print(f"--resume: --steps {before} then, {self.cfg.steps} now; the learning-rate schedule follows "
                          f"the new length from step {ckpt.training_state.get('step')}")
                try:
                    self.model.load_state_dict(ckpt.state_dict)
                except RuntimeError as e:  # another dataset's classes, say: name the file and the difference
                    sizes = re.findall(r"copying a param with shape torch.Size\((\[[^]]*\])\).*?shape in current "
                                       r"model is torch.Size\((\[[^]]*\])\)", str(e))
                    detail = f"its weights have shape {sizes[0][0]} where this run's model has {sizes[0][1]}" if sizes \
                        else str(e).strip().splitlines()[0]
                    raise TrainingError(f"{self.last}: cannot resume: {detail}; the data or the model options differ "
                                        "from the run it continues (a dataset with other classes needs a new "
                                        "--output-dir)") from None
                state = ckpt.training_state
                self.optimizer.load_state_dict(state["optimizer"])
                self.scaler.load_state_dict(state["scaler"])
                runtime.set_rng_state(state["rng"])
                self.start = int(state["step"])
                self.extra = state.get("extra", {})
                if self.show:
                    print(f"Resuming from {self.last} at step {self.start}")
            else:  # _claim_output refused this before any work
                raise TrainingError(f"--resume: {self.last} does not exist")
        if self.start >= self.cfg.steps and self.show:
            print(f"Already at step {self.start} of {self.cfg.steps}: nothing to train")
        return self.start

    def wrapped(self) -> torch.nn.Module:
        """The model for the forward pass: DDP-wrapped under torchrun."""
        if not self.dist.enabled:
            return self.model
        return DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                       else None)

    def loader(self, dataset: Dataset) -> DataLoader:
        cfg = self.cfg
        return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers,
                          sampler=data.StepSampler(self.start, cfg.steps, cfg.batch_size, self.dist.rank,
                                                   self.dist.world_size),
                          pin_memory=self.device.type == "cuda", prefetch_factor=4 if cfg.workers else None,
                          worker_init_fn=ignore_stop_signals if cfg.workers else None)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def save_last(self, step: int, meta: dict, **extra) -> None:
        if self.dist.is_main:
            checkpoint.save(self.last, self.model, self.kind, meta, training_state={
                "step": step, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": runtime.rng_state(), "extra": extra})

    @contextlib.contextmanager
    def checkpoint_on_interrupt(self, save: Callable[[], int]) -> Iterator[None]:
        """On Ctrl-C, or SIGTERM (what a cluster scheduler or ``kill`` sends), save checkpoint_last.pt at
        the last completed step, then re-raise."""
        def terminated(signum, frame):
            raise KeyboardInterrupt

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, terminated)
        try:
            yield
        except KeyboardInterrupt:
            step = save()
            if self.dist.is_main:
                print(f"\nInterrupted at step {step}; saved {self.last}. Continue with --resume.")
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
