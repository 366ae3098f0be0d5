"""Label values in files <-> consecutive classes of the network, with names and display colours."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# A readable default palette (RGB in [0, 1]); class 0 is the background and has no colour.
PALETTE = [(0.90, 0.30, 0.25), (0.30, 0.65, 0.95), (0.35, 0.80, 0.35), (0.95, 0.80, 0.25), (0.70, 0.45, 0.85),
           (0.95, 0.55, 0.20), (0.40, 0.85, 0.85), (0.85, 0.40, 0.60), (0.60, 0.60, 0.30), (0.55, 0.55, 0.95)]


@dataclass
class LabelSpec:
    values: list[int]  # the value of each class in label files; values[0] is the background
    names: list[str]
    colours: list[tuple[float, float, float]] = field(default_factory=list)

    def __post_init__(self):
        if len(self.values) != len(self.names):
            raise ValueError(f"{len(self.values)} label values but {len(self.names)} names")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"label values repeat: {self.values}")
        if not self.colours:
            self.colours = [(0.0, 0.0, 0.0)] + [PALETTE[i % len(PALETTE)] for i in range(len(self.values) - 1)]

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @classmethod
    def from_mapping(cls, labels, source: str = "") -> "LabelSpec":
        """From a dataset.json's ``labels``: the MSD form {"0": "background", "205": "myocardium", ...} or
        nnU-Net v2's {"background": 0, "myocardium": 205, ...}. Anything else is refused, naming
        ``source``: negative or fractional values, a list, nnU-Net's region-based lists of values."""
        where = f"{source}: " if source else ""
        if not isinstance(labels, dict) or not labels:
            raise ValueError(f"{where}'labels' must map label values to names (MSD: {{\"1\": \"liver\"}}) or names to "
                             f"values (nnU-Net v2: {{\"liver\": 1}}), got {type(labels).__name__} {labels!r}"[:300])
        if any(isinstance(v, list) for v in labels.values()):
            raise ValueError(f"{where}'labels' holds lists of values (nnU-Net's region-based training), which "
                             "fine-tuning does not support; give one value per class")
        nnunet = all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values())
        items = []
        for key, value in labels.items():
            name, text = (str(key), value) if nnunet else (str(value), str(key).strip())
            try:
                number = int(text)
            except ValueError:
                raise ValueError(f"{where}label value {text!r} (of {name!r}) is not a whole number") from None
            if number < 0:
                raise ValueError(f"{where}label value {number} (of {name!r}) is negative; label values are 0 or more")
            items.append((number, name))
        items.sort()
        if items[0][0] != 0:
            items.insert(0, (0, "background"))
        return cls([v for v, _ in items], [n for _, n in items])

    @classmethod
    def infer(cls, arrays) -> "LabelSpec":
        """From the values found in label arrays (names become 'label_<value>')."""
        values = sorted({0} | {int(v) for a in arrays for v in np.unique(a)})
        return cls(values, ["background" if v == 0 else f"label_{v}" for v in values])

    def to_classes(self, array: np.ndarray, source: str = "") -> np.ndarray:
        lut = {v: i for i, v in enumerate(self.values)}
        found = np.unique(array)
        unknown = [int(v) for v in found if int(v) not in lut]
        if unknown:
            raise ValueError(f"{source}: label values {unknown} are not among the dataset's {self.values}")
        out = np.zeros(array.shape, np.int64)
        for v in found:
            out[array == v] = lut[int(v)]
        return out

    def to_values(self, classes: np.ndarray) -> np.ndarray:
        dtype = np.uint8 if max(self.values) < 256 else np.uint16 if max(self.values) < 65536 else np.uint32
        return np.asarray(self.values, dtype=dtype)[classes]

    def as_dict(self) -> dict:
        return {"values": list(self.values), "names": list(self.names), "colours": [list(c) for c in self.colours]}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSpec":
        return cls(list(d["values"]), list(d["names"]), [tuple(c) for c in d["colours"]])
