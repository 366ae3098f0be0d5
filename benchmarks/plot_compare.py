#!/usr/bin/env python
"""Learning curves of `segmentation.py compare`: mean held-out Dice against steps, one panel per results file.

    python benchmarks/plot_compare.py results/a.jsonl results/b.jsonl --titles "A" "B" --out compare.png

Reads the ``segmentation_compare`` rows (other rows are skipped); one colour per run, one line style per seed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLOURS = {"gvsl_scratch": "tab:blue", "gvsl_pretrained": "tab:green", "monai_basicunet": "tab:red"}
STYLES = ("-", "--", ":", "-.")


def curves(path: Path) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """{(run, seed): [(step, mean Dice), ...]} from one results file."""
    out: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.startswith("{") else {}
        if row.get("benchmark") == "segmentation_compare":
            out.setdefault((row["run"], int(row["seed"])), []).append((int(row["step"]), float(row["mean_dice"])))
    if not out:
        raise SystemExit(f"{path}: no segmentation_compare rows")
    return {key: sorted(points) for key, points in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON-lines files printed by segmentation.py compare")
    parser.add_argument("--titles", nargs="+", default=None, help="one panel title per file")
    parser.add_argument("--out", type=Path, required=True, help="the figure to write (.png)")
    args = parser.parse_args()
    if args.titles and len(args.titles) != len(args.results):
        parser.error("give one --titles entry per results file")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.results), figsize=(5.2 * len(args.results), 4), squeeze=False, sharey=True)
    for i, (ax, path) in enumerate(zip(axes[0], args.results)):
        for (run, seed), points in sorted(curves(path).items()):
            steps, dice = zip(*points)
            ax.plot(steps, dice, STYLES[seed % len(STYLES)], marker="o", ms=3, color=COLOURS.get(run.split(" (")[0]),
                    label=f"{run}, seed {seed}")
        ax.set_title(args.titles[i] if args.titles else path.stem, fontsize=10)
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("held-out Dice, mean of the regions")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(json.dumps({"figure": str(args.out)}))


if __name__ == "__main__":
    main()
