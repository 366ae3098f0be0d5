"""Run by the DDP tests under torchrun: trains (pre-training, or fine-tuning with "finetune" as the
third argument), then saves this rank's live weights for comparison."""
import sys
from pathlib import Path

import torch

from gvsl import finetune
from gvsl.config import PretrainConfig
from gvsl.pretrain import train


def fine_tune(out: Path, data_dir: str) -> torch.nn.Module:
    made = []

    class Recorded(finetune.GVSLSegmenter):  # keeps the model this rank trains (train() returns the best saved one)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    finetune.GVSLSegmenter = Recorded
    finetune.train(finetune.FinetuneConfig(
        data=data_dir, output_dir=str(out), steps=4, batch_size=1, crop=(16, 16, 16), width=4, workers=0,
        spacing=(2.0, 2.0, 2.0), normalize="mr", progress=False, device="cpu", val_every=2, norm="group"))
    return made[0]


if __name__ == "__main__":
    out, data_dir = Path(sys.argv[1]), sys.argv[2]
    if sys.argv[3:] == ["finetune"]:
        model = fine_tune(out, data_dir)
    else:
        model = train(PretrainConfig(data=data_dir, output_dir=str(out), steps=3, batch_size=1, crop=(16, 16, 16),
                                     width=4, workers=0, spacing=(2.0, 2.0, 2.0), normalize="mr", progress=False,
                                     device="cpu"))
    rank = torch.distributed.get_rank()
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
