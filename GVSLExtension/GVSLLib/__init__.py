"""Qt-free logic of the GVSL Slicer module: runs in Slicer's Python console and under pytest alike."""
from .logic import GVSLLogic, RegistrationNodes  # noqa: F401
