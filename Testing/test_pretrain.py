"""The pre-training job end to end: outputs, resume, distributed training and the command line."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gvsl import checkpoint, losses, runtime
from gvsl.networks import GVSL
from gvsl.config import DEMO_OVERRIDES, PretrainConfig, build_parser, resolve
from gvsl.pretrain import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "GVSLTrainer" / "pretrain.py"


def tiny(data, out, **kw):
    base = dict(data=str(data), output_dir=str(out), steps=6, batch_size=2, crop=(16, 16, 16), width=4, workers=0,
                spacing=(2.0, 2.0, 2.0), normalize="mr", progress=False, checkpoint_every=2, log_every=1, device="cpu")
    return PretrainConfig(**{**base, **kw})


def test_training_writes_model_checkpoint_and_logs(tmp_path, small_folder):
    model = train(tiny(small_folder, tmp_path / "run"))
    final = checkpoint.load(tmp_path / "run" / "gvsl_pretrained.pt")
    assert (final.kind, final.width, final.meta["normalize"], final.meta["steps"]) == ("pretrain", 4, "mr", 6)
    assert final.meta["crop"] == [16, 16, 16] and final.meta["num_volumes"] == 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(final.state_dict[k], v.cpu())
    last = checkpoint.load(tmp_path / "run" / "checkpoint_last.pt")
    assert last.training_state["step"] == 6 and "optimizer" in last.training_state
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(0 <= float(r["ncc"]) <= 1 and float(r["mse"]) > 0 for r in rows)
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, small_folder, monkeypatch):
    straight = train(tiny(small_folder, tmp_path / "a"))

    calls = {"n": 0}
    real_forward = losses.GVSLLoss.forward

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # Ctrl-C during step 5
        return real_forward(self, *args)

    monkeypatch.setattr(losses.GVSLLoss, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(small_folder, tmp_path / "b"))
    monkeypatch.setattr(losses.GVSLLoss, "forward", real_forward)
    assert checkpoint.load(tmp_path / "b" / "checkpoint_last.pt").training_state["step"] == 4
    assert not (tmp_path / "b" / "gvsl_pretrained.pt").exists()

    resumed = train(tiny(small_folder, tmp_path / "b", resume=True))
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=k)
    rows = list(csv.DictReader(open(tmp_path / "b" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_different_options(tmp_path, small_folder):
    train(tiny(small_folder, tmp_path / "r", steps=2))
    with pytest.raises(TrainingError, match="width: 4 then, 8 now"):
        train(tiny(small_folder, tmp_path / "r", steps=4, width=8, resume=True))


def test_the_run_time_is_estimated_after_the_first_steps_and_a_cpu_day_is_named(monkeypatch):
    """The paper's settings on 2 CPU cores (48 s a step): the run says it would take 111 days, and how
    to make it practical, once, after its first timed steps."""
    from gvsl import training

    clock = iter([0.0, 3 * 48.0])
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    said = []
    estimate = training.RunTimeEstimate(PretrainConfig(), torch.device("cpu"), 0, said.append)
    for step in range(1, 10):
        estimate.step(step)
    assert said[0].startswith("Estimated time: 111 d 2 h for the 199996 steps left, at 48.00 s a step on cpu")
    assert "over a day" in said[1] and "--width (8 or 16; now 32)" in said[1] and len(said) == 2
    said.clear()
    clock = iter([0.0, 3 * 0.5])
    short = training.RunTimeEstimate(PretrainConfig(steps=100), torch.device("cpu"), 0, said.append)
    for step in range(1, 10):
        short.step(step)
    assert said == ["Estimated time: 0 min 48 s for the 96 steps left, at 0.50 s a step on cpu "
                    "(validations and checkpoints not counted)"]


def test_help_says_what_the_demo_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "Without --data, a demo: the built-in real MR volumes, 30 steps at width 8 on 48x48x48 crops" in \
        " ".join(out.split())
    assert "{auto,ct,mr}" in out and "(default: auto; when fine-" in \
        " ".join(out.split())


def test_resume_without_a_checkpoint_is_refused_before_any_work(tmp_path, small_folder):
    with pytest.raises(TrainingError, match=r"--resume: .*typo holds no checkpoint_last.pt, so there is no run to "
                                            r"resume; check --output-dir"):
        train(tiny(small_folder, tmp_path / "typo", resume=True))
    assert not (tmp_path / "typo").exists()


def test_auto_normalisation_is_each_images_own_and_recorded(tmp_path, small_folder, anatomical_path):
    """The default: a CT (air near -1000 HU) is windowed as Hounsfield units, an MR by percentiles, and
    the checkpoint says how many of each; a rerun from the cache records the same."""
    import SimpleITK as sitk

    head = sitk.ReadImage(str(anatomical_path), sitk.sitkFloat32)
    hounsfield = head / float(sitk.GetArrayViewFromImage(head).max()) * 1400.0 - 1000.0
    sitk.WriteImage(hounsfield, str(small_folder / "ct.nii.gz"))
    assert PretrainConfig().normalize is None  # resolved to auto by the run
    train(tiny(small_folder, tmp_path / "run", steps=2, normalize=None))
    meta = checkpoint.load(tmp_path / "run" / "gvsl_pretrained.pt").meta
    assert (meta["normalize"], meta["normalize_chosen"]) == ("auto", {"ct": 1, "mr": 2})
    train(tiny(small_folder, tmp_path / "run", steps=2, normalize=None, overwrite=True))  # from the cache
    assert checkpoint.load(tmp_path / "run" / "gvsl_pretrained.pt").meta["normalize_chosen"] == {"ct": 1, "mr": 2}


def test_training_goes_on_without_a_bad_file(tmp_path, small_folder, bad_files):
    os.replace(bad_files["corrupt"], small_folder / "corrupt.nii.gz")
    with pytest.warns(UserWarning, match="corrupt.nii.gz: cannot be read"):
        train(tiny(small_folder, tmp_path / "run", steps=1))
    assert (tmp_path / "run" / "gvsl_pretrained.pt").is_file()


def test_two_process_gloo_ddp_keeps_replicas_identical(tmp_path, small_folder):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "Testing" / "ddp_worker.py"), str(tmp_path), str(small_folder)],
                   check=True, env=env, timeout=300, capture_output=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    final = checkpoint.load(tmp_path / "gvsl_pretrained.pt").state_dict
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], atol=0, rtol=0, msg=k)
        torch.testing.assert_close(final[k], r0[k], atol=0, rtol=0, msg=k)
    torch.manual_seed(0)  # the trainer's initialisation (seed 0): training must have moved the weights
    fresh = GVSL(width=4).state_dict()
    changed = sum(not torch.equal(fresh[k], r0[k]) for k in r0 if r0[k].is_floating_point())
    assert changed > len(r0) // 2


def test_no_data_means_the_demo_set():
    cfg = resolve(PretrainConfig, build_parser(PretrainConfig, "").parse_args([]), DEMO_OVERRIDES)
    assert cfg.data is None and cfg.steps == DEMO_OVERRIDES["steps"] and cfg.normalize == "mr"
    cfg = resolve(PretrainConfig, build_parser(PretrainConfig, "").parse_args(["--steps", "7"]), DEMO_OVERRIDES)
    assert cfg.steps == 7 and cfg.width == DEMO_OVERRIDES["width"]
    cfg = resolve(PretrainConfig, build_parser(PretrainConfig, "").parse_args(["--data", "x"]), DEMO_OVERRIDES)
    assert cfg.steps == 200_000 and cfg.width == 32


def test_yaml_config_and_command_line_override(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: scans\nsteps: 50\nlr: 0.001\ncrop: [32, 48, 64]\nspacing: 2\n")
    parser = build_parser(PretrainConfig, "")
    cfg = resolve(PretrainConfig, parser.parse_args(["--config", str(cfg_file), "--steps", "9"]))
    assert (cfg.steps, cfg.lr, cfg.crop, cfg.spacing) == (9, 0.001, (32, 48, 64), (2.0, 2.0, 2.0))
    cfg_file.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="unknown options.*stepz"):
        resolve(PretrainConfig, parser.parse_args(["--config", str(cfg_file)]))


def test_channels_last_defaults_to_the_cpu_only_and_follows_the_flag():
    """The H100 measurement: channels-last slowed conv3d there; on a CPU it speeds it up."""
    parser = build_parser(PretrainConfig, "")
    default = resolve(PretrainConfig, parser.parse_args(["--data", "x"])).channels_last
    forced_on = resolve(PretrainConfig, parser.parse_args(["--data", "x", "--channels-last"])).channels_last
    forced_off = resolve(PretrainConfig, parser.parse_args(["--data", "x", "--no-channels-last"])).channels_last
    chosen = {(device, requested): runtime.use_channels_last(requested, torch.device(device))
              for device in ("cpu", "cuda", "mps") for requested in (default, forced_on, forced_off)}
    assert chosen == {("cpu", None): True, ("cuda", None): False, ("mps", None): False,
                      ("cpu", True): True, ("cuda", True): True, ("mps", True): True,
                      ("cpu", False): False, ("cuda", False): False, ("mps", False): False}


def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_documents_every_option(tmp_path):
    out = run_script("--help", cwd=tmp_path).stdout
    for flag in ["--data", "--output-dir", "--steps", "--batch-size", "--crop", "--width", "--lr", "--device", "--amp",
                 "--resume", "--seed", "--normalize", "--workers", "--spacing", "--config"]:
        assert flag in out, flag
    assert "Hounsfield" in out and "torchrun" in out


def test_cli_reports_bad_data_in_one_line(tmp_path):
    res = run_script("--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'missing'}: no such file or folder"


def test_demo_run_from_the_command_line(tmp_path):
    res = run_script("--steps", "2", "--crop", "16", "16", "16", "--workers", "0", "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "gvsl_runs" / "demo_pretrain" / "gvsl_pretrained.pt"
    assert f"Pre-trained model: {out}" in res.stdout
    assert checkpoint.load(out).meta["num_volumes"] == 2


@pytest.mark.parametrize("workers, to_group", [(0, False), (2, True)])
def test_sigterm_saves_a_checkpoint_like_ctrl_c(tmp_path, small_folder, workers, to_group):
    """What a cluster scheduler or `kill` sends: the run checkpoints its last step and says how to resume.
    Slurm (and `kill -- -PGID`) signal the whole process group, the DataLoader workers included: they
    must not die first and take the run down before it saves."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--data", str(small_folder), "--output-dir", str(out),
                             "--steps", "100000", "--crop", "16", "16", "16", "--width", "4", "--workers", str(workers),
                             "--spacing", "2", "--normalize", "mr", "--log-every", "1", "--checkpoint-every", "100000",
                             "--no-progress", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "log.csv").is_file() and len((out / "log.csv").read_text().split()) > 3):
        time.sleep(0.5)
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    step = checkpoint.load(out / "checkpoint_last.pt").training_state["step"]
    assert step >= 2 and f"Interrupted at step {step}" in stdout and "--resume" in stdout


def test_an_earlier_run_is_neither_mixed_nor_replaced_silently(tmp_path, small_folder):
    train(tiny(small_folder, tmp_path / "run", steps=2))
    old_events = set((tmp_path / "run" / "tensorboard").iterdir())
    with pytest.raises(TrainingError, match=r"run: holds an earlier run \(checkpoint_last.pt, log.csv\); continue it "
                                            r"with --resume, replace it with --overwrite"):
        train(tiny(small_folder, tmp_path / "run", steps=3))
    assert checkpoint.load(tmp_path / "run" / "checkpoint_last.pt").training_state["step"] == 2  # untouched
    train(tiny(small_folder, tmp_path / "run", steps=3, overwrite=True))
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert not old_events & set((tmp_path / "run" / "tensorboard").iterdir())  # no events of the earlier run
