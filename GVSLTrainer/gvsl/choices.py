"""The names users choose from, on the command lines and in the Slicer module: torch-free, so that
``--help`` and a mistyped option answer at once, and the module's GUI is built before torch exists."""
DEVICES = ("auto", "cpu", "cuda", "mps")
MODES = ("rigid", "affine", "deformable")
SIMILARITIES = ("auto", "ncc", "mind", "mi")
