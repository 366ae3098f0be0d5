"""Named registration settings for common cases. A preset only sets parameters (the same ones the GUI
shows); it is never another code path."""
from __future__ import annotations

CUSTOM = "Custom"
# preset name -> {parameter node field: value}
PRESETS = {
    "Same modality, deformable": {"registrationMode": "deformable", "similarity": "ncc"},
    "CT↔MR, deformable": {"registrationMode": "deformable", "similarity": "mind"},
    "CT↔MR, rigid": {"registrationMode": "rigid", "similarity": "mi"},
    "Rigid head": {"registrationMode": "rigid", "similarity": "auto"},
    "Affine, any modality": {"registrationMode": "affine", "similarity": "auto"},
}
NAMES = (CUSTOM, *PRESETS)


def applyPreset(parameters, name: str) -> None:
    """Set ``parameters``' fields (a parameter node wrapper, or any object with those attributes) to the
    preset's values; Custom changes nothing."""
    if name not in NAMES:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(NAMES)}")
    for field, value in PRESETS.get(name, {}).items():
        if getattr(parameters, field) != value:
            setattr(parameters, field, value)


def matchingPreset(parameters) -> str:
    """The preset whose values ``parameters`` hold, else Custom: the preset box always names what the
    options below it are."""
    for name, values in PRESETS.items():
        if all(getattr(parameters, field) == value for field, value in values.items()):
            return name
    return CUSTOM


def follow(parameters, shown: str) -> str:
    """Bring ``parameters.preset`` and the options into agreement after a change. ``shown``: the preset
    it held after the previous change. A preset newly chosen sets its options; otherwise the field
    names the preset the options match (Custom if none). Returns the field's value now."""
    if parameters.preset != shown:
        applyPreset(parameters, parameters.preset)
    matching = matchingPreset(parameters)
    if parameters.preset != matching:
        parameters.preset = matching
    return matching
