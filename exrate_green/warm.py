"""``exrate-service cache warm START END``: fetch every table of a date window ahead of traffic.

Each configured provider is asked for the window in the units it fetches in (its
``fetch_key``: a past month in ONE range call for Frankfurter and ecb's later days; a day
for exchangerate.host), through the same tiers the service reads (disk, and Redis when
``REDIS_URL`` is set) and the same cross-process single-flight, so a warm run beside a
running fleet never doubles a fetch. Units whose tables are all fresh in the cache are
skipped; ecb days in the bundled history need no fetch at all.

Progress: a bar redrawn in place on a terminal, one plain line per unit otherwise (a log
or a pipe); the last line (or, with ``--json``, one JSON object) is the total.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from .errors import RateError

if TYPE_CHECKING:
    from .config import Settings

#: the longest window one run takes (days): the whole ECB history is ~10,000
MAX_WINDOW_DAYS = 40 * 366
BAR_WIDTH = 30


def run_warm(settings: Settings, start: str | None, end: str | None, *,
             as_json: bool = False, out: TextIO | None = None,
             today: datetime.date | None = None) -> int:
    """Warm the cache for ``start``..``end`` (ISO days, both included); the exit code:
    0 done, 1 some unit failed (the others are kept), 2 a bad window (one line)."""
    from .runtime import Runtime

    out = sys.stdout if out is None else out
    today = today or datetime.datetime.now(datetime.UTC).date()
    try:
        first, last = _window(start, end, today)
    except ValueError as e:
        print(f"exrate-service cache warm: {e}", file=sys.stderr)
        return 2
    runtime = Runtime(settings)
    try:
        plan = _plan(runtime.providers, first, last)
        progress = Progress(out, len(plan), bar=not as_json and out.isatty(),
                            quiet=as_json)
        totals = {"units": len(plan), "fetched": 0, "tables": 0, "fresh": 0, "busy": 0,
                  "failed": 0, "bundled_days": _bundled(runtime.providers, first, last)}
        for provider, key, days in plan:
            outcome = _warm_one(runtime.cache, provider, key, days, settings.cache_ttl_s)
            totals[outcome.kind] += 1
            totals["tables"] += outcome.tables
            progress.step(f"{provider.name} {key}: {outcome.text}")
        progress.done()
    finally:
        runtime.close()
    summary = {"start": first.isoformat(), "end": last.isoformat(),
               "providers": [p.name for p in runtime.providers], **totals}
    if as_json:
        print(json.dumps(summary), file=out)
    else:
        print(f"warmed {first.isoformat()}..{last.isoformat()}: {totals['fetched']} "
              f"fetched ({totals['tables']} tables written), {totals['fresh']} already "
              f"fresh, {totals['busy']} fetched by another process, {totals['failed']} "
              f"failed; {totals['bundled_days']} bundled ECB days need no fetch", file=out)
    return 1 if totals["failed"] else 0


def _window(start: str | None, end: str | None,
            today: datetime.date) -> tuple[datetime.date, datetime.date]:
    try:
        first = datetime.date.fromisoformat(start or "")
        last = datetime.date.fromisoformat(end or "")
    except ValueError:
        raise ValueError(f"START and END must be days (YYYY-MM-DD), got {start!r} "
                         f"and {end!r}") from None
    if last < first:
        raise ValueError(f"END ({last.isoformat()}) is before START ({first.isoformat()})")
    if last > today:
        raise ValueError(f"END ({last.isoformat()}) is after today ({today.isoformat()}): "
                         f"no rates are published for it yet")
    if (last - first).days > MAX_WINDOW_DAYS:
        raise ValueError(f"the window is longer than {MAX_WINDOW_DAYS} days")
    return first, last


def _days(first: datetime.date, last: datetime.date) -> list[datetime.date]:
    return [first + datetime.timedelta(days=n) for n in range((last - first).days + 1)]


def _plan(providers: list[Any], first: datetime.date,
          last: datetime.date) -> list[tuple[Any, str, list[datetime.date]]]:
    """``(provider, fetch key, its days in the window)`` in order: one unit per call the
    provider makes (a month where it fetches months)."""
    units: dict[tuple[str, str], tuple[Any, str, list[datetime.date]]] = {}
    for provider in providers:
        for day in _days(first, last):
            if not provider.needs_cache(day):
                continue  # ecb's bundled history: read directly, never fetched
            key = provider.fetch_key(day)
            units.setdefault((provider.name, key), (provider, key, []))[2].append(day)
    return list(units.values())


def _bundled(providers: list[Any], first: datetime.date, last: datetime.date) -> int:
    ecb = next((p for p in providers if p.name == "ecb"), None)
    return 0 if ecb is None else sum(1 for day in _days(first, last)
                                     if not ecb.needs_cache(day))


class _Outcome:
    def __init__(self, kind: str, text: str, tables: int = 0) -> None:
        self.kind, self.text, self.tables = kind, text, tables


def _warm_one(cache: Any, provider: Any, key: str, days: list[datetime.date],
              ttl_s: float) -> _Outcome:
    """Fetch one unit unless every one of its days is fresh in the cache."""
    now = time.time()
    kept = [cache.get(provider.name, day) for day in days]
    if all(table is not None and now < table.fetched_at + ttl_s for table in kept):
        return _Outcome("fresh", f"{len(days)} tables already fresh, skipped")
    with cache.flight(provider.name, key) as mine:
        if not mine:
            return _Outcome("busy", "another process is fetching it, skipped")
        try:
            tables = provider.fetch_tables(key)
        except RateError as e:
            return _Outcome("failed", f"failed: {e.reason}")
        written = cache.put_many(tables)
    return _Outcome("fetched", f"{written} tables written", written)


class Progress:
    """Progress of ``total`` steps on ``out``: a bar redrawn in place (``bar``: a
    terminal), else one line per step; nothing with ``quiet``."""

    def __init__(self, out: TextIO, total: int, *, bar: bool, quiet: bool = False) -> None:
        self.out, self.total, self.bar, self.quiet = out, total, bar, quiet
        self.count = 0

    def step(self, text: str) -> None:
        self.count += 1
        if self.quiet:
            return
        if not self.bar:
            print(f"[{self.count}/{self.total}] {text}", file=self.out, flush=True)
            return
        filled = BAR_WIDTH * self.count // max(1, self.total)
        line = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.count}/{self.total} {text}"
        self.out.write("\r\x1b[K" + line[:120])  # back to the start, clear to the end
        self.out.flush()

    def done(self) -> None:
        if self.bar and self.count and not self.quiet:
            self.out.write("\n")
            self.out.flush()
