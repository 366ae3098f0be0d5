"""A cohort's subjects: from a folder or list of images, or from a CSV with one row per subject."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..discovery import discover, resolve
from ..volumes import DataError

REGISTER_ROLES = ("fixed", "moving_labels", "fixed_labels", "moving_mask", "fixed_mask", "moving_landmarks",
                  "fixed_landmarks")


@dataclass
class Subject:
    name: str
    image: Path  # the moving image of a registration, the input of a segmentation
    files: dict[str, Path] = field(default_factory=dict)  # other files given for this subject alone, by role

    def options(self, **cohort: str | Path | None) -> list[str]:
        """Command-line options of this subject's files (``--moving-mask PATH``...), its own over the
        cohort's (``cohort``: role -> path or None)."""
        out = []
        for role, path in {**{r: p for r, p in cohort.items() if p is not None}, **self.files}.items():
            out += [f"--{role.replace('_', '-')}", str(path)]
        return out


def subjects_from(source: str | Path, image_column: str = "moving", roles: tuple[str, ...] = REGISTER_ROLES,
                  named: bool = True) -> list[Subject]:
    """Subjects from a CSV (columns ``subject``, ``image_column`` and optionally ``roles``; relative
    paths are relative to the CSV; without ``named``, a missing ``subject`` column names each after its
    image file) or from a folder, list file or dataset.json of images (searched as pre-training
    searches; each image is a subject named after its file)."""
    source = Path(source)
    if source.suffix.lower() == ".csv" and source.is_file():
        return _from_csv(source, image_column, roles, named)
    paths = discover(source)
    names = [_stem(p) for p in paths]
    if len(set(names)) < len(names) and source.is_dir():  # one folder per subject: name them by their path
        names = [_stem(Path(str(p.relative_to(source)).replace(os.sep, "_"))) for p in paths]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{source}: two images would be the subject {repeated[0]!r} (one folder each); "
                        "give a CSV with a 'subject' column")
    return [Subject(n, p) for n, p in zip(names, paths)]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd", ".gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _from_csv(path: Path, image_column: str, roles: tuple[str, ...], named: bool = True) -> list[Subject]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise DataError(f"{path}: no subjects (a header row with 'subject' and '{image_column}', then one row "
                        "per subject)")
    columns = set(rows[0])
    if not named and "subject" not in columns:  # each row named after its image file
        for row in rows:
            row["subject"] = _stem(Path((row.get(image_column) or "").strip())) if row.get(image_column) else ""
        columns.add("subject")
    missing = {"subject", image_column} - columns
    if missing:
        raise DataError(f"{path}: the column(s) {', '.join(sorted(missing))} are missing (it has: "
                        f"{', '.join(sorted(c for c in columns if c))})")
    unknown = columns - {"subject", image_column, *roles}
    if unknown:
        raise DataError(f"{path}: unknown column(s) {', '.join(sorted(unknown))}; the known ones are subject, "
                        f"{', '.join((image_column, *roles))}")
    subjects, seen = [], set()
    for line, row in enumerate(rows, start=2):
        name, image = (row["subject"] or "").strip(), (row[image_column] or "").strip()
        if not name or not image:
            raise DataError(f"{path}, line {line}: 'subject' and '{image_column}' must both be given")
        if name in seen:
            raise DataError(f"{path}, line {line}: subject {name!r} appears twice (each has its own folder)")
        if os.sep in name or name in (".", ".."):
            raise DataError(f"{path}, line {line}: subject {name!r} cannot name a folder")
        seen.add(name)
        files = {role: resolve(path.parent, row[role].strip()) for role in roles if (row.get(role) or "").strip()}
        subjects.append(Subject(name, resolve(path.parent, image), files))
    return subjects
