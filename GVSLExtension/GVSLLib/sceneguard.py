"""What a run may leave in the scene: its result nodes and their display nodes, nothing else.

Slicer's own conversions add nodes as a side effect (a label map export adds a display node and a
"<labelmap>_ColorTable" node each time, and they are saved with the scene). ``scratchNodes`` removes
every node added inside it; ``NewNodes`` removes a run's new result nodes again if the run fails.
"""
from __future__ import annotations

from contextlib import contextmanager


def nodeIDs(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _displayNodeIDs(node) -> set[str]:
    if not hasattr(node, "GetNumberOfDisplayNodes"):
        return set()
    return {node.GetNthDisplayNodeID(i) for i in range(node.GetNumberOfDisplayNodes())}


def _removeAddedSince(scene, before: set[str], keep: set[str]) -> None:
    for nodeID in nodeIDs(scene) - before - keep:
        node = scene.GetNodeByID(nodeID)
        if node is not None:  # removing one node can remove others with it
            scene.RemoveNode(node)


@contextmanager
def scratchNodes(scene, keep=()):
    """Every node added inside the block is removed at its end, except the display nodes of ``keep``
    (nodes that already existed and are being filled in)."""
    before = nodeIDs(scene)
    try:
        yield
    finally:
        kept = set().union(*(_displayNodeIDs(node) for node in keep)) if keep else set()
        _removeAddedSince(scene, before, kept)


class NewNodes:
    """Result nodes created while building a run's results, with whatever came with them; all removed
    again if building fails half-way, so a failed run leaves the scene as it was."""

    def __init__(self, scene):
        self.scene = scene
        self.created: list = []

    def add(self, className: str, name: str):
        node = self.scene.AddNewNodeByClass(className, self.scene.GenerateUniqueName(name))
        self.created.append(node)
        return node

    def __enter__(self) -> "NewNodes":
        self._before = nodeIDs(self.scene)
        return self

    def __exit__(self, kind, *_):
        if kind is not None:
            _removeAddedSince(self.scene, self._before, set())
        return False
