"""Segment a volume with a fine-tuned GVSL model, or with labelled atlases and no model.

    python GVSLTrainer/segment.py --model gvsl_segmentation.pt --input scan.nii.gz --output labels.nii.gz
    python GVSLTrainer/segment.py --atlases atlases.csv --input scan.nii.gz --output labels.seg.nrrd

The label map has the input's exact geometry (size, spacing, origin, direction) and the dataset's
original label values. Sliding windows of the model's crop size overlap and are blended with
Gaussian weights; --tta averages over flips along each axis (fine-tuning never mirrors: not for
left/right structures); --probabilities DIR also writes one probability map per class.
"""
import argparse
import json
from pathlib import Path
from typing import NoReturn

from gvsl.cli import exit_now, run
from gvsl.choices import DEVICES  # torch-free: --help answers at once


def overlap(text: str) -> float:
    """argparse type: a window overlap MONAI can use in reasonable time (0.99 ran for 12 minutes)."""
    value = float(text)
    if not 0 <= value <= 0.9:  # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"must be between 0 and 0.9, got {text} (0.9 already runs each voxel "
                                         "through about 1000 windows)")
    return value


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a fine-tuned model (gvsl_segmentation.pt)")
    source.add_argument("--atlases", metavar="CSV",
                        help="no model: labelled atlases (a CSV with the columns image and labels), each registered "
                             "onto the input and their labels fused by locally weighted voting (cohort.py "
                             "label-fusion does the same with every option)")
    p.add_argument("--input", required=True, help="the volume to segment (NIfTI, NRRD, MHA...)")
    p.add_argument("--output", required=True, help="the label map to write (.nii.gz, .nrrd...), or a Slicer segmentation "
                                                   "(.seg.nrrd: each segment's name, colour and value in its header)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--overlap", type=overlap, default=0.5, help="overlap of neighbouring windows, 0 to 0.9 "
                                                                 "(0.5: each voxel seen about 8 times)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average over flips along each axis. The model is trained without "
                        "mirroring, so a flip swaps left and right structures: not for lateralised classes (on a "
                        "left-hemisphere atlas task it took the hippocampus from Dice 0.72 to 0)")
    p.add_argument("--amp", action="store_true", help="mixed precision for the network on a GPU (bf16 where "
                                                      "supported, else fp16): faster, about the same labels")
    p.add_argument("--probabilities", metavar="DIR", help="also write one probability map per class here")
    p.add_argument("--classes", metavar="JSON", help="also write the model's classes here (label values, names, "
                                                     "colours), so a viewer can name the segments without torch")
    p.add_argument("--largest-component", action="store_true",
                   help="keep each class's largest connected piece only (nnU-Net's post-processing): stray "
                        "islands become background")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p.parse_args(argv)


def by_atlases(args: argparse.Namespace) -> None:
    """``--atlases``: multi-atlas label fusion, its registrations in a temporary folder beside the output."""
    import tempfile

    from gvsl.cohort.label_fusion import label_fusion
    from gvsl.outputs import check_image_output, write_text

    if args.tta or args.amp or args.largest_component:
        raise ValueError("--tta, --amp and --largest-component apply to a model, not to --atlases")
    output = check_image_output(args.output, (args.input, args.atlases))
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.atlases-", dir=output.parent) as work:
        done = label_fusion(args.input, args.atlases, output, ["--device", args.device], work_dir=work,
                            probabilities=args.probabilities, progress=args.progress)
    if args.classes:
        from gvsl.labels import LabelSpec

        write_text(json.dumps(LabelSpec(done["values"], done["names"], done["colours"]).as_dict()), args.classes)
    print(f"Segmented {Path(args.input).name} with {done['atlases']} atlases (weighted voting): "
          f"{', '.join(done['names'][1:])}; wrote {output.resolve()}")


def job(args: argparse.Namespace) -> None:
    if args.atlases:
        return by_atlases(args)
    import SimpleITK as sitk

    from gvsl import data
    from gvsl.outputs import (check_image_output, check_not_an_input, check_output_folder, write_image,
                              write_image_folder, write_text)
    from gvsl.segmentation import SegmentationOptions, keep_largest_components, load_segmenter, segment
    from gvsl.slicer_segmentation import as_slicer_segmentation, is_segmentation_file

    check_image_output(args.output, (args.input, args.model))  # before any work, not after it
    if args.probabilities:
        check_output_folder(args.probabilities)
    if args.classes:
        check_not_an_input(Path(args.classes), (args.input, args.model, args.output))
        check_output_folder(Path(args.classes).parent)
    ckpt, model, spec = load_segmenter(args.model)  # fails now, not after preprocessing, if it is no segmentation model
    image = data.read_volume(args.input)
    options = SegmentationOptions(device=args.device, overlap=args.overlap, tta=args.tta, amp=args.amp,
                                  probabilities=bool(args.probabilities))
    result = segment(image, ckpt, options, progress=args.progress, built=(model, spec))
    labels = result.labels
    if args.largest_component:
        labels, removed = keep_largest_components(labels, result.spec.values)
        print("Largest components kept; stray pieces removed: " + (", ".join(
            f"{name} {removed[v]}" for v, name in zip(result.spec.values, result.spec.names) if v in removed) or "none"))
    if is_segmentation_file(args.output):  # names, colours and values in Slicer's header
        labels = as_slicer_segmentation(labels, result.spec)
    output = write_image(labels, args.output)  # appears whole or not at all, compressed
    if args.classes:
        write_text(json.dumps(result.spec.as_dict()), args.classes)
    if args.probabilities:
        write_image_folder({f"probability_{name}.nii.gz": p for name, p in zip(result.spec.names, result.probabilities)},
                           args.probabilities)
    present = [n for v, n in zip(result.spec.values, result.spec.names)
               if v and (sitk.GetArrayViewFromImage(labels) == v).any()]
    print(f"Segmented {Path(args.input).name} on {result.device}: {', '.join(present) or 'no structure found'}; "
          f"wrote {output.resolve()}")


def main(argv=None) -> int:
    args = parse(argv)
    return run(lambda: job(args), interrupted="nothing was written")


def script(argv=None) -> NoReturn:
    """Run as a command (``GVSLTrainer/segment.py``, ``gvsl segment``) and end the process."""
    exit_now(main(argv))
