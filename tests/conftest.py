from gevent import monkey; monkey.patch_all()  # noqa: E702  before ssl/socket/requests load

import os  # noqa: E402

# gevent's monitor thread reports any greenlet that holds the hub longer than this; the
# autouse fixture below turns such a report into a test failure (a blocked hub is a
# missed heartbeat in production). Set before the hub is created. 1 s: the heartbeat
# interval, what a real block costs the service. A shorter threshold (0.2 s) failed tests
# whenever a busy 2-core machine took the CPU away for a moment (steal, not blocking);
# the code's own bounded work (JSON, slices of 256 replies) holds the hub for
# milliseconds, so a second is still far above anything but a real block. A test that
# blocks on purpose says so with the allow_blocking marker.
os.environ.setdefault("GEVENT_MONITOR_THREAD_ENABLE", "1")
os.environ.setdefault("GEVENT_MAX_BLOCKING_TIME", "1.0")

import gevent  # noqa: E402
import gevent.events  # noqa: E402
import pytest  # noqa: E402
import zope.event  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist the worker waits for its next test on a threading.Event that
    # execnet's own (native) thread sets. Patched, that Event is gevent's, and the wait
    # runs the hub: with nothing else scheduled the hub would call it a wait forever
    # (LoopExit) before the other thread's set() arrives. A timer that never fires keeps
    # the loop alive; gevent's Event wakes across native threads.
    _keep_loop_alive = gevent.get_hub().loop.timer(86400.0, 86400.0)
    _keep_loop_alive.start(lambda: None)

_blocked = []


def _on_event(event):
    if isinstance(event, gevent.events.EventLoopBlocked):
        _blocked.append(event)


zope.event.subscribers.append(_on_event)


@pytest.fixture(autouse=True)
def hub_never_blocked(request):
    """Fail any test during which the gevent hub was blocked past GEVENT_MAX_BLOCKING_TIME."""
    gevent.get_hub().start_periodic_monitoring_thread()
    del _blocked[:]
    yield
    if _blocked and not request.node.get_closest_marker("allow_blocking"):
        first = _blocked[0]
        pytest.fail(f"gevent hub blocked {len(_blocked)} time(s) for over "
                    f"{first.blocking_time}s:\n" + "".join(first.info[:40]))
