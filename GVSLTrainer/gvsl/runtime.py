"""Devices, distributed set-up and seeding: where the job runs, decided in one place."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .choices import DEVICES


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an unavailable request is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but this PyTorch build sees no CUDA GPU "
                               f"(torch {torch.__version__})")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "mps" and not mps_available():
        raise RuntimeError("--device mps was asked for, but Apple MPS is not available here")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision's dtype on ``device``: bf16 where the GPU supports it (and on CPUs), else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def use_channels_last(requested: bool | None, device: torch.device) -> bool:
    """Whether training uses the channels-last-3d format: where asked, else on the CPU only, where
    it speeds conv3d up; on an H100 the default layout was faster with and without AMP."""
    return device.type == "cpu" if requested is None else requested


def tune_convolutions(device: torch.device) -> None:
    """Let cuDNN time its algorithms once per shape: training crops keep one shape, and on an H100
    this made bf16 steps 2-3x faster (float32: no change)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def available_memory(device: torch.device) -> int | None:
    """Bytes a job can still allocate on ``device``: free GPU memory, or the host's available memory
    (Linux's MemAvailable); None where it cannot be told (macOS, MPS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time measures it (GPU kernels are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: str) -> Distributed:
    """Join the process group torchrun describes in the environment (nccl on GPUs, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, world, local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG, in types that ``torch.load(weights_only=True)`` accepts."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, key.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
