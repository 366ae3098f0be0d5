"""The names users choose from on the command lines: torch-free, so that ``--help`` and a mistyped
option answer at once instead of after importing torch."""
DEVICES = ("auto", "cpu", "cuda", "mps")
MODES = ("rigid", "affine", "deformable")
SIMILARITIES = ("ncc", "mind", "mi", "auto")
