"""Stopping a training run on request: Ctrl-C (SIGINT) and a preemption's SIGTERM.

Why: a preempted cloud VM sends SIGTERM and then, after a grace period, kills the process; Ctrl-C is
the same wish from a person. Either way the run finishes the update in flight, saves it and stops, so
nothing since the last checkpoint is lost; the command line then exits 130 (SIGINT) or 143
(SIGTERM). A second signal stops at once (the update in flight is abandoned; the newest checkpoint
stays the last good one). An interrupt inside orbax's save would leave the reported last checkpoint
out of date, which is why the signal only sets a flag that the loop reads between updates.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}   # 128 + the signal number, as shells report it
_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class StopRequest:
    """Context manager: while inside, SIGINT / SIGTERM set :attr:`signum` instead of killing the run.

    Handlers are taken over only from Python's defaults in the main thread — never from a program
    that embeds the loop and installed its own."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig, default in _DEFAULTS.items():
                if signal.getsignal(sig) is default:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\ntrain: {_NAMES.get(signum, signum)}: saving at the end of this update, then stopping "
              "(the same signal again: stop now)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
