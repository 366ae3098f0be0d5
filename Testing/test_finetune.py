"""Fine-tuning on labelled volumes, and the model it writes."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl import checkpoint, data
from gvsl.data import DataError
from gvsl.finetune import FinetuneConfig, train
from gvsl.networks import GVSL
from gvsl.networks import GVSLSegmenter
from gvsl.segmentation import segment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def labelled_case(tmp_path, anatomical_path):
    """A real T1 head with a two-structure label map in arbitrary label values (205, 420)."""
    img = sitk.ReadImage(str(anatomical_path), sitk.sitkFloat32)
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, 2.0))
    lab = np.zeros(smooth.shape, np.uint16)
    lab[smooth > np.percentile(smooth, 50)] = 205
    lab[smooth > np.percentile(smooth, 85)] = 420
    labels = sitk.GetImageFromArray(lab)
    labels.CopyInformation(img)
    root = tmp_path / "cases"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    sitk.WriteImage(img, str(root / "images" / "case_0000.nii.gz"))  # nnU-Net naming
    sitk.WriteImage(labels, str(root / "labels" / "case.nii.gz"))
    return root, img, labels


def cfg(data_dir, out, **kw):
    base = dict(data=str(data_dir), output_dir=str(out), steps=300, batch_size=2, crop=(24, 24, 24), width=8, lr=1e-3,
                workers=0, spacing=(2.0, 2.0, 2.0), normalize="mr", val_every=100, log_every=50, progress=False,
                device="cpu")
    return FinetuneConfig(**{**base, **kw})


def dice(a, b, v):
    return 2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum())


def test_a_tiny_model_memorises_one_real_volume(tmp_path, labelled_case):
    root, img, labels = labelled_case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one case: validation on the training case
        _, best = train(cfg(root, tmp_path / "run"))
    assert best > 0.7
    ckpt = checkpoint.load(tmp_path / "run" / "gvsl_segmentation.pt")
    assert ckpt.kind == "segmentation"
    assert ckpt.meta["labels"]["values"] == [0, 205, 420]
    assert ckpt.meta["labels"]["names"] == ["background", "label_205", "label_420"]
    assert ckpt.meta["spacing"] == [2.0, 2.0, 2.0] and ckpt.meta["crop"] == [24, 24, 24]
    # back in the file's own geometry and label values
    out = segment(img, ckpt).labels
    truth, pred = sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(out)
    assert out.GetSize() == img.GetSize() and set(np.unique(pred)) <= {0, 205, 420}
    assert dice(pred, truth, 205) > 0.7 and dice(pred, truth, 420) > 0.7
    # per-class Dice by class name at every validation, and the learning curve drawn from them
    import csv
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    validated = [r for r in rows if r["val_dice"]]
    assert [int(r["step"]) for r in validated] == [100, 200, 300]
    last = validated[-1]
    assert float(last["val_dice"]) == pytest.approx((float(last["dice_label_205"]) + float(last["dice_label_420"])) / 2,
                                                    abs=1e-4)
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # the default poly decay
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 10_000
    assert ckpt.meta["config"]["augment"] == "default" and ckpt.meta["config"]["sampling"] == "balanced"


@pytest.mark.parametrize("source", ["project", "official"])
def test_pretrained_backbone_is_loaded_and_can_be_frozen(tmp_path, labelled_case, source):
    root, _, _ = labelled_case
    torch.manual_seed(5)
    pre = GVSL(width=4)
    path = tmp_path / "pre.pt"
    if source == "project":
        checkpoint.save(path, pre, "pretrain", {"width": 4})
    else:
        torch.save(pre.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = train(cfg(root, tmp_path / "run", steps=3, val_every=3, width=8, pretrained=str(path),
                             freeze_backbone=True, normalize=None))
    assert (model.width, model.norm) == (4, "group")  # the backbone's width and (the paper's) norm win
    for k, v in pre.unet.state_dict().items():
        torch.testing.assert_close(model.unet.state_dict()[k], v, msg=k)  # loaded, and frozen
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():  # the same features: the normalisation the backbone was trained with
        torch.testing.assert_close(model.unet.eval()(x)[1], pre.unet.eval()(x)[1])
    ckpt = checkpoint.load(tmp_path / "run" / "gvsl_segmentation.pt")
    assert ckpt.meta["pretrained"] == str(path) and ckpt.meta["frozen_backbone"]
    # no --normalize: the backbone's preset (official GVSL weights: CT), else auto
    assert ckpt.meta["normalize"] == ("ct" if source == "official" else "auto")
    assert (ckpt.norm, ckpt.meta["config"]["norm"]) == ("group", "group")


def test_dataset_json_with_label_names(tmp_path, labelled_case):
    root, _, _ = labelled_case
    spec = {"labels": {"0": "background", "205": "grey-ish", "420": "white-ish"},
            "training": [{"image": "cases/images/case_0000.nii.gz", "label": "cases/labels/case.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    pairs, mapping = data.discover_labelled(tmp_path / "dataset.json")
    assert pairs == [(root / "images" / "case_0000.nii.gz", root / "labels" / "case.nii.gz")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg(tmp_path / "dataset.json", tmp_path / "run", steps=2, val_every=2))
    assert checkpoint.load(tmp_path / "run" / "gvsl_segmentation.pt").meta["labels"]["names"] == \
        ["background", "grey-ish", "white-ish"]


def test_mismatched_label_geometry_is_named(tmp_path, labelled_case):
    root, img, labels = labelled_case
    shifted = sitk.Image(labels)
    shifted.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(shifted, str(root / "labels" / "case.nii.gz"))
    with pytest.raises(DataError, match=r"case.nii.gz: its geometry .* differs from its image .*case_0000.nii.gz.*"
                                        r"does not cover the image; resample it onto its image's grid"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(cfg(root, tmp_path / "run", steps=1))


def test_a_label_map_on_a_finer_grid_covering_its_image_is_resampled_with_a_warning(tmp_path, labelled_case):
    """An export on another grid (here 1 mm over the 2 mm image's extent) is brought onto the image's
    grid by nearest neighbour, said, and trained on; the held-out cases are recorded by name."""
    root, img, labels = labelled_case
    size = [2 * n for n in labels.GetSize()]
    origin = np.array(img.GetOrigin()) - np.array(img.GetSpacing()) / 4  # the same outer box, 1 mm voxels
    fine = sitk.Resample(labels, size, sitk.Transform(), sitk.sitkNearestNeighbor, origin.tolist(),
                         [s / 2 for s in img.GetSpacing()], img.GetDirection(), 0)
    sitk.WriteImage(fine, str(root / "labels" / "case.nii.gz"))
    sitk.WriteImage(img, str(root / "images" / "other_0000.nii.gz"))
    sitk.WriteImage(labels, str(root / "labels" / "other.nii.gz"))
    with pytest.warns(UserWarning, match=r"case.nii.gz: its geometry .* resampled onto the image's grid"):
        train(cfg(root, tmp_path / "run", steps=2, val_every=2, val_fraction=0.5))
    meta = checkpoint.load(tmp_path / "run" / "gvsl_segmentation.pt").meta
    assert meta["labels"]["values"] == [0, 205, 420]
    (held_out,) = meta["cases"]["validation_cases"]
    assert Path(held_out).name in ("case_0000.nii.gz", "other_0000.nii.gz") and meta["cases"]["validation"] == 1


def test_label_values_missing_from_the_dataset_are_named_and_no_cache_stays(tmp_path, labelled_case):
    root, img, labels = labelled_case
    spec = {"labels": {"0": "background", "205": "grey"},  # 420 is missing
            "training": [{"image": "images/case_0000.nii.gz", "label": "labels/case.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(spec))
    script = ROOT / "GVSLTrainer" / "finetune.py"
    done = subprocess.run([sys.executable, str(script), "--data", str(root / "dataset.json"), "--output-dir",
                           str(tmp_path / "run"), "--steps", "1", "--no-progress", "--workers", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "case.nii.gz: label values [420] are not among the dataset's [0, 205]" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "_CacheItem" not in done.stderr
    assert not (tmp_path / "run" / "cache").exists()


def test_unmatched_images_are_reported(tmp_path, labelled_case):
    root, img, _ = labelled_case
    sitk.WriteImage(img, str(root / "images" / "other_0000.nii.gz"))
    with pytest.raises(DataError, match="other_0000.nii.gz: no label map of the same name"):
        data.discover_labelled(root)


def test_resume_after_interruption_reproduces_the_run(tmp_path, labelled_case, monkeypatch):
    import gvsl.finetune as ft

    root, _, _ = labelled_case
    # a warm-up and a cosine decay: a resumed run must continue the schedule exactly
    settings = dict(steps=10, val_every=5, checkpoint_every=1, crop=(16, 16, 16), width=4, log_every=1,
                    lr_schedule="cosine", warmup_steps=5, norm="group")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg(root, tmp_path / "a", **settings))
        real = ft.augment_pair
        calls = {"n": 0}

        def interrupted(*args):
            calls["n"] += 1
            if calls["n"] == 7:
                raise KeyboardInterrupt  # Ctrl-C during step 7
            return real(*args)

        monkeypatch.setattr(ft, "augment_pair", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(cfg(root, tmp_path / "b", **settings))
        monkeypatch.setattr(ft, "augment_pair", real)
        assert checkpoint.load(tmp_path / "b" / "checkpoint_last.pt").training_state["step"] == 6
        train(cfg(root, tmp_path / "b", resume=True, **settings))
    a = checkpoint.load(tmp_path / "a" / "checkpoint_last.pt")
    b = checkpoint.load(tmp_path / "b" / "checkpoint_last.pt")
    assert b.training_state["step"] == 10
    import csv
    rates = [[(r["step"], r["lr"]) for r in csv.DictReader(open(tmp_path / run / "log.csv"))] for run in "ab"]
    assert rates[0] == rates[1] and len(rates[0]) == 10 and len({lr for _, lr in rates[0]}) > 5
    for k, v in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[k], v, atol=1e-6, rtol=1e-5, msg=k)
    assert b.training_state["extra"]["best_dice"] == pytest.approx(a.training_state["extra"]["best_dice"])


def test_two_process_gloo_ddp_fine_tuning_keeps_replicas_identical(tmp_path, labelled_case):
    root, _, _ = labelled_case
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "Testing" / "ddp_worker.py"), str(out), str(root), "finetune"],
                   check=True, env=env, timeout=300, capture_output=True)
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], atol=0, rtol=0, msg=k)
    assert checkpoint.load(out / "gvsl_segmentation.pt").kind == "segmentation"
    torch.manual_seed(0)  # the trainer's initialisation (seed 0): training must have moved the weights
    fresh = GVSLSegmenter(3, width=4).state_dict()
    assert sum(not torch.equal(fresh[k], r0[k]) for k in r0 if r0[k].is_floating_point()) > len(r0) // 2


def test_resume_refuses_options_that_change_the_run(tmp_path, labelled_case, capsys):
    from gvsl.training import TrainingError

    root, _, _ = labelled_case
    settings = dict(steps=2, val_every=2, crop=(16, 16, 16), width=4, norm="group")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg(root, tmp_path / "r", **settings))
        with pytest.raises(TrainingError, match=r"cannot resume with different options \(norm: group then, "
                                                r"instance now, crop: .16, 16, 16. then, .24, 24, 24. now\)"):
            train(cfg(root, tmp_path / "r", **{**settings, "steps": 4, "norm": "instance", "crop": (24, 24, 24),
                                               "resume": True}))
        for option, value in (("lr_schedule", "cosine"), ("warmup_steps", 7), ("foreground_rate", 0.9),
                              ("augment_rate", 0.5), ("intensity_augment", False)):
            with pytest.raises(TrainingError, match=rf"cannot resume with different options \({option}: "):
                train(cfg(root, tmp_path / "r", **{**settings, "steps": 4, option: value, "resume": True}))
        capsys.readouterr()
        train(cfg(root, tmp_path / "r", **{**settings, "steps": 3, "resume": True}))  # the same run goes on
        assert "--steps 2 then, 3 now" in capsys.readouterr().out  # allowed, and said


def test_balanced_crops_find_a_small_class_that_foreground_crops_miss(tmp_path, anatomical_path):
    """A 4^3-voxel class beside a large one: balanced sampling centres half of its centred crops on it."""
    from gvsl.labels import LabelSpec

    img = sitk.ReadImage(str(anatomical_path), sitk.sitkFloat32)
    lab = np.zeros(sitk.GetArrayFromImage(img).shape, np.uint8)
    d, h, w = lab.shape
    lab[d // 4:d // 2, h // 4:h // 2, w // 4:w // 2] = 1
    lab[3 * d // 4:3 * d // 4 + 4, 3 * h // 4:3 * h // 4 + 4, 3 * w // 4:3 * w // 4 + 4] = 2  # 64 voxels
    labels = sitk.GetImageFromArray(lab)
    labels.CopyInformation(img)
    sitk.WriteImage(labels, str(tmp_path / "lab.nii.gz"))
    spec = LabelSpec([0, 1, 2], ["background", "big", "small"])
    store = data.VolumeStore([anatomical_path], data.Preprocessing(tuple(img.GetSpacing()), "mr"), tmp_path / "cache",
                             progress=False, labels=[tmp_path / "lab.nii.gz"], spec=spec)
    voxels = store[0]["class_voxels"]
    assert [len(v) for v in voxels] == [0, int((lab == 1).sum()), 64]

    def share_with_small(sampling):
        crops = data.LabelledCrops(store, [0], (16, 16, 16), seed=0, length=300, foreground_rate=1.0, sampling=sampling)
        return np.mean([(crops[i][1] == 2).any().item() for i in range(len(crops))])

    balanced, foreground = share_with_small("balanced"), share_with_small("foreground")
    assert 0.4 < balanced < 0.6 and balanced > 2.5 * foreground  # foreground: only crops that happen to reach it
    default = data.LabelledCrops(store, [0], (16, 16, 16), seed=0, length=1)  # the background as a third class
    shape = tuple(store[0]["image"].shape)
    random_share = np.mean([default._centre(voxels, shape, np.random.default_rng(i)) is None for i in range(900)])
    assert abs(random_share - 1 / 3) < 0.05, random_share
    with pytest.raises(ValueError, match="sampling must be one of"):
        data.LabelledCrops(store, [0], (16, 16, 16), 0, 1, sampling="everywhere")


def test_learning_rate_schedules():
    from gvsl.schedule import learning_rate

    assert [learning_rate(s, 1.0, 100, "constant", 10) for s in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    assert learning_rate(10, 1.0, 100, "cosine", 10) == pytest.approx(1.0)
    assert learning_rate(55, 1.0, 100, "cosine", 10) == pytest.approx(0.5)
    assert learning_rate(100, 1.0, 100, "cosine", 10) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(55, 1.0, 100, "poly", 10) == pytest.approx(0.5 ** 0.9)
    assert learning_rate(0, 1.0, 20, "poly", 100) == pytest.approx(0.5)  # warm-up capped at a tenth: 2 steps
    with pytest.raises(ValueError, match="lr schedule"):
        learning_rate(0, 1.0, 10, "step")


def test_augmentation_choices_are_separate(tmp_path):
    from gvsl import augment
    from gvsl.finetune import augment_pair

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 16, 16, 16)
    label = (image[:, 0] > 0.5).long()
    same_image, same_label = augment_pair(image, label, gen, augment.spatial_config("none"), intensity=False)
    assert torch.equal(same_image, image) and torch.equal(same_label, label)
    curved, kept = augment_pair(image, label, gen.manual_seed(1), augment.spatial_config("none"), intensity=True)
    assert torch.equal(kept, label) and not torch.equal(curved, image)  # geometry kept, intensities changed
    warped = [not torch.equal(augment_pair(image, label, gen.manual_seed(seed), augment.spatial_config("default"),
                                           intensity=False, rate=0.5)[0][i], image[i])
              for seed in range(8) for i in range(2)]
    assert 0 < sum(warped) < len(warped)  # a share of the crops, not all or none
    assert all(torch.equal(a, b) for a, b in zip(augment_pair(image, label, gen, augment.spatial_config("default"),
                                                              intensity=True, rate=0.0), (image, label)))
    light, full = augment.spatial_config("light"), augment.spatial_config("default")
    assert light.rotation == full.rotation / 2 and light.elastic_magnitude == full.elastic_magnitude / 2
    help_text = subprocess.run([sys.executable, str(ROOT / "GVSLTrainer" / "finetune.py"), "--help"],
                               capture_output=True, text=True).stdout
    assert "crops per step" in help_text and "pairs per step" not in help_text
    for flag in ("--sampling", "--foreground-rate", "--lr-schedule", "--warmup-steps", "--augment",
                 "--no-intensity-augment", "--augment-rate"):
        assert flag in help_text


def test_dice_per_class_matches_monais_metric_and_skips_absent_classes():
    """Counted from one confusion matrix instead of two int64 one-hot maps (memory grows with the
    classes), it must give MONAI's DiceMetric values; a class absent from the truth is NaN, not 0."""
    from monai.metrics import DiceMetric

    from gvsl.finetune import dice_per_class

    gen = torch.Generator().manual_seed(0)
    truth, pred = torch.randint(0, 5, (2, 12, 14, 10), generator=gen), torch.randint(0, 5, (2, 12, 14, 10), generator=gen)
    pred[0][truth[0] == 2] = 2  # some agreement, so the values differ per class
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    onehot = lambda x: torch.nn.functional.one_hot(x, 5).movedim(-1, 1)  # noqa: E731
    expected = metric(onehot(pred), onehot(truth)).numpy()
    ours = np.stack([dice_per_class(p, t, 5) for p, t in zip(pred, truth)])
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    truth[1][truth[1] == 3] = 0
    assert np.isnan(dice_per_class(pred[1], truth[1], 5)[2])  # class 3 is absent: not scored


def test_a_run_whose_classes_cannot_fit_is_refused_with_the_figures(monkeypatch):
    from gvsl import runtime
    from gvsl.finetune import check_memory
    from gvsl.training import TrainingError

    monkeypatch.setattr(runtime, "available_memory", lambda device: 4 * 2 ** 30)
    check_memory(10, (64, 64, 64), 2, 128 ** 3, torch.device("cpu"))  # about 0.2 GB: fits
    with pytest.raises(TrainingError, match=r"300 classes need about 13.6 GB of memory .* --batch-size 2 x --crop "
                                            r"128x128x62; validation: .* and 4.0 GB are available"):
        check_memory(300, (128, 128, 62), 2, 128 * 128 * 62 * 2, torch.device("cpu"))
