"""The stall watchdog: a native thread that ends a wedged process so the platform restarts it.

A wedge is a hub or a loop that cannot run: a greenlet that never yields, a native call
that blocks the hub, a reader stuck inside its own work. Waiting is not a wedge: a reader
parked on an empty socket, or waiting for room (back-pressure on a slow rate API or a
slow peer) waits on things that carry their own deadlines (the rate book's wait, the
write deadline ``send_timeout_s``). So the watchdog judges:

* the hub: a ticker greenlet stamps ``hub_at`` every ``stall_exit_s / 4`` (at most 1 s);
* while a connection is up, the heartbeat loop: a timer loop that never writes;
* the reader, only while it is working (not waiting): it stamps ``reader_at`` after each
  wait and for each batch it starts.

Progress lives in plain attributes of one ``Progress`` object, read by the thread without
iterating anything the greenlets mutate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import gevent
from gevent import monkey

#: seconds past the shutdown grace after which the watchdog ends the process anyway
STOP_MARGIN_S = 2.0


def _die(why):
    line = f"CRITICAL exrate_green.service: {why}; exiting so the platform restarts us\n"
    os.write(1, line.encode())
    os._exit(3)


class Progress:
    """Stamps (``clock()`` seconds) of the loops the stall watchdog judges."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.hub_at = clock()
        self.heartbeat_at: float | None = None  # None: no connection, nothing to judge
        self.reader_at: float | None = None
        self.reader_waiting = True

    def session_started(self) -> None:
        self.heartbeat_at = self.reader_at = self.clock()
        self.reader_waiting = True

    def session_ended(self) -> None:
        self.heartbeat_at = self.reader_at = None
        self.reader_waiting = True

    def heartbeat_turned(self) -> None:
        self.heartbeat_at = self.clock()

    def reader_parked(self) -> None:
        """The reader waits (for bytes, or for room): bounded elsewhere, not a stall."""
        self.reader_waiting = True

    def reader_turned(self) -> None:
        self.reader_at = self.clock()
        self.reader_waiting = False

    def stalled(self, now: float, limit_s: float) -> tuple[str, float] | None:
        """(loop name, seconds) of a loop that made no progress for over ``limit_s``, or
        None. Reads each attribute once: greenlets may change them meanwhile."""
        hub_at, beat_at = self.hub_at, self.heartbeat_at
        reader_at, waiting = self.reader_at, self.reader_waiting
        if now - hub_at > limit_s:
            return "hub", now - hub_at
        if beat_at is not None and now - beat_at > limit_s:
            return "heartbeat", now - beat_at
        if reader_at is not None and not waiting and now - reader_at > limit_s:
            return "receive_loop", now - reader_at
        return None


class StallWatchdog:
    """Ends the process with exit code 3 when ``progress`` shows a wedge for over
    ``stall_exit_s`` seconds, unless a shutdown is under way.

    ``stop_deadline()`` is the ``clock()`` time by which a shutdown under way must be done
    (None: running); ``stopped()`` is True once the service ended. Two jobs: ``tick``, a
    greenlet (run it in the group of the object whose lifetime bounds it) that stamps the
    hub's progress, and ``watch``, a native thread started by ``start()``: a greenlet would
    be stuck with the hub it watches. The thread writes straight to the file descriptor:
    logging's locks are gevent's.
    """

    def __init__(self, progress: Progress, stall_exit_s: float, *,
                 stop_deadline: Callable[[], float | None], stopped: Callable[[], bool],
                 check_every_s: float = 1.0) -> None:
        self.progress = progress
        self.stall_exit_s = stall_exit_s
        self.stop_deadline = stop_deadline
        self.stopped = stopped
        self.check_every_s = check_every_s

    def tick(self) -> None:
        """Stamp the hub's progress, a few times per stall period (at most once a second)."""
        progress, every_s = self.progress, min(self.check_every_s, self.stall_exit_s / 4)
        while True:
            progress.hub_at = progress.clock()
            gevent.sleep(every_s)

    def start(self) -> None:
        """Start the watching thread (it ends with the process, or once ``stopped()``)."""
        monkey.get_original("_thread", "start_new_thread")(self.watch, ())

    def watch(self) -> None:
        sleep = monkey.get_original("time", "sleep")
        progress = self.progress
        while not self.stopped():
            sleep(self.check_every_s)
            now = progress.clock()
            deadline = self.stop_deadline()
            if deadline is not None:  # a backstop: the shutdown bounds itself well before
                if now - deadline > STOP_MARGIN_S and not self.stopped():
                    _die(f"shutdown still running {STOP_MARGIN_S:.0f} s past its grace")
                continue
            stall = progress.stalled(now, self.stall_exit_s)
            if stall is not None:
                _die(f"{stall[0]} made no progress for {stall[1]:.1f} s")
