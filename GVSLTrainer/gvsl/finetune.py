"""Fine-tuning a segmentation model from a GVSL backbone: the job behind ``GVSLTrainer/finetune.py``.

The paper's downstream set-up: backbone + a 3x3x3 convolution to the classes, Dice + cross-entropy.
``--freeze-backbone`` trains only the head (the paper's linear evaluation).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import augment, checkpoint, data, runtime, schedule, spatial
from .choices import NORMS
from .config import TrainConfig, to_dict
from .labels import LabelSpec
from .logs import LearningCurve, TrainingLog
from .networks import GVSLSegmenter, check_input_size
from .training import RunTimeEstimate, TrainingError, TrainingRun, step_seed
from .segmentation import SegmentationOptions, build_segmenter, sliding_window_probabilities

FINAL = "gvsl_segmentation.pt"
# Bytes per class and voxel: of the training crops (batch x crop) and of the largest validation case.
# Measured as peak resident memory at 2 and 120 classes on the CPU (19.3 and 8.9), with a margin.
CROP_BYTES_PER_CLASS = 24
VALIDATION_BYTES_PER_CLASS = 10


# Options a resumed run must share with the run it continues (the validation split included).
RESUME_FIXED = ("width", "norm", "crop", "batch_size", "seed", "normalize", "spacing", "lr", "val_fraction",
                "freeze_backbone", "sampling", "augment", "lr_schedule", "warmup_steps", "foreground_rate",
                "augment_rate", "intensity_augment")


@dataclass
class FinetuneConfig(TrainConfig):
    output_dir: str = field(default="gvsl_runs/finetune", metadata={"help": "where checkpoints and logs go"})
    steps: int = field(default=40_000, metadata={"help": "optimisation steps in total (the paper: 40000)"})
    pretrained: str | None = field(default=None, metadata={
        "help": "a GVSL pre-training checkpoint (this project's or an official GVSL_epoch_*.pth) for the "
                "backbone; omitted: train from scratch"})
    freeze_backbone: bool = field(default=False, metadata={"help": "train only the segmentation head "
                                                                   "(linear evaluation)"})
    batch_size: int = field(default=2, metadata={"help": "crops per step and per process"})
    val_every: int = field(default=500, metadata={"help": "steps between validations (per-class Dice)"})
    val_fraction: float = field(default=0.2, metadata={"help": "share of the cases held out for validation"})
    sampling: str = field(default="balanced", metadata={
        "help": "where crops are centred: balanced (a class drawn uniformly among those present, then one of "
                "its voxels: small structures are seen as often as large ones), foreground (any labelled "
                "voxel), uniform (anywhere)", "choices": data.SAMPLINGS})
    foreground_rate: float | None = field(default=None, metadata={
        "help": "share of the crops centred by --sampling balanced or foreground, the rest random; default: "
                "n/(n+1) for n classes in the case (the background counts as one more class, as in MONAI's "
                "RandCropByLabelClassesd): 5/6 for 5 classes, 1/2 for one"})
    lr_schedule: str = field(default="poly", metadata={
        "help": "learning rate after the warm-up: constant, or a cosine or poly (power 0.9) decay to zero at "
                "--steps", "choices": schedule.SCHEDULES})
    warmup_steps: int = field(default=100, metadata={
        "help": "linear warm-up of the learning rate (at most a tenth of --steps)"})
    augment: str = field(default="default", metadata={
        "help": "spatial augmentation (random affine + elastic warp): none, light (half the bounds) or default",
        "choices": augment.SPATIAL_LEVELS})
    intensity_augment: bool = field(default=True, metadata={
        "help": "the random intensity curve; turn off where intensity defines a class (CT in Hounsfield units)"})
    augment_rate: float = field(default=0.2, metadata={
        "help": "share of the crops given the spatial augmentation and, independently, the intensity curve "
                "(nnU-Net applies each of its transforms to 0.1-0.3 of the samples)"})
    norm: str = field(default="instance", metadata={
        "help": "the U-Net's normalisation: instance (each channel alone, as MONAI's BasicUNet and nnU-Net; "
                "needs crops over 16 voxels along an axis) or group (the paper's GroupNorm, channels/8 per "
                "group: one group at width 8); with --pretrained, the backbone's. From scratch at width 8, "
                "mean held-out Dice at 600 steps: 0.65/0.68 (seeds 0/1) with instance, 0.58/0.61 with group",
        "choices": NORMS})


def split_cases(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, validation) case indices; with a single case both are that case."""
    if n < 2:
        warnings.warn("only one labelled case: validating on the training case", stacklevel=2)
        return [0], [0]
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = min(n - 1, max(1, round(fraction * n)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def label_spec(pairs: list[tuple[Path, Path]], mapping: dict | None, source: str = "") -> LabelSpec:
    if mapping is not None:
        try:
            return LabelSpec.from_mapping(mapping, source)
        except ValueError as e:
            raise data.DataError(str(e)) from None
    return LabelSpec.infer(sitk.GetArrayFromImage(data.read_labels(lbl)) for _, lbl in pairs)


def augment_pair(image: torch.Tensor, label: torch.Tensor, gen: torch.Generator, cfg: augment.AugmentConfig | None,
                 intensity: bool = True, rate: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random affine + elastic warp for image (linear) and classes (nearest) on a share ``rate`` of
    the crops unless ``cfg`` is None, then, with ``intensity``, a random intensity curve on another
    draw of that share. Every crop augmented slows learning far more than it helps at short budgets."""
    chosen = augment.chosen(gen, image.shape[0], rate)
    if cfg is not None and bool(chosen.any()):
        image, label = image.clone(), label.clone()
        n, shape = int(chosen.sum()), tuple(image.shape[2:])
        matrix = augment.random_affine(gen, n, shape, cfg)
        field_ = augment.random_elastic(gen, n, shape, cfg)
        image[chosen] = spatial.warp(image[chosen], matrix, field_)
        label[chosen] = spatial.warp(label[chosen][:, None].float(), matrix, field_,
                                     mode="nearest")[:, 0].round().long()
    return (augment.nonlinear_intensity(image, gen, rate) if intensity else image), label


def dice_per_class(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> np.ndarray:
    """Each foreground class's Dice from one confusion count; NaN where the truth lacks the class (as
    MONAI's DiceMetric with ignore_empty). DiceMetric needs both maps one-hot in int64, 8 bytes x
    classes x voxels each: 2.4 GB per map for 300 classes on a 128x128x62 case."""
    counts = torch.bincount(truth.reshape(-1).long() * num_classes + pred.reshape(-1).long(),
                            minlength=num_classes ** 2).reshape(num_classes, num_classes).double()
    in_truth, in_pred = counts.sum(1), counts.sum(0)
    dice = 2 * counts.diagonal() / (in_truth + in_pred)
    dice[in_truth == 0] = float("nan")
    return dice[1:].numpy()


def validate(model: torch.nn.Module, store: data.VolumeStore, indices: list[int], crop: tuple[int, ...],
             num_classes: int, device: torch.device) -> np.ndarray:
    """Per-class (foreground) Dice, averaged over the validation cases that hold the class (NaN for a
    class none holds), sliding windows as at inference."""
    model.eval()
    per_case = []
    for i in indices:
        item = store[i]
        probs = sliding_window_probabilities(model, item["image"][None, None], crop, SegmentationOptions(), device)
        per_case.append(dice_per_class(probs.argmax(1)[0], item["label"], num_classes))
        del probs
    model.train()
    per_case = np.stack(per_case)
    held = np.isfinite(per_case).sum(0)
    return np.where(held > 0, np.nansum(per_case, 0) / np.maximum(held, 1), np.nan)


def check_memory(num_classes: int, crop: tuple[int, ...], batch_size: int, val_voxels: int,
                 device: torch.device) -> None:
    """Refuse a run whose class count cannot fit, before any step: what grows with the classes is
    the class scores of the training crops (logits, softmax, one-hot target and their gradients)
    and, at validation, the blended class probabilities of a whole case, kept on the host."""
    crop_bytes = CROP_BYTES_PER_CLASS * num_classes * batch_size * int(np.prod(crop))
    val_bytes = VALIDATION_BYTES_PER_CLASS * num_classes * val_voxels
    checks = [(max(val_bytes, crop_bytes if device.type == "cpu" else 0),  # freed before validation
               runtime.available_memory(torch.device("cpu")), "memory")]
    if device.type != "cpu":
        checks.append((crop_bytes, runtime.available_memory(device), f"{device.type} memory"))
    for needed, have, where in checks:
        if have is not None and needed > have:
            raise TrainingError(
                f"{num_classes} classes need about {needed / 2 ** 30:.1f} GB of {where} (training crops: "
                f"{crop_bytes / 2 ** 30:.1f} GB for --batch-size {batch_size} x --crop {'x'.join(map(str, crop))}; "
                f"validation: {val_bytes / 2 ** 30:.1f} GB for a {val_voxels}-voxel case), and "
                f"{have / 2 ** 30:.1f} GB are available. Use a smaller --crop or --batch-size, a coarser "
                "--spacing, or fewer classes (merge them in the dataset's labels)")


def normalisation(given: str | None, pretrained, show: bool) -> str:
    """The preset to fine-tune with: the user's, else the pre-trained backbone's (its features were learnt
    on images normalised that way), else auto; a preset other than the backbone's is said."""
    theirs = pretrained.meta.get("normalize") if pretrained is not None else None
    if given is None:
        if theirs and show:
            print(f"Normalisation: {theirs}, the pre-trained backbone's (--normalize overrides it)")
        return theirs or "auto"
    if theirs and given != theirs:
        warnings.warn(f"--normalize {given}, but the backbone was pre-trained on images normalised as {theirs}: "
                      "its features may not transfer", stacklevel=2)
    return given


def train(cfg: FinetuneConfig) -> tuple[GVSLSegmenter, float]:
    """Fine-tune (or resume); returns the best model (by mean validation Dice) and that Dice."""
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    if not cfg.data:
        raise data.DataError("fine-tuning needs --data: a dataset.json or a folder with images/ and labels/")
    pairs, mapping = data.discover_labelled(cfg.data)
    spec = label_spec(pairs, mapping, str(cfg.data))
    pretrained = checkpoint.load(cfg.pretrained) if cfg.pretrained else None
    if pretrained is not None and pretrained.kind != "pretrain":
        raise checkpoint.CheckpointError(f"{pretrained.path}: is a {pretrained.kind} model, not a GVSL "
                                         "pre-training checkpoint")
    run = TrainingRun(cfg, "segmentation")
    if pretrained is not None:
        for option in ("width", "norm"):  # the backbone's own, whatever was asked
            if getattr(pretrained, option) != getattr(cfg, option) and run.show:
                print(f"Using the pre-trained backbone's {option} {getattr(pretrained, option)} "
                      f"(not {getattr(cfg, option)})")
            setattr(cfg, option, getattr(pretrained, option))
    cfg.normalize = normalisation(cfg.normalize, pretrained, run.show)
    check_input_size(tuple(cfg.crop), cfg.norm)
    store = run.store([p for p, _ in pairs], data.Preprocessing(tuple(cfg.spacing), cfg.normalize),
                      labels=[lbl for _, lbl in pairs], spec=spec)
    if run.show:
        print(data.presets_line(cfg.normalize, store.presets))
    if not any(bool((store[i]["label"] > 0).any()) for i in range(len(store))):
        raise data.DataError(f"{cfg.data}: every label map is all background (0): there is nothing to learn "
                             f"(e.g. {pairs[0][1]}); check the label files")
    train_idx, val_idx = split_cases(len(store), cfg.val_fraction, cfg.seed)
    check_memory(spec.num_classes, tuple(cfg.crop), cfg.batch_size,
                 max(store[i]["image"].numel() for i in val_idx), run.device)

    runtime.seed_everything(cfg.seed)
    model = GVSLSegmenter(spec.num_classes, width=cfg.width, norm=cfg.norm)
    if pretrained is not None:
        model.load_backbone(pretrained.state_dict)
    if cfg.freeze_backbone:
        model.unet.requires_grad_(False)
    model = run.prepare(model)
    start = run.resume(RESUME_FIXED)
    best = float(run.extra.get("best_dice", -1.0))
    meta = {"width": cfg.width, "norm": cfg.norm, "in_channels": 1, "labels": spec.as_dict(),
            "normalize": cfg.normalize, "normalize_chosen": data.chosen_presets(store.presets),
            "spacing": list(cfg.spacing), "crop": list(cfg.crop), "config": to_dict(cfg),
            "pretrained": str(cfg.pretrained) if cfg.pretrained else None,
            "pretrained_source": pretrained.source if pretrained is not None else None,
            "frozen_backbone": cfg.freeze_backbone, "cases": {"train": len(train_idx), "validation": len(val_idx),
                                                         "validation_cases": [str(store.paths[i]) for i in val_idx]},
            "skipped": {str(p): why for p, why in store.skipped.items()}}

    net = run.wrapped()  # DDP registers only the parameters that train (the head, when frozen)
    loader = run.loader(data.LabelledCrops(store, train_idx, cfg.crop, cfg.seed,
                                           cfg.steps * run.dist.world_size * cfg.batch_size,
                                           cfg.foreground_rate, cfg.sampling))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    aug_cfg = augment.spatial_config(cfg.augment)
    gen = torch.Generator(device=run.device)
    class_columns = [f"dice_{name}" for name in spec.names[1:]]
    logbook = TrainingLog(run.out, start, ["loss", "lr", "val_dice", *class_columns, "steps_per_s"],
                          enabled=run.dist.is_main)
    curve = LearningCurve(run.out, spec.names[1:], start) if run.dist.is_main else None

    bar = tqdm(total=cfg.steps, initial=start, desc="Fine-tuning", unit="step", disable=not run.show,
               dynamic_ncols=True)
    estimate = RunTimeEstimate(cfg, run.device, start, tqdm.write if run.dist.is_main else None)
    step, window_loss, window_start, dice = start, [], time.perf_counter(), float("nan")

    def save_now() -> int:
        run.save_last(step, meta, best_dice=best)
        return step

    try:
        with run.checkpoint_on_interrupt(save_now):
            for image, label in loader:
                gen.manual_seed(step_seed(cfg.seed, step, run.dist.rank))
                lr = schedule.learning_rate(step, cfg.lr, cfg.steps, cfg.lr_schedule, cfg.warmup_steps)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                image, label = image.to(run.device, non_blocking=True), label.to(run.device, non_blocking=True)
                with torch.no_grad():
                    image, label = augment_pair(image, label, gen, aug_cfg, cfg.intensity_augment, cfg.augment_rate)
                if run.channels_last:
                    image = image.contiguous(memory_format=torch.channels_last_3d)
                with run.autocast():
                    loss = loss_fn(net(image).float(), label[:, None])
                if not torch.isfinite(loss):
                    raise TrainingError(f"the loss became {loss.item()} at step {step + 1}; try a lower --lr")
                run.optimizer.zero_grad(set_to_none=True)
                run.scaler.scale(loss).backward()
                run.scaler.step(run.optimizer)
                run.scaler.update()
                step += 1
                estimate.step(step)
                window_loss.append(loss.item())
                bar.update(1)
                validated = step % cfg.val_every == 0 or step == cfg.steps
                if validated:
                    per_class = validate(model, store, val_idx, tuple(cfg.crop), spec.num_classes, run.device)
                    dice = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else 0.0
                    class_dice = dict(zip(class_columns, map(float, per_class)))
                    if dice > best:
                        best = dice
                        if run.dist.is_main:
                            checkpoint.save(run.out / FINAL, model, "segmentation", {
                                **meta, "steps": step, "val_dice": dice,
                                "val_dice_per_class": dict(zip(spec.names[1:], map(float, per_class)))})
                if step % cfg.log_every == 0 or validated:
                    elapsed = time.perf_counter() - window_start
                    row = {"loss": float(np.mean(window_loss)), "lr": lr, "steps_per_s": len(window_loss) / elapsed}
                    if validated:
                        row.update(val_dice=dice, **class_dice)
                    logbook.write(step, row)
                    if curve is not None:
                        curve.add(step, row)
                    bar.set_postfix(loss=f"{np.mean(window_loss):.4f}", val_dice=f"{dice:.3f}", best=f"{best:.3f}")
                    window_loss, window_start = [], time.perf_counter()
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    save_now()
    finally:
        bar.close()
        logbook.close()
    save_now()
    run.dist.barrier()
    if run.dist.is_main:
        print(f"Segmentation model: {(run.out / FINAL).resolve()} (best validation Dice {best:.4f})")
        if store.skipped:
            print(store.skipped_summary())
    best_model, _ = build_segmenter(checkpoint.load(run.out / FINAL))
    return best_model, best
