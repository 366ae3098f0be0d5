"""Running a headless gvsl script in a separate Python process, with progress and cancel.

Slicer stays responsive: the GUI polls ``poll()`` from a timer. Progress comes from the script's
tqdm bar on stderr ("Registering (affine):  42%|...").
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

PERCENT = re.compile(r"(?:^|\s)(\d{1,3})%\|")
STAGE = re.compile(r"^\s*([A-Za-z][^:%|]*?)\s*:\s*\d{1,3}%\|")


def pythonExecutable() -> str:
    """Slicer's own launcher-configured interpreter (``PythonSlicer``) when there is one."""
    return shutil.which("PythonSlicer") or sys.executable


class BackgroundProcess:
    """One child process; its merged output is kept for the log and parsed for progress."""

    def __init__(self, argv: list[str], cwd: str | Path | None = None):
        self.argv = [str(a) for a in argv]
        self.fraction = 0.0
        self.stage = ""
        self.lines: list[str] = []
        self._shown = 0  # lines already handed to the live log
        self.cancelled = False
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if os.name == "posix":
            kwargs = {"start_new_session": True}
        else:  # a hidden console window, as slicer.util.launchConsoleProcess starts its children
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = subprocess.SW_HIDE
            kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP, "startupinfo": info}
        self._proc = subprocess.Popen(self.argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := self._proc.stdout.read1(4096):
            buffer += chunk
            *parts, buffer = re.split(rb"[\r\n]", buffer)
            for part in parts:
                self._line(part.decode(errors="replace"))
        if buffer:
            self._line(buffer.decode(errors="replace"))

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        match = PERCENT.search(line)
        if match:
            self.fraction = min(int(match.group(1)), 100) / 100
            stage = STAGE.match(line)
            if stage:
                self.stage = stage.group(1)
            return  # progress-bar refreshes stay out of the log
        self.lines.append(line)

    def poll(self) -> int | None:
        """The exit code once finished (its output fully read), else None."""
        code = self._proc.poll()
        if code is not None:
            self._reader.join()
        return code

    def wait(self, timeout: float | None = None) -> int:
        code = self._proc.wait(timeout)
        self._reader.join()
        return code

    def cancel(self, then: Callable[[], None] | None = None) -> None:
        """Kill the process and every process it started, and return at once, as MONAIAuto3DSeg and
        SlicerElastix do: the GUI thread never waits for the tree to go. ``then`` (removing the
        temporary files, which a dying process may still hold open on Windows) runs once it has gone.

        On Windows ``PythonSlicer.exe`` is a launcher whose child is the real interpreter, so the whole
        tree must go: with psutil where it is installed (Slicer does not ship it), else ``taskkill /T``
        in a hidden window; on POSIX the child leads its own process group."""
        if self._proc.poll() is None:
            self.cancelled = True
            self._killTree()

        def reap() -> None:
            self._proc.wait()
            self._reader.join(5.0)  # a grandchild outside the tree may still hold the pipe
            if then is not None:
                then()

        self._reaper = threading.Thread(target=reap, daemon=True)
        self._reaper.start()

    def waitUntilGone(self, timeout: float | None = None) -> bool:
        """After ``cancel``: whether the process has gone and ``then`` has run (for tests and scripts)."""
        reaper = getattr(self, "_reaper", None)
        if reaper is not None:
            reaper.join(timeout)
            return not reaper.is_alive()
        return self._proc.poll() is not None

    def _killTree(self) -> None:
        try:
            import psutil
        except ImportError:
            psutil = None
        if psutil is not None:
            try:
                root = psutil.Process(self._proc.pid)
                tree = root.children(recursive=True) + [root]
            except psutil.NoSuchProcess:
                return
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        elif os.name == "posix":
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            subprocess.Popen(["taskkill", "/T", "/F", "/PID", str(self._proc.pid)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000))

    def newLines(self) -> list[str]:
        """Output lines not returned by an earlier call: what a live log appends at each poll."""
        lines = self.lines[self._shown:]
        self._shown += len(lines)
        return lines

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def error(self) -> str:
        """The child's own error line (``error: ...`` from gvsl.cli), else the last lines of output."""
        errors = [line for line in self.lines if line.startswith("error:")]
        return errors[-1][len("error:"):].strip() if errors else "\n".join(self.lines[-5:])
