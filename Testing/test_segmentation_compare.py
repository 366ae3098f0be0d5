"""The fine-tuning comparison against MONAI's recipe (benchmarks/segmentation.py compare) runs end to end
with tiny settings, and its BasicUNet stays at GVSL's parameter count for each width it offers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import monai_recipe  # noqa: E402
import pretext_check  # noqa: E402

from gvsl.networks import GVSLSegmenter  # noqa: E402


@pytest.mark.parametrize("width", sorted(monai_recipe.BASIC_UNET_FEATURES))
def test_basic_unet_matches_gvsl_parameter_count(width):
    from monai.networks.nets import BasicUNet

    classes = len(monai_recipe.REGIONS) + 1
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    gvsl = count(GVSLSegmenter(classes, width=width, norm="instance"))
    monai = count(BasicUNet(spatial_dims=3, in_channels=1, out_channels=classes,
                            features=monai_recipe.BASIC_UNET_FEATURES[width]))
    assert abs(monai / gvsl - 1) < 0.05


def test_compare_prints_per_class_dice_for_every_run(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "segmentation.py"), "compare", "--cases", "2",
                          "--held-out", "2", "--steps", "2", "--val-every", "2", "--pretrain-steps", "2",
                          "--check-positions", "1", "--seeds", "0"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    curves = {r["run"]: r for r in rows if r["benchmark"] == "segmentation_compare"}
    assert set(curves) == {"gvsl_scratch", "gvsl_pretrained", "monai_basicunet"}
    for row in curves.values():
        assert row["step"] == 2
        dice = [row[name] for name in monai_recipe.REGIONS.values()]
        assert all(0 <= d <= 1 for d in dice)
        assert row["mean_dice"] == pytest.approx(sum(dice) / len(dice), abs=1e-3)
    # the pre-training is checked on held-out pairs: both directions of the one pair of held-out cases
    check = next(r for r in rows if r["benchmark"] == "segmentation_pretext")
    assert check["pairs"] == 2 and check["steps"] == 2
    for stage in pretext_check.STAGES:
        assert 0 <= check[f"ncc_{stage}"] <= 1
        assert check[f"dice_{stage}"] is None or 0 <= check[f"dice_{stage}"] <= 1
    walls = {r["run"] for r in rows if r["benchmark"] == "segmentation_compare_wall"}
    assert walls == set(curves)

    results, figure = tmp_path / "compare.jsonl", tmp_path / "compare.png"
    results.write_text(res.stdout)
    plot = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_compare.py"), str(results), "--out",
                           str(figure)], capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
