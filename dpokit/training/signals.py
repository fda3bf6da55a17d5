"""SIGINT / SIGTERM during training: finish the step, write a checkpoint, leave cleanly."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop at the end of the current step, with a checkpoint.

    A second SIGINT or SIGTERM aborts at once (KeyboardInterrupt). Handlers are only installed
    in the main thread (Python allows no other) and the previous ones come back on exit.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":  # every process of a launched run gets the signal; one says so
            sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                             "(send it again to abort at once)\n")

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


