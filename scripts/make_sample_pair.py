#!/usr/bin/env python
"""Write the Slicer module's sample pair (Resources/SampleData) and print the checksums that
GVSLLib/selftest.py must name.

The moving volume is the ICBM 2009a symmetric T1 template (shipped in nilearn) at 2 mm; the fixed
one is that head moved by the self-test's known transform onto an oblique, anisotropic grid.
    .venv/bin/python scripts/make_sample_pair.py
"""
import hashlib
import sys
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "GVSLTrainer"), str(ROOT / "GVSLExtension")]

from gvsl.demo import package_file  # noqa: E402
from GVSLLib import selftest  # noqa: E402


def main() -> None:
    template = sitk.ReadImage(str(package_file("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")))
    size = [int(round(n * s / 2.0)) for n, s in zip(template.GetSize(), template.GetSpacing())]
    head = sitk.Resample(template, size, sitk.Transform(), sitk.sitkLinear, template.GetOrigin(), (2.0, 2.0, 2.0),
                         template.GetDirection(), 0, template.GetPixelID())
    fixed, moving = selftest.samplePair(head)
    for image, path in zip((fixed, moving), selftest.sampleFiles()):
        sitk.WriteImage(image, str(path), useCompression=True)
        print(path.name, "SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
