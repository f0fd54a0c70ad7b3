"""Print one /metrics scrape of the real service answering the simulator's traffic.

usage: python tools/scrape_once.py > scrape.txt && promtool check metrics < scrape.txt

The service runs in this process (as the tests run it) against the bundled upstream
simulator and the fake rate API on 127.0.0.1, with the frankfurter provider so that every
family (rate-API calls, breakers, cache tiers) has samples; nothing leaves the machine.
"""

from gevent import monkey

monkey.patch_all()

import sys
import tempfile
from pathlib import Path

import gevent
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exrate_green.config import Settings
from exrate_green.metrics import MetricsServer
from exrate_green.runtime import Runtime
from exrate_green.service import Service
from exrate_green.simulator import FakeRateApi, Upstream


def main() -> int:
    with tempfile.TemporaryDirectory() as cache_dir, FakeRateApi() as api, \
            Upstream(request_rate=100, seed=3, heartbeat_interval_s=0.2) as up:
        settings = Settings(url=up.url, cache_dir=Path(cache_dir), provider="frankfurter",
                            frankfurter_url=api.url + "/v1", heartbeat_interval_s=0.2,
                            heartbeat_timeout_s=0.5, summary_interval_s=3600.0)
        runtime = Runtime(settings)
        service = Service(settings, runtime.book)
        runner = gevent.spawn(service.run)
        server = MetricsServer(service, 0, host="127.0.0.1").start()
        try:
            with gevent.Timeout(30):
                while up.report()["replies"] < 50:
                    gevent.sleep(0.05)
            text = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
        finally:
            server.stop()
            service.stop()
            runner.join(timeout=5)
            runtime.close()
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
