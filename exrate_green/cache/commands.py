"""``exrate-service cache (list | show DAY | stats | clear) [--json]``.

Memory is per process and gone with it, so the tiers shown are disk and, when
``REDIS_URL`` is set, Redis. A tier that cannot be read is reported on stderr (exit 1);
the others are still shown. ``clear`` takes ``--tier`` and asks before deleting Redis keys
(the whole fleet's) unless ``--yes``. ``cache warm`` is ``exrate_green.warm``: it needs
the rate providers too, so it lives above both.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import TYPE_CHECKING, TextIO

from ..errors import CacheError, ConfigError, ExrateError
from .disk import TableCache
from .redis import RedisTier
from .rows import BadRow

if TYPE_CHECKING:
    from ..config import Settings

ACTIONS = ("list", "show", "stats", "clear")
TIERS = ("disk", "redis")


def run_cache_command(settings: Settings, action: str,
                      day: str | datetime.date | None = None, as_json: bool = False,
                      out: TextIO | None = None, *, tier: str | None = None,
                      yes: bool = False, answer: TextIO | None = None) -> int:
    """Run ``exrate-service cache ACTION``; returns the exit code.

    ``out`` defaults to ``sys.stdout`` (looked up at call time). 0 on success, 2 for a bad
    action, DAY or tier, or a ``clear`` not confirmed (one line on stderr), 1 if a tier
    cannot be read. ``tier`` limits ``clear`` to one tier; ``yes`` skips its question, read
    from ``answer`` (default stdin, asked only on a terminal).
    """
    out = sys.stdout if out is None else out
    if action not in ACTIONS:
        return _usage_error(f"unknown cache action {action!r}: choose one of "
                            f"{', '.join(ACTIONS)}")
    if action == "show":
        try:
            day = _parse_day(day)
        except ValueError as e:
            return _usage_error(str(e))
    if tier is not None and tier not in TIERS:
        return _usage_error(f"--tier must be disk or redis, got {tier!r}")
    if tier == "redis" and not settings.redis_url:
        return _usage_error("--tier=redis: REDIS_URL is not set, there is no Redis tier")
    try:
        tiers = _open_tiers(settings, only=tier if action == "clear" else None)
    except ConfigError as e:
        print(f"exrate-service: configuration error: {e}", file=sys.stderr)
        return 2
    if action == "clear" and not yes and not _confirmed(tiers, answer):
        for each in tiers:
            each.close()
        return 2
    results, failed = {}, False
    try:
        for each in tiers:
            try:
                results[each.name] = _ACTIONS[action](each, day)
            except CacheError as e:
                print(f"exrate-service cache {action}: {each.name}: {e}", file=sys.stderr)
                failed = True
    finally:
        for each in tiers:
            each.close()
    result = _MERGE[action](results, settings)
    if as_json:
        print(json.dumps(result, indent=2), file=out)
    else:
        _FORMATS[action](result, day, settings, out)
    return 1 if failed else 0


def _open_tiers(settings, only=None):
    """The disk tier and, with REDIS_URL, the Redis tier (``only``: that one alone)."""
    redis = None
    if settings.redis_url and only in (None, "redis"):
        # first: a bad REDIS_URL is refused before the disk is opened
        redis = RedisTier(settings.redis_url, settings.cache_ttl_s,
                          stale_s=settings.stale_if_error_s, verify=settings.redis_verify)
    if only == "redis":
        return [redis] if redis is not None else []
    disk = TableCache(settings.cache_dir, settings.cache_ttl_s,
                      stale_s=settings.stale_if_error_s)
    disk.open()
    return [disk] + ([redis] if redis is not None else [])


def _confirmed(tiers, answer=None):
    """True if clearing ``tiers`` may go ahead: no Redis tier among them (a process's own
    disk cache is cheap to refill), or the user said yes on a terminal. Redis holds the
    whole fleet's tables: never wiped by a script that did not say ``--yes``."""
    redis = next((tier for tier in tiers if tier.name == "redis"), None)
    if redis is None:
        return True
    stream = sys.stdin if answer is None else answer
    if not stream.isatty():
        print(f"exrate-service cache clear: would delete the Redis tables at {redis.where}, "
              f"shared by every process of the fleet: confirm with --yes "
              f"(or --tier=disk for this machine's cache only)", file=sys.stderr)
        return False
    print(f"Delete every rate table in Redis at {redis.where}, shared by every process "
          f"of the fleet? [y/N] ", end="", file=sys.stderr, flush=True)
    reply = stream.readline().strip().lower()
    if reply in ("y", "yes"):
        return True
    print("exrate-service cache clear: not confirmed, nothing deleted", file=sys.stderr)
    return False


