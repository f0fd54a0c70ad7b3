"""Cache tier figures: lookup latency per tier, a cold storm through Redis, month writes.

    /work/venv/bin/python tools/bench_cache.py [--days=2000]

Starts its own redis-server on a free loopback port (no persistence) and a cache directory
in a temporary directory; prints one line per figure. Dev only (not part of the package).
"""

from gevent import monkey

monkey.patch_all()

import argparse
import contextlib
import datetime
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import gevent

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exrate_green.cache import RedisTier, TableCache, TieredCache
from exrate_green.rates.table import RateTable

FIRST = datetime.date(2015, 1, 1)
CURRENCIES = ("USD", "JPY", "BGN", "CZK", "DKK", "GBP", "HUF", "PLN", "RON", "SEK", "CHF",
              "ISK", "NOK", "TRY", "AUD", "BRL", "CAD", "CNY", "HKD", "IDR", "ILS", "INR",
              "KRW", "MXN", "MYR", "NZD", "PHP", "SGD", "THB", "ZAR")
RATES = {code: Decimal("1.2345") + i for i, code in enumerate(CURRENCIES)}


@contextlib.contextmanager
def redis_server(directory):
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                gevent.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()


def tables(n):
    now = time.time()
    return [RateTable("frankfurter", FIRST + datetime.timedelta(days=i),
                      FIRST + datetime.timedelta(days=i), {**RATES, "EUR": Decimal(1)}, now)
            for i in range(n)]


def cache_at(directory, url):
    cache = TieredCache(TableCache(directory, 7200, stale_s=604800),
                        RedisTier(url, 7200, stale_s=604800))
    cache.open()
    return cache


def timed_lookups(cache, days, label):
    spent = []
    for day in days:
        start = time.perf_counter()
        cache.get("frankfurter", day)
        spent.append(time.perf_counter() - start)
    spent.sort()
    p99 = spent[int(len(spent) * 0.99) - 1]
    print(f"{label:<44} n={len(spent):>5}  p50 {statistics.median(spent) * 1e3:6.2f} ms  "
          f"p99 {p99 * 1e3:6.2f} ms")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--days", type=int, default=2000)
    n = parser.parse_args().days
    work = Path(tempfile.mkdtemp(prefix="exrate-bench-cache-"))
    try:
        with redis_server(work) as url:
            all_tables = tables(n)
            days = [t.day for t in all_tables]
            writer = cache_at(work / "dyno-1", url)
            start = time.perf_counter()
            for m in range(0, n, 31):
                writer.put_many(all_tables[m:m + 31])
            spent = time.perf_counter() - start
            print(f"{'put_many, months of 31 tables (disk + Redis)':<44} n={n // 31 + 1:>5}  "
                  f"{spent / (n / 31) * 1e3:6.2f} ms per month")
            timed_lookups(writer, days[:500], "get, disk hit")
            timed_lookups(writer, [d + datetime.timedelta(days=n) for d in days[:500]],
                          "get, miss in disk and Redis")
            writer.close()

            cold = cache_at(work / "dyno-2", url)
            timed_lookups(cold, days[:500], "get, disk miss + Redis hit (copied up)")
            start = time.perf_counter()
            storm = [gevent.spawn(cold.get, "frankfurter", day) for day in days[500:]]
            gevent.joinall(storm)
            found = sum(g.value is not None for g in storm)
            print(f"{'cold storm: concurrent gets, Redis hits':<44} n={len(storm):>5}  "
                  f"{time.perf_counter() - start:6.2f} s wall, {found} found, "
                  f"redis errors {cold.redis.errors}")
            flights = []
            for day in days[:500]:
                start = time.perf_counter()
                with cold.flight("frankfurter", day.isoformat()):
                    pass
                flights.append(time.perf_counter() - start)
            print(f"{'flight enter + exit (lock file + Redis)':<44} n={len(flights):>5}  "
                  f"p50 {statistics.median(flights) * 1e3:6.2f} ms")
            cold.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
