"""How training stops early: on SIGINT / SIGTERM (gracefully, after the step in progress), or because
the loss diverged."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType

from sae_lens.errors import SAELensError

SIGNAL_EXIT_CODES: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after finishing the step in progress."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signal_number).name} after step {step}")
        self.signal_number = signal_number
        self.step = step
        self.checkpoint = checkpoint
        """The resumable checkpoint written on the way out, if there was a folder for it."""
        self.sae_folders: list[Path] = []
        """The SAE folders saved on the way out."""

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (the shell's convention)."""
        return SIGNAL_EXIT_CODES.get(self.signal_number, 130)


class TrainingDiverged(SAELensError):
    """The loss became NaN/Inf or exploded; nothing was saved over earlier checkpoints."""


class GracefulStop:
    """A context in which SIGINT / SIGTERM only set `requested` (the loop checks it between steps).

    A second signal restores the previous handlers and interrupts at once. Files are written
    atomically, so that leaves no half-written one. Outside the main thread (where handlers cannot
    be installed) it does nothing.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        """The signal received, or None."""
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        self.requested = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.getsignal(number) for number in SIGNAL_EXIT_CODES}
            for number in SIGNAL_EXIT_CODES:
                signal.signal(number, self._on_signal)
        return self

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt
        self.requested = number

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        self._previous = {}

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._restore()
