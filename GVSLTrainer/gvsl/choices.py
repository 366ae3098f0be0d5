"""The names users choose from, on the command lines and in the Slicer module: torch-free, so that
``--help`` and a mistyped option answer at once, and the module's GUI is built before torch exists."""
DEVICES = ("auto", "cpu", "cuda", "mps")
MODES = ("rigid", "affine", "deformable")
SIMILARITIES = ("auto", "ncc", "mind", "mi")
INITIALISATIONS = ("auto", "moments", "geometry", "none")  # none: where the headers place the images
# the U-Net's normalisation: the paper's GroupNorm (channels/8 per group; one group at width 8), or one
# channel per group (instance normalisation); the parameters are the same either way
NORMS = ("instance", "group")
