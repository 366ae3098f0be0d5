"""Run by the DDP test under torchrun: trains, then saves this rank's weights for comparison."""
import sys
from pathlib import Path

import torch

from gvsl.config import PretrainConfig
from gvsl.pretrain import train

if __name__ == "__main__":
    out, data_dir = Path(sys.argv[1]), sys.argv[2]
    cfg = PretrainConfig(data=data_dir, output_dir=str(out), steps=3, batch_size=1, crop=(16, 16, 16), width=4,
                         workers=0, spacing=(2.0, 2.0, 2.0), normalize="mr", progress=False, device="cpu")
    model = train(cfg)
    rank = torch.distributed.get_rank()
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
