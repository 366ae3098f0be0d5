"""Model files: the project's format, official GVSL state_dicts, and everything else rejected clearly."""
import pytest
import torch

from gvsl import checkpoint
from gvsl.checkpoint import CheckpointError
from gvsl.networks import GVSL


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    fixed, moving = torch.rand(2, 1, 1, 32, 16, 16, generator=g)  # 2 values per channel at the bottleneck
    with torch.no_grad():
        return model.eval()(fixed, moving)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_state_dict_loads_strictly(tmp_path, prefix):
    torch.manual_seed(1)
    ref = GVSL(width=8)
    path = tmp_path / "GVSL_epoch_1000.pth"
    torch.save({prefix + k: v for k, v in ref.state_dict().items()}, path)  # what the reference code writes
    ckpt = checkpoint.load(path)
    assert (ckpt.source, ckpt.kind, ckpt.width) == ("official", "pretrain", 8)
    model = checkpoint.build_gvsl(ckpt)
    torch.testing.assert_close(outputs(model).warped, outputs(ref).warped)


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_project_checkpoint_round_trip(tmp_path, norm):
    torch.manual_seed(2)
    model = GVSL(width=4, norm=norm)
    path = checkpoint.save(tmp_path / "m.pt", model, "pretrain",
                           {"width": 4, "norm": norm, "normalize": "mr", "spacing": [1.5] * 3})
    ckpt = checkpoint.load(path)
    assert (ckpt.source, ckpt.kind, ckpt.meta["normalize"], ckpt.norm) == ("project", "pretrain", "mr", norm)
    assert "torch_version" in ckpt.meta["provenance"]
    torch.testing.assert_close(outputs(checkpoint.build_gvsl(ckpt)).affine, outputs(model).affine)


def test_files_that_are_not_gvsl_models_are_named(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt: not a PyTorch checkpoint"):
        checkpoint.load(text)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="resnet.pth: a PyTorch state_dict, but not of a GVSL model.*conv1.weight"):
        checkpoint.load(other)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="list.pt: a PyTorch file holding a list"):
        checkpoint.load(listing)
    with pytest.raises(CheckpointError, match="absent.pt: no such file"):
        checkpoint.load(tmp_path / "absent.pt")


def test_wrong_width_or_kind_is_reported(tmp_path):
    path = checkpoint.save(tmp_path / "m.pt", GVSL(width=4), "pretrain", {"width": 8})
    with pytest.raises(CheckpointError, match="do not fit a width-8 GVSL network"):
        checkpoint.build_gvsl(checkpoint.load(path))
    labels = {"values": [0, 1], "names": ["background", "a"], "colours": [[0, 0, 0], [1, 0, 0]]}
    seg = checkpoint.save(tmp_path / "s.pt", GVSL(width=4), "segmentation", {"width": 4, "labels": labels})
    with pytest.raises(CheckpointError, match="is a segmentation model"):
        checkpoint.build_gvsl(checkpoint.load(seg))


def test_atomic_save_never_leaves_a_torn_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    checkpoint.atomic_save({"step": 1}, path)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]