def _usage_error(message):
    print(f"exrate-service cache: {message}", file=sys.stderr)
    return 2


def _parse_day(day):
    if isinstance(day, datetime.date):
        return day
    try:
        return datetime.date.fromisoformat(day or "")
    except (TypeError, ValueError):
        raise ValueError(f"invalid day {day!r}: expected YYYY-MM-DD") from None


# -- per tier ------------------------------------------------------------------------------

def _tier_list(tier, day):
    return tier.entries()


def _tier_show(tier, day):
    return tier.tables_for(day)


def _tier_stats(tier, day):
    return tier.stats()


def _tier_clear(tier, day):
    return tier.clear()


_ACTIONS = {"list": _tier_list, "show": _tier_show, "stats": _tier_stats,
            "clear": _tier_clear}


# -- merged over the tiers: what --json prints ---------------------------------------------

def _merge_list(results, settings):
    """One row per table per tier, by day, provider, tier; times made readable."""
    now = datetime.datetime.now(datetime.UTC).timestamp()
    rows = [row for tier_rows in results.values() for row in tier_rows]
    for row in rows:
        if row["fetched_at"] is None:  # a bad row: nothing to judge
            row["fresh_for_s"] = row["stale_for_s"] = 0.0
            row["expires_in_s"] = _rounded(row["expires_in_s"])
            continue
        age_s = now - row["fetched_at"]
        row["fresh_for_s"] = round(max(0.0, settings.cache_ttl_s - age_s), 1)
        row["stale_for_s"] = round(max(0.0, age_s - settings.cache_ttl_s), 1)
        row["fetched_at"] = _utc_iso(row["fetched_at"])
        if row["expires_in_s"] is not None:
            row["expires_in_s"] = round(row["expires_in_s"], 1)
    order = {"disk": 0, "redis": 1}
    return sorted(rows, key=lambda r: (r["day"], r["provider"], order.get(r["tier"], 9)))


def _merge_show(results, settings):
    """Each distinct table once, with the tiers that hold it; a bad row as bad."""
    shown: dict = {}
    for tier_name, tables in results.items():
        for t in tables:
            if isinstance(t, BadRow):
                shown[(t.provider, tier_name, t.why)] = {
                    "provider": t.provider, "day": t.day, "tiers": [tier_name], "bad": t.why}
                continue
            rates = {code: str(rate) for code, rate in sorted(t.rates.items())}
            key = (t.provider, t.fetched_at, json.dumps(rates))
            entry = shown.setdefault(key, {
                "provider": t.provider, "day": t.day.isoformat(),
                "published": t.published.isoformat(), "fetched_at": _utc_iso(t.fetched_at),
                "tiers": [], "rates": rates})
            entry["tiers"].append(tier_name)
    return sorted(shown.values(), key=lambda e: (e["provider"], e.get("fetched_at", "")))


def _merge_stats(results, settings):
    return results


def _merge_clear(results, settings):
    return {"removed": sum(results.values()), "by_tier": results}


_MERGE = {"list": _merge_list, "show": _merge_show, "stats": _merge_stats,
          "clear": _merge_clear}


