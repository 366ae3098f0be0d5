"""The held-out registration check of pre-training (benchmarks/pretext_check.py) tells a network that
registers from one that does not."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pretext_check  # noqa: E402

from gvsl import spatial  # noqa: E402
from gvsl.networks import GVSL, GVSLOutput  # noqa: E402

SHIFT = (2, -1, 2)  # voxels along z, y, x between the two cases
SEARCH = 3


class ShiftSearch(GVSL):
    """A registration that works without training: the integer translation, within +-SEARCH voxels, that
    best matches the crops' centres, as the affine; no displacement."""

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> GVSLOutput:
        inner = (slice(None), slice(None), *[slice(SEARCH, s - SEARCH) for s in fixed.shape[2:]])
        best, shift = None, None
        r = range(-SEARCH, SEARCH + 1)
        for t in ((z, y, x) for z in r for y in r for x in r):
            error = (torch.roll(moving, [-v for v in t], dims=(2, 3, 4))[inner] - fixed[inner]).pow(2).mean()
            if best is None or error < best:
                best, shift = error, t
        affine = spatial.identity_matrix(1)
        affine[0, :, 3] = torch.tensor(shift[::-1], dtype=torch.float32)  # (x, y, z) voxels
        return GVSLOutput(fixed, spatial.warp(moving, affine), affine, torch.zeros(1, 3, *fixed.shape[2:]))


def two_cases() -> list[dict]:
    """Smooth random anatomy with three label values, and the same moved by SHIFT voxels."""
    gen = torch.Generator().manual_seed(0)
    image = F.avg_pool3d(torch.rand(1, 1, 48, 48, 48, generator=gen), 3, stride=1, padding=1)[0, 0]
    image = (image - image.min()) / (image.max() - image.min())
    labels = torch.bucketize(image, torch.tensor([0.4, 0.6])).to(torch.uint8)
    moved = [torch.roll(v, SHIFT, dims=(0, 1, 2)) for v in (image, labels)]
    return [{"image": image, "label": labels}, {"image": moved[0], "label": moved[1]}]


def test_a_registering_network_scores_above_no_registration():
    q = pretext_check.registration_quality(ShiftSearch(width=4), two_cases(), (32, 32, 32), positions=3)
    assert q["dice_affine"] > q["dice_unregistered"] + 0.2
    assert q["dice_affine"] > 0.85
    assert q["ncc_affine"] < q["ncc_unregistered"] - 0.2
    assert q["dice_deformable"] == pytest.approx(q["dice_affine"])
    assert q["affine_deviation"] == 0 and q["displacement_voxels"] == 0


def test_an_untrained_network_registers_nothing():
    torch.manual_seed(0)
    q = pretext_check.registration_quality(GVSL(width=4), two_cases(), (32, 32, 32), positions=3)
    assert q["dice_affine"] == pytest.approx(q["dice_unregistered"], abs=0.02)
    assert q["dice_deformable"] == pytest.approx(q["dice_unregistered"], abs=0.02)
    assert q["displacement_voxels"] < 0.01 and q["affine_deviation"] < 0.02


def test_one_case_is_refused():
    with pytest.raises(ValueError, match="2 or more cases"):
        pretext_check.registration_quality(GVSL(width=4), two_cases()[:1], (32, 32, 32), positions=1)
