"""Progress on the terminal, for a local compression and for a job on a server alike."""

from __future__ import annotations

import sys


class ProgressPrinter:
    """On a terminal, one updating line per phase; elsewhere (logs), phase boundaries and search steps."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.phase = None

    def show(self, phase: str, fraction: float, message: str = "", step: int | None = None) -> None:
        bar = "#" * int(fraction * 20)
        line = f"[{bar:<20}] {fraction * 100:5.1f}%  {phase}: {message}"
        if self.tty:
            if self.phase not in (None, phase):
                self.stream.write("\n")
            self.stream.write("\r\033[K" + line)
        elif step is not None or message.startswith(f"{phase} "):
            self.stream.write(line + "\n")
        self.phase = phase
        self.stream.flush()

    def __call__(self, event) -> None:
        """The engine's Progress events."""
        self.show(event.phase, event.fraction, event.message, event.step)

    def finish(self) -> None:
        if self.tty and self.phase:
            self.stream.write("\n")
