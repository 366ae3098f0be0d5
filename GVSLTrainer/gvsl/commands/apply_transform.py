"""Apply a saved registration to other images, label maps, segmentations or points (as
antsApplyTransforms and transformix do).

    python GVSLTrainer/apply_transform.py --transform out/ --input T2.nii.gz --reference FIXED.nii.gz --output T2_on_fixed.nii.gz
    python GVSLTrainer/apply_transform.py --transform out/ --input aseg.nii.gz --reference FIXED.nii.gz --output aseg_on_fixed.nii.gz
    python GVSLTrainer/apply_transform.py --transform out/ --input tumour.seg.nrrd --reference FIXED.nii.gz --output tumour_on_fixed.seg.nrrd
    python GVSLTrainer/apply_transform.py --transform out/ --input points_on_moving.mrk.json --output points_on_fixed.mrk.json
    python GVSLTrainer/apply_transform.py --transform out/ --invert --input atlas_labels.nii.gz --reference MOVING.nii.gz --output labels_on_moving.nii.gz

--transform is register.py's output folder (or its transform.h5): data on the moving image is brought
onto the fixed image. Images and label maps are resampled onto --reference's grid through
transform.h5; points are moved through inverse.h5. Each kind takes the one it needs, so the
direction cannot be mixed up. --invert brings data on the fixed image onto the moving one. A single
transform file of your own is taken in ITK's resampling direction (reference -> input space, as
antsApplyTransforms and Slicer's "transform from parent" take it); points then need its inverse,
which a linear transform has and a displacement field has only as a registration's inverse.h5.

Kinds (--kind auto): points for .mrk.json, .fcsv and .csv; a label map for a .seg.nrrd or an integer
image with at most 64 values (label-aware interpolation, values and pixel type kept; --interpolation
nearest for nearest neighbour); else an image (linear; --interpolation bspline or nearest). A Slicer
segmentation keeps its segments' names, colours and values.
"""
import argparse
from pathlib import Path
from typing import NoReturn

from gvsl.cli import exit_now, run


def parse(argv=None) -> argparse.Namespace:
    from gvsl.apply_transform import INTERPOLATIONS, KINDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transform", required=True, help="register.py's output folder, or a transform file")
    p.add_argument("--input", required=True, help="an image, label map, .seg.nrrd, or points (.mrk.json, .fcsv, .csv)")
    p.add_argument("--output", required=True, help="where the result goes (points: .mrk.json, .fcsv or .csv)")
    p.add_argument("--reference", help="the image whose grid the output takes (the fixed image; with --invert, the "
                                       "moving one); needed for images and label maps, not for points")
    p.add_argument("--invert", action="store_true", help="the other direction: data on the fixed image onto the moving")
    p.add_argument("--kind", choices=KINDS, default="auto", help="what --input holds (default: from its name and values)")
    p.add_argument("--interpolation", choices=tuple(INTERPOLATIONS), default=None,
                   help="images: linear (default), bspline or nearest; label maps: label (label-aware Gaussian, "
                        "default) or nearest")
    return p.parse_args(argv)


def job(args: argparse.Namespace) -> None:
    from gvsl.apply_transform import apply_to_image, apply_to_points, kind_of, load_transforms
    from gvsl.outputs import check_image_output, check_not_an_input, check_output_folder, write_image, write_text
    from gvsl.registration.landmarks import landmarks_text, read_landmarks
    from gvsl.volumes import read_labels, read_volume

    kind = args.kind if args.kind != "auto" else kind_of(args.input)
    inputs = (args.input, args.transform, args.reference)
    if kind == "points":
        check_not_an_input(Path(args.output), inputs)
        check_output_folder(Path(args.output).parent)
    else:
        check_image_output(args.output, inputs)
        if args.reference is None:
            raise ValueError("--reference is needed for an image or a label map: the image whose grid the output "
                             "takes (the fixed image; with --invert, the moving image)")
    transforms = load_transforms(args.transform)
    if args.invert:
        transforms = transforms.inverted()
    if kind == "points":
        moved = apply_to_points(read_landmarks(args.input), transforms)
        text = landmarks_text(moved, Path(args.output).name)
        output = write_text(text, args.output)
        print(f"Moved {len(moved.points)} points from {Path(args.input).name} through {transforms.source} "
              f"({'inverse of the ' if args.invert else ''}moving -> fixed); wrote {output.resolve()} (LPS)")
        return
    reference = read_volume(args.reference)
    image = (read_labels if kind == "labels" else read_volume)(args.input)
    if args.kind == "auto" and kind == "image":  # an integer image with few values: a label map
        kind = kind_of(args.input, image)
    result = apply_to_image(image, reference, transforms, kind == "labels", args.interpolation)
    output = write_image(result, args.output)
    print(f"Resampled {Path(args.input).name} ({'label map' if kind == 'labels' else 'image'}) onto "
          f"{Path(args.reference).name}'s grid through {transforms.source}; wrote {output.resolve()}")


def main(argv=None) -> int:
    args = parse(argv)
    return run(lambda: job(args), interrupted="nothing was written")


def script(argv=None) -> NoReturn:
    """Run as a command (``GVSLTrainer/apply_transform.py``, ``gvsl apply``) and end the process."""
    exit_now(main(argv))
