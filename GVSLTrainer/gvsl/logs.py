"""Training logs: one CSV row and one TensorBoard scalar set per logged step (main process only)."""
from __future__ import annotations

import csv
from pathlib import Path


class TrainingLog:
    def __init__(self, output_dir: Path, start_step: int, fields: list[str], enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "log.csv"
        self.fields = ["step", *fields]
        self._writer = None
        if not enabled:
            return
        kept = self._kept_rows(start_step)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        self._file = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self.fields, extrasaction="ignore")
        try:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events that a resumed run is about to write again
            self._writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step or None)
        except ImportError:  # TensorBoard is optional at run time; the CSV is always written
            self._writer = None

    def _kept_rows(self, start_step: int) -> list[dict]:
        """On resume, keep the rows up to the checkpoint so that the CSV has each step once."""
        if start_step == 0 or not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._csv.writerow({"step": step, **{k: f"{v:.6g}" for k, v in values.items()}})
        self._file.flush()
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()
