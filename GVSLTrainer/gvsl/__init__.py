"""GVSL: geometric visual similarity learning for 3D medical images (He et al., CVPR 2023).

The library behind the headless trainer scripts and the 3D Slicer module. No Slicer, no Qt.
"""
__version__ = "0.1.0"