# -- text ----------------------------------------------------------------------------------

def _format_list(rows, day, settings, out):
    if not rows:
        print("no cached tables", file=out)
    else:
        headers = ("TIER", "PROVIDER", "DAY", "PUBLISHED", "CURRENCIES", "FETCHED AT (UTC)",
                   "FRESHNESS", "DROPPED IN")
        body = [(r["tier"], r["provider"], r["day"], r["published"], str(r["currencies"]),
                 r["fetched_at"] or "-", _freshness(r), _duration(r["expires_in_s"]))
                for r in rows]
        _print_table(headers, body, out, right={4})
    note = _ecb_note(settings)
    if note:
        print(note, file=out)


def _freshness(row):
    if row.get("bad"):
        return f"BAD ROW: {row['bad']}"[:100]
    if row["fresh_for_s"] > 0:
        return f"fresh for {_duration(row['fresh_for_s'])}"
    return f"stale for {_duration(row['stale_for_s'])}"


def _ecb_note(settings):
    """Why ECB days are not in the cache: the bundled history is read directly."""
    if "ecb" not in [p.strip() for p in str(settings.provider).split(",")]:
        return None
    try:
        from ..rates.ecb_bundle import EcbBundle
        until = f" (up to {EcbBundle().last_day.isoformat()})"
    except (ExrateError, OSError, ImportError, ValueError):  # the day is only a nicety
        until = ""
    return (f"note: the ecb provider reads the ECB history bundled with exrate-green"
            f"{until} directly, without the cache; only later days are cached.")


def _format_show(tables, day, settings, out):
    if not tables:
        print(f"no cached tables for {day.isoformat()}", file=out)
        return
    for n, table in enumerate(tables):
        if n:
            print(file=out)
        if table.get("bad"):
            print(f"{table['provider']} {table['day']}: BAD ROW in {table['tiers'][0]} "
                  f"(treated as a miss, deleted when the service reads it): {table['bad']}",
                  file=out)
            continue
        print(f"{table['provider']} {table['day']} (published {table['published']}, "
              f"{len(table['rates'])} currencies per 1 EUR, fetched {table['fetched_at']}, "
              f"in {' and '.join(table['tiers'])})", file=out)
        _print_table(None, list(table["rates"].items()), out)


def _format_stats(stats, day, settings, out):
    for n, (tier_name, values) in enumerate(stats.items()):
        if n:
            print(file=out)
        print(tier_name, file=out)
        rows = [(f"  {name}", str(value)) for name, value in values.items() if name != "tier"]
        _print_table(None, rows, out)


def _format_clear(result, day, settings, out):
    for tier_name, removed in result["by_tier"].items():
        print(f"{tier_name}: removed {removed} cached table{'' if removed == 1 else 's'}",
              file=out)


_FORMATS = {"list": _format_list, "show": _format_show, "stats": _format_stats,
            "clear": _format_clear}


def _print_table(headers, rows, out, right=()):
    """Columns padded to their widest cell, two spaces apart; ``right`` aligns numbers."""
    lines = ([headers] if headers else []) + [tuple(row) for row in rows]
    if not lines:
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip(), file=out)


def _rounded(seconds):
    return None if seconds is None else round(seconds, 1)


def _utc_iso(epoch_s):
    moment = datetime.datetime.fromtimestamp(epoch_s, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds):
    """``"6d 23h"``, ``"1h 59m"``, ``"4m 10s"``, ``"42s"``; "never" for no expiry, "0s" at
    zero. Rounded to the unit shown last, so 7139.6 s is "1h 59m", not "1h 58m"."""
    if seconds is None:
        return "never"
    whole = round(seconds)
    if whole <= 0:
        return "0s"
    if whole >= 86400:
        days, hours = divmod(round(seconds / 3600), 24)
        return f"{days}d {hours}h"
    if whole >= 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours}h {minutes}m"
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"
