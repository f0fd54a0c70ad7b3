"""Memory the simulator's bookkeeping holds as requests go by: it must stay flat.

    python tools/sim_memory.py [REQUESTS]      (default 1,000,000)

Drives the upstream simulator's ledger and judge in-process (no sockets): automatic
requests are registered and answered with valid replies in batches of 10,000, and the
memory allocated since the first batch (tracemalloc) is printed at a quarter, half and
all of REQUESTS. What stays: the last ``keep_replies`` parsed replies (10,000, about
6.5 MiB), the latency reservoir, the ledger's rings; nothing grows with the count.
"""

from gevent import monkey

monkey.patch_all()  # first, as in every entry point

import datetime
import sys
import time
import tracemalloc
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's exrate_green

from exrate_green.simulator import Upstream

BATCH = 10_000


def main(requests: int) -> int:
    up = Upstream(seed=1)
    up.maker.prepare()
    now = datetime.datetime.now(datetime.UTC)
    stamp = f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z"

    def batch() -> None:
        templates = up.maker.next_templates(BATCH)
        ids = up.ledger.allocate_many(BATCH)
        up.ledger.register_many(ids, templates, 1, time.monotonic())
        for rid, template in zip(ids, templates):
            body = dict(template.payload, currency="EUR", date=stamp)
            data = orjson.dumps({"type": "message", "id": rid, "payload": body})
            up.judge.on_text(1, data, time.monotonic(), time.time())

    batch()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    marks = {requests // 4, requests // 2, requests}
    for done in range(2 * BATCH, requests + 1, BATCH):
        batch()
        if done in marks:
            grown = (tracemalloc.get_traced_memory()[0] - base) / 2**20
            print(f"{done:>12,} requests judged: +{grown:.2f} MiB since the first batch")
    report = up.report()
    print(f"ok={report['ok']:,} invalid={report['invalid']} latency samples="
          f"{report['latency_samples']:,} ledger={up.ledger.sizes()}")
    return 0 if report["ok"] == requests and report["invalid"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
