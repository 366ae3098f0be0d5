"""The registration figure, drawn by a helper process that starts with the command.

Importing matplotlib (about 0.7 s) and drawing the figure (about 0.5 s) were a fifth of a
command-line registration on 2 CPU cores. Started before torch is imported, the helper imports
matplotlib on the other core while torch loads here (a single-threaded wait), builds the figure's
axes while the registration runs, renders the images as soon as they exist (while this process
computes the quality figures and writes the other outputs), and at the end draws only the title.
It receives the figure's arrays (``report.registration_panels``), never the volumes, through its
stdin as pickles from its own parent.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path


class ReportProcess:
    def __init__(self) -> None:
        package_parent = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH"))
                                                          if p))
        self._proc = subprocess.Popen([sys.executable, "-m", "gvsl.report_process"], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                      creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        self.has_panels = False

    @classmethod
    def start(cls) -> ReportProcess | None:
        """A running helper, or None where no process can be started (the caller then draws itself)."""
        try:
            return cls()
        except OSError:
            return None

    def panels(self, figure: dict) -> None:
        """Hand over ``registration_panels(...)``: the helper renders them at once."""
        self._send(("panels", figure))
        self.has_panels = True

    def save(self, path: str | Path, metrics: dict | None) -> None:
        """Title the rendered panels with ``metrics`` and write the PNG (then the helper exits)."""
        self._send(("save", str(path), metrics))

    def _send(self, message: tuple) -> None:
        pickle.dump(message, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self._proc.stdin.flush()

    def wait(self, timeout: float = 300) -> None:
        """Return once the figure is written; the helper's failure is raised here, with its last words."""
        _, err = self._proc.communicate(timeout=timeout)
        if self._proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines() or [f"exit code {self._proc.returncode}"]
            raise RuntimeError(f"drawing report.png failed: {lines[-1]}")

    def close(self) -> None:
        """Stop the helper if it is still waiting (the command failed or ended before the figure)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()

    def __enter__(self) -> ReportProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve() -> int:
    import matplotlib.backends.backend_agg  # noqa: F401 - what savefig would import late

    from .report import draw_panels, empty_figure, render, save_rendered

    layout = empty_figure()  # the axes and the colour bar, while the registration runs
    fig = None
    while True:
        try:
            message = pickle.load(sys.stdin.buffer)  # from our own parent only
        except EOFError:  # the command ended without a figure to draw
            return 0
        if message[0] == "panels":
            fig = draw_panels(message[1], layout)
            render(fig)
        else:
            _, path, metrics = message
            save_rendered(fig, path, metrics)
            return 0


if __name__ == "__main__":
    from .cli import exit_now  # the parent waits for this exit: no 0.15-0.2 s of module teardown first

    exit_now(_serve())
