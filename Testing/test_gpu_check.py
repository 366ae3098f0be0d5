"""The prepared GPU check runs end to end on the CPU with tiny settings, so it cannot rot before a GPU is lent."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="needs the project's .venv")
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "OUT": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    printed = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert rows == printed
    by_check = {}
    for row in rows:
        by_check.setdefault(row["check"], []).append(row)
    assert by_check["device"][0]["requested"] == "cpu"
    assert {r.get("impl") for r in by_check["pretrain_fp32"]} >= {"gvsl", "reference-style"}
    assert any(r.get("comparison") and r["ratio"] > 0 for r in by_check["pretrain_fp32"])
    gvsl = [r for r in by_check["registration"] if r.get("method") == "gvsl"]
    assert gvsl and gvsl[0]["epe_mean_mm"] < 1.0
    cli = [r for r in by_check["registration"] if r.get("benchmark") == "command_line"][0]
    assert cli["gvsl_cli_s"] > cli["gvsl_imports_s"] > 0
    assert by_check["segmentation_fp32"][0]["windows"] >= 1
    assert all(r["steps_per_s_with_validation"] > 0 for r in by_check["finetune"]
               if r.get("benchmark") == "segmentation_finetune")
    batches = [r for r in by_check["cohort_batches"] if r.get("benchmark") == "cohort_batches"]
    assert [r["batch_size"] for r in batches] == [1, 2] and all(r["subjects_per_minute"] > 0 for r in batches)
    assert batches[1]["max_field_difference_to_batch_1_mm"] < 0.1
    pretext = [r for r in by_check["pretext"] if r.get("benchmark") == "segmentation_pretext"]
    assert pretext and 0 <= pretext[0]["ncc_deformable"] <= 1
    assert not any(r.get("failed") for r in rows)
    assert all(any("wall_s" in r and len(r) == 2 for r in by_check[c]) for c in by_check)  # each step timed
