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


class LearningCurve:
    """``learning_curve.png``: the training loss, and the mean and per-class validation Dice, against
    steps; redrawn at every validation (main process only), from log.csv's rows on resume."""

    def __init__(self, output_dir: Path, class_names: list[str], start_step: int = 0):
        self.path = Path(output_dir) / "learning_curve.png"
        self.class_names = list(class_names)
        self.rows: list[dict] = []
        log = Path(output_dir) / "log.csv"
        if start_step and log.is_file():
            with open(log, newline="") as f:
                self.rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]

    def add(self, step: int, row: dict[str, float]) -> None:
        self.rows.append({"step": step, **row})
        if "val_dice" in row:
            self.draw()

    def draw(self) -> Path:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4.2))
        loss_ax, dice_ax = fig.subplots(1, 2)
        losses = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        if losses:
            loss_ax.plot(*zip(*losses), color="tab:gray", linewidth=1)
        loss_ax.set(xlabel="step", ylabel="training loss (Dice + CE)", title="Loss")
        validated = [r for r in self.rows if "val_dice" in r]
        steps = [r["step"] for r in validated]
        for name in self.class_names:
            dice_ax.plot(steps, [r.get(f"dice_{name}", float("nan")) for r in validated], marker=".", linewidth=1,
                         label=name)
        dice_ax.plot(steps, [r["val_dice"] for r in validated], color="black", linewidth=2.5, marker="o",
                     label="mean")
        dice_ax.set(xlabel="step", ylabel="validation Dice", title="Validation Dice per class", ylim=(0, 1))
        dice_ax.legend(fontsize=8, loc="lower right", ncol=2)
        for ax in (loss_ax, dice_ax):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.path.with_name(f".{self.path.name}.partial.png")
        fig.savefig(tmp, dpi=80)
        tmp.replace(self.path)  # a viewer never sees half a figure
        return self.path
