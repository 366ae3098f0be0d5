"""Does a GVSL pre-training register? The check to run before any fine-tuning comparison.

GVSL's backbone is meant to learn from registering pairs (the Z-matching heads) as well as from
restoring damaged images. Where those heads never leave their identity start, pre-training is
restoration alone, and a fine-tuning comparison does not measure the paper's method. This registers
held-out pairs of crops, taken at the same relative place in two held-out cases as pre-training takes
its pairs, with the pre-trained network: not at all, with its affine alone, and with affine and
displacement. It scores each by local NCC (the pretext loss) and by the label Dice of the warped
moving labels against the fixed ones.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from gvsl import data, spatial
from gvsl.losses import local_ncc
from gvsl.networks import GVSL
from gvsl.registration.quality import dice

STAGES = ("unregistered", "affine", "deformable")


@torch.no_grad()
def registration_quality(model: GVSL, cases: Sequence[dict], crop: Sequence[int], positions: int, seed: int = 0,
                         ncc_window: int = 9) -> dict[str, float | None]:
    """Mean local NCC loss and mean label Dice (over the labels present in either crop; None where no
    crop showed one) by stage, over ``positions`` random crop places and both directions of every pair
    of ``cases`` ({"image", "label"}, as a labelled ``data.VolumeStore`` holds them); with the mean
    displacement (voxels) and the mean largest entry of affine minus identity (linear part), which
    stay near 0 for heads that learned nothing."""
    if len(cases) < 2:
        raise ValueError(f"registering pairs needs 2 or more cases, got {len(cases)}")
    model.eval()
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    rows: dict[str, list[float]] = {}
    for _ in range(positions):
        position = rng.random(3)
        crops = [(data.crop_at(c["image"], crop, position)[None, None].float().to(device),
                  data.crop_at(c["label"], crop, position)[None, None].float().to(device)) for c in cases]
        for i, (fixed, fixed_labels) in enumerate(crops):
            truth = fixed_labels.cpu().numpy().astype(int)
            truth_present = set(np.unique(truth))
            for j, (moving, moving_labels) in enumerate(crops):
                if i == j:
                    continue
                out = model(fixed, moving)
                transforms = {"unregistered": (None, None), "affine": (out.affine, None),
                              "deformable": (out.affine, out.displacement)}
                for stage, (matrix, displacement) in transforms.items():
                    warped = spatial.warp(moving, matrix, displacement)
                    warped_labels = spatial.warp(moving_labels, matrix, displacement, mode="nearest")
                    rows.setdefault(f"ncc_{stage}", []).append(local_ncc(warped, fixed, ncc_window).item())
                    labels = warped_labels.cpu().numpy().astype(int)
                    present = sorted((truth_present | set(np.unique(labels))) - {0})
                    scores = [d for d in dice(labels, truth, present).values() if d is not None]
                    if scores:
                        rows.setdefault(f"dice_{stage}", []).append(float(np.mean(scores)))
                rows.setdefault("displacement_voxels", []).append(out.displacement.abs().mean().item())
                linear = out.affine[0, :, :3] - torch.eye(3, device=device)
                rows.setdefault("affine_deviation", []).append(linear.abs().max().item())
    keys = [f"{k}_{stage}" for k in ("ncc", "dice") for stage in STAGES] + ["displacement_voxels", "affine_deviation"]
    return {k: round(float(np.mean(rows[k])), 4) if rows.get(k) else None for k in keys}  # None: no labels in any crop
