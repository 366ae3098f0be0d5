"""The GVSL network: shapes, gradients, batches, devices and the reference's parameter names."""
import pytest
import torch

from gvsl.losses import GVSLLoss
from gvsl.networks import GVSL, channels, check_input_size

# (name, shape) pairs of the reference implementation at its default width, written out by hand
REFERENCE_KEYS = {
    "unet.inc.double_conv.0.weight": (32, 1, 3, 3, 3),
    "unet.inc.double_conv.1.weight": (32,),
    "unet.down1.maxpool_conv.1.double_conv.0.weight": (64, 32, 3, 3, 3),
    "unet.down4.maxpool_conv.1.double_conv.3.weight": (512, 512, 3, 3, 3),
    "unet.up1.conv.double_conv.0.weight": (256, 768, 3, 3, 3),
    "unet.up4.conv.double_conv.3.weight": (32, 32, 3, 3, 3),
    "f_conv.double_conv.0.weight": (256, 1024, 3, 3, 3),
    "sp_conv.double_conv.0.weight": (16, 64, 3, 3, 3),
    "sp_conv.double_conv.4.bias": (16,),
    "res_conv.0.weight": (16, 32, 3, 3, 3),
    "res_conv.1.weight": (16,),
    "res_conv.3.weight": (1, 16, 1, 1, 1),
    "out_flow.weight": (3, 16, 3, 3, 3),
    "fc_rot.weight": (3, 256),
    "fc_scl.bias": (3,),
    "fc_trans.weight": (3, 256),
    "fc_shear.weight": (6, 256),
}


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append("mps")
    return out


def test_parameter_names_and_shapes_equal_the_reference():
    sd = GVSL(width=32).state_dict()
    for name, shape in REFERENCE_KEYS.items():
        assert name in sd, name
        assert tuple(sd[name].shape) == shape, name
    # GroupNorm groups as the reference: channels // 8
    assert GVSL(width=32).unet.inc.double_conv[1].num_groups == 4
    assert len(sd) == 104  # every parameter the reference has, and no more


def test_instance_norm_has_one_channel_per_group_and_the_same_parameters():
    torch.manual_seed(0)
    group, instance = GVSL(width=8), GVSL(width=8, norm="instance")
    norms = [m for m in instance.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == m.num_channels for m in norms)
    assert group.unet.inc.double_conv[1].num_groups == 1  # the paper's channels // 8 at width 8
    instance.load_state_dict(group.state_dict(), strict=True)  # interchangeable files
    fixed, moving = torch.rand(2, 1, 1, 32, 17, 8)  # 2 x 2 x 1 at the bottleneck
    with torch.no_grad():  # same weights, another normalisation: other outputs
        assert not torch.allclose(group.eval()(fixed, moving).restored, instance.eval()(fixed, moving).restored)
    with pytest.raises(ValueError, match="norm must be one of instance, group"):
        GVSL(width=8, norm="batch")
    check_input_size((17, 8, 8), "instance")  # 2 values per channel at the bottleneck: enough
    check_input_size((16, 16, 16), "group")
    with pytest.raises(ValueError, match="instance normalisation needs inputs over 16 voxels .* got 16 x 16 x 16"):
        check_input_size((16, 16, 16), "instance")


def test_width_scales_channels():
    assert channels(8) == (8, 16, 32, 64, 128, 64, 32, 16, 8)
    with pytest.raises(ValueError):
        channels(3)


@pytest.mark.parametrize("device", devices())
def test_output_shapes_on_non_cubic_batched_input(device):
    torch.manual_seed(0)
    model = GVSL(width=4).to(device)
    fixed, moving = torch.rand(2, 2, 1, 20, 24, 37, device=device)
    out = model(fixed, moving)
    assert out.restored.shape == (2, 1, 20, 24, 37)
    assert out.warped.shape == (2, 1, 20, 24, 37)
    assert out.affine.shape == (2, 3, 4)
    assert out.displacement.shape == (2, 3, 20, 24, 37)
    assert out.warped.device.type == device


def test_fresh_model_starts_near_identity():
    torch.manual_seed(0)
    model = GVSL(width=4)
    fixed, moving = torch.rand(2, 2, 1, 16, 16, 32)
    out = model(fixed, moving)
    torch.testing.assert_close(out.affine[:, :, :3], torch.eye(3).expand(2, 3, 3), atol=0.01, rtol=0)
    assert out.affine[:, :, 3].abs().max() < 0.5  # voxels
    assert out.displacement.abs().max() < 0.05


def test_gradients_reach_every_head():
    torch.manual_seed(0)
    model = GVSL(width=4)
    fixed, moving = torch.rand(2, 2, 1, 16, 24, 20)
    out = model(fixed, moving)
    GVSLLoss()(fixed, out.warped, out.restored, out.displacement)["total"].backward()
    for name in ["fc_rot.weight", "fc_scl.weight", "fc_trans.weight", "fc_shear.weight", "f_conv.double_conv.0.weight",
                 "sp_conv.double_conv.0.weight", "out_flow.weight", "res_conv.0.weight", "unet.inc.double_conv.0.weight",
                 "unet.down4.maxpool_conv.1.double_conv.0.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_each_sample_of_a_batch_is_independent():
    torch.manual_seed(0)
    model = GVSL(width=4).eval()
    fixed, moving = torch.rand(2, 3, 1, 16, 16, 24)
    batched = model(fixed, moving)
    for i in range(3):
        single = model(fixed[i:i + 1], moving[i:i + 1])
        torch.testing.assert_close(single.warped, batched.warped[i:i + 1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(single.affine, batched.affine[i:i + 1], atol=1e-5, rtol=1e-4)
