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
                             freeze_backbone=True))
    assert model.width == 4  # the backbone's width wins
    for k, v in pre.unet.state_dict().items():
        torch.testing.assert_close(model.unet.state_dict()[k], v, msg=k)  # loaded, and frozen
    ckpt = checkpoint.load(tmp_path / "run" / "gvsl_segmentation.pt")
    assert ckpt.meta["pretrained"] == str(path) and ckpt.meta["frozen_backbone"]


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
    with pytest.raises(DataError, match=r"case.nii.gz: its geometry .* differs from its image .*case_0000.nii.gz"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(cfg(root, tmp_path / "run", steps=1))


def test_unmatched_images_are_reported(tmp_path, labelled_case):
    root, img, _ = labelled_case
    sitk.WriteImage(img, str(root / "images" / "other_0000.nii.gz"))
    with pytest.raises(DataError, match="other_0000.nii.gz: no label map of the same name"):
        data.discover_labelled(root)


def test_resume_after_interruption_reproduces_the_run(tmp_path, labelled_case, monkeypatch):
    import gvsl.finetune as ft

    root, _, _ = labelled_case
    settings = dict(steps=4, val_every=2, checkpoint_every=1, crop=(16, 16, 16), width=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg(root, tmp_path / "a", **settings))
        real = ft.augment_pair
        calls = {"n": 0}

        def interrupted(*args):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # Ctrl-C during step 3
            return real(*args)

        monkeypatch.setattr(ft, "augment_pair", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(cfg(root, tmp_path / "b", **settings))
        monkeypatch.setattr(ft, "augment_pair", real)
        assert checkpoint.load(tmp_path / "b" / "checkpoint_last.pt").training_state["step"] == 2
        train(cfg(root, tmp_path / "b", resume=True, **settings))
    a = checkpoint.load(tmp_path / "a" / "checkpoint_last.pt")
    b = checkpoint.load(tmp_path / "b" / "checkpoint_last.pt")
    assert b.training_state["step"] == 4
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
