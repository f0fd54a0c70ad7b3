"""Security review, as tests (docs/design.md 3, 4, 5).

* TLS: a self-signed loopback wss:// upstream and https:// rate API (certificates from
  ``trustme``) are refused by default and accepted once their CA is configured
  (``Settings.ca_file`` / ``EXRATE_CA_FILE``), by ``Connection.open`` and ``HttpClient``
  alike; a certificate for another host name is refused even with its CA.
* The exchangerate.host access key never leaves the process: the service runs as a real
  process with the key, ``LOG_LEVEL=DEBUG`` (urllib3 logs every URL) and
  ``--show-messages``, against a fake API that succeeds, then echoes the request URL
  (key included) in its errors, then is gone; neither its output nor any reply holds the
  key, in any spelling.
* Currency and date input never reaches a URL unvalidated: hostile currencies and dates
  sent to the service leave only ``/v1/YYYY-MM-DD?base=EUR``-shaped requests at the rate
  API (and ``/historical?access_key=...&date=YYYY-MM-DD`` for exchangerate.host).
  ``tests/test_hostile_protocol.py`` proves the same for generated input at the parser.
* Cache values are never unpickled from disk: proved in ``tests/test_cache.py``
  (``test_pickled_rows_are_refused_never_unpickled``,
  ``test_disk_refuses_to_store_anything_but_text``): not repeated here.
* In run mode nothing listens on a network port: the service process holds one
  established connection to the upstream and no listening or unconnected socket.
* Upstream text cannot forge log lines: values quoted in logged reasons and the close
  frame's reason are escaped, so every printed line is one event.
"""

import json
import logging
import re
import signal
import socket
import ssl
import urllib.parse
from pathlib import Path

import gevent
import psutil
import pytest
import trustme
from gevent.pywsgi import WSGIServer

from exrate_green.config import Settings
from exrate_green.connection import Connection
from exrate_green.errors import ConnectionClosed, RateUnavailable
from exrate_green.rates.http import HttpClient
from exrate_green.simulator import FakeRateApi, Upstream

from .support import running_service, service_env, start_service, wait_until

pytestmark = pytest.mark.timeout(60)

CORPUS = Path(__file__).with_name("corpus") / "hostile.jsonl"
PAYLOAD = {"marketId": 123456, "selectionId": 987654, "odds": 2.2, "stake": 253.67,
           "currency": "USD", "date": "2021-05-18T21:32:42.324Z"}


# -- TLS -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A private CA, its PEM file, and server contexts for 127.0.0.1 and for another name."""
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    def server_context(*names):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(context)
        return context

    return {"ca_file": str(ca_file), "loopback": server_context("127.0.0.1"),
            "other_name": server_context("upstream.example.com")}


class TlsFakeRateApi(FakeRateApi):
    """The fake rate API over https:// (the same application, a TLS listener)."""

    def __init__(self, ssl_context, **kwargs):
        super().__init__(**kwargs)
        self.ssl_context = ssl_context

    def start(self):
        gevent.get_hub().threadpool.apply(self._bundle.load)
        self._stopping.clear()
        self._server = WSGIServer((self.host, self.port), self._app, log=None,
                                  error_log=logging.getLogger("tls-fake-rate-api"),
                                  ssl_context=self.ssl_context)
        self._server.start()
        return self

    @property
    def url(self):
        return f"https://{self.host}:{self._server.server_port}"


def test_wss_upstream_with_a_private_ca_is_refused_by_default(pki):
    with Upstream(ssl_context=pki["loopback"], heartbeat_interval_s=None) as up:
        assert up.url.startswith("wss://")
        with pytest.raises(ConnectionClosed, match="CERTIFICATE_VERIFY_FAILED"):
            Connection.open(up.url, timeout_s=5)
        assert up.connections == 0  # no WebSocket was ever opened


def test_wss_upstream_is_accepted_with_its_ca_file(pki):
    with Upstream(ssl_context=pki["loopback"], heartbeat_interval_s=None) as up:
        conn = Connection.open(up.url, timeout_s=5, ca_file=pki["ca_file"])
        try:
            assert up.wait_for_connections(1, 3)
        finally:
            conn.close()


def test_wss_certificate_for_another_host_is_refused_even_with_its_ca(pki):
    with Upstream(ssl_context=pki["other_name"], heartbeat_interval_s=None) as up:
        with pytest.raises(ConnectionClosed, match="(?i)hostname|match|CERTIFICATE_VERIFY_FAILED"):
            Connection.open(up.url, timeout_s=5, ca_file=pki["ca_file"])
        assert up.connections == 0


def test_https_rate_api_with_a_private_ca_is_refused_by_default(pki):
    with TlsFakeRateApi(pki["loopback"]) as api:
        with HttpClient(Settings(http_timeout_s=3)) as http:
            with pytest.raises(RateUnavailable, match="TLS error.*(?i:certificate verify failed)"):
                http.get_json(api.frankfurter_url + "/2021-05-18", {"base": "EUR"})
        assert api.calls == 0


def test_https_rate_api_is_accepted_with_its_ca_file(pki):
    with TlsFakeRateApi(pki["loopback"]) as api:
        with HttpClient(Settings(http_timeout_s=3, ca_file=pki["ca_file"])) as http:
            answer = http.get_json(api.frankfurter_url + "/2021-05-18", {"base": "EUR"})
        assert answer["base"] == "EUR" and "USD" in answer["rates"]


def test_https_certificate_for_another_host_is_refused_even_with_its_ca(pki):
    with TlsFakeRateApi(pki["other_name"]) as api:
        with HttpClient(Settings(http_timeout_s=3, ca_file=pki["ca_file"])) as http:
            with pytest.raises(RateUnavailable, match="TLS error"):
                http.get_json(api.frankfurter_url + "/2021-05-18", {"base": "EUR"})


def test_the_service_speaks_tls_end_to_end_only_with_the_ca_configured(pki, tmp_path):
    day = {**PAYLOAD, "date": "2021-06-01T10:00:00.000Z"}
    with TlsFakeRateApi(pki["loopback"]) as api, \
            Upstream(ssl_context=pki["loopback"], heartbeat_interval_s=0.2) as up:
        common = {"provider": "frankfurter", "frankfurter_url": api.frankfurter_url,
                  "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 0.6}
        with running_service(up.url, tmp_path / "a", **common) as service:
            gevent.sleep(1.0)
            assert up.connections == 0 and service.stats.connects == 0
        with running_service(up.url, tmp_path / "b", ca_file=pki["ca_file"], **common):
            assert up.wait_for_connections(1, 5)
            reply = up.wait_for_reply(up.send_request(day), 5)
            assert reply["type"] == "message" and reply["payload"]["currency"] == "EUR"
        assert api.calls == 1


# -- the access key ---------------------------------------------------------------------------

KEY = "SeKr1t+/=&%Zq9"


def key_spellings():
    return {KEY, urllib.parse.quote(KEY, safe=""), urllib.parse.quote_plus(KEY),
            urllib.parse.quote(KEY), "SeKr1t"}


def closed_port():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def run_with_key(tmp_path, api_url, steps):
    """The service as a process with the access key, DEBUG logs and --show-messages,
    against ``api_url``; ``steps(ask)`` sends requests. -> (output, replies as JSON text)."""
    replies = []
    with Upstream(heartbeat_interval_s=0.2) as up:
        env = service_env(tmp_path, EXRATE_URL=up.url, EXCHANGE_ACCESS_KEY=KEY, LOG_LEVEL="DEBUG",
                          EXCHANGERATE_HOST_URL=api_url, EXRATE_HTTP_TIMEOUT=2,
                          EXRATE_HEARTBEAT_INTERVAL=0.2, EXRATE_HEARTBEAT_TIMEOUT=0.6)
        proc = start_service(["--show-messages"], env)
        lines = []
        reader = gevent.spawn(lambda: [lines.append(raw.decode("utf-8", "replace"))
                                       for raw in iter(proc.stdout.readline, b"")])
        try:
            assert up.wait_for_connections(1, 15), "".join(lines)

            def ask(date, currency="USD"):
                rid = up.send_request({**PAYLOAD, "currency": currency,
                                       "date": f"{date}T10:00:00.000Z"})
                reply = up.wait_for_reply(rid, 10)
                assert reply is not None, "".join(lines)[-2000:]
                replies.append(json.dumps(reply))
                return reply

            steps(ask)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            reader.join(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return "".join(lines), replies


@pytest.mark.timeout(90)
def test_the_access_key_never_leaves_the_process(tmp_path):
    def with_the_api(ask):
        # 1. the key is accepted: urllib3 logs each URL at DEBUG
        assert ask("2021-05-18")["type"] == "message"
        assert ask("2021-05-19", "UAH")["type"] == "message"
        # 2. a key the API refuses: its error text repeats the URL, key included
        api.access_key = "another key"
        refused = ask("2021-05-20")
        assert refused["type"] == "error" and "invalid_access_key" in refused["message"]
        assert "(request: http" in refused["message"]  # the URL was echoed back

    def without_it(ask):
        # 3. nothing listens: requests' and urllib3's exception texts name the URL
        gone = ask("2021-05-21")
        assert gone["type"] == "error" and "cannot reach" in gone["message"], gone

    with FakeRateApi(access_key=KEY) as api:
        output, replies = run_with_key(tmp_path / "1", api.url, with_the_api)
    more_output, more_replies = run_with_key(tmp_path / "2", f"http://127.0.0.1:{closed_port()}",
                                             without_it)
    output += more_output
    replies += more_replies
    everything = output + "\n".join(replies)
    leaks = sorted(s for s in key_spellings() if s in everything)
    leaking = [line for line in everything.splitlines() if any(s in line for s in leaks)]
    assert not leaks, leaking[:5]
    # the test went where a leak would be: URLs with the key were logged (masked)
    assert "access_key=***" in output
    assert "urllib3.connectionpool" in output and "send {" in output
    print(f"\naccess key: {len(output.splitlines())} log lines and {len(replies)} replies, "
          f"{output.count('access_key=***')} masked URLs, no spelling of the key")


# -- what reaches the rate API's URLs ----------------------------------------------------------

class RecordingFakeRateApi(FakeRateApi):
    """The fake rate API, noting the path and query of every request it serves."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def _app(self, environ, start_response):
        self.seen.append((environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")))
        return super()._app(environ, start_response)


def hostile_requests():
    """The corpus' requests whose currency or date is hostile (they carry an id)."""
    entries = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    return [e for e in entries if e["id"] is not None and "text" in e
            and e["name"].startswith(("currency-", "date-"))]


@pytest.mark.parametrize("provider", ["frankfurter", "exchangerate.host"])
def test_currency_and_date_reach_no_url_unvalidated(tmp_path, provider):
    hostile = hostile_requests()
    assert len(hostile) >= 40
    with RecordingFakeRateApi() as api, Upstream(heartbeat_interval_s=0.2) as up:
        settings = {"provider": provider, "frankfurter_url": api.frankfurter_url,
                    "exchangerate_host_url": api.exchangerate_host_url, "access_key": "k"}
        with running_service(up.url, tmp_path, **settings):
            assert up.wait_for_connections(1, 5)
            for entry in hostile:
                up.send_raw_request(entry["text"].encode("utf-8", "surrogatepass"), entry["id"])
            for entry in hostile:
                assert up.wait_for_reply(entry["id"], 5) is not None, entry["name"]
            ok = up.wait_for_reply(up.send_request(PAYLOAD), 5)
            assert ok["type"] == "message"
    assert api.seen, "no request reached the rate API: the test proves nothing"
    if provider == "frankfurter":
        # a day, today, or a past day's month as a range (START..END)
        day = r"\d{4}-\d{2}-\d{2}"
        shape = re.compile(rf"/v1/({day}|latest|{day}\.\.{day})")
        assert all(shape.fullmatch(path) and query == "base=EUR"
                   for path, query in api.seen), api.seen
    else:
        for path, query in api.seen:
            params = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
            assert path in ("/historical", "/live"), path
            names = [name for name, _ in params]
            assert names == (["access_key", "date"] if path == "/historical" else ["access_key"])
            assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", v) for n, v in params if n == "date")


# -- no listening socket ---------------------------------------------------------------------

def test_nothing_listens_on_a_network_port_in_run_mode(tmp_path):
    with Upstream(heartbeat_interval_s=0.2) as up:
        env = service_env(tmp_path, EXRATE_URL=up.url, EXRATE_PROVIDER="ecb",
                          EXRATE_HEARTBEAT_INTERVAL=0.2, EXRATE_HEARTBEAT_TIMEOUT=0.6)
        proc = start_service([], env)
        reader = gevent.spawn(lambda: proc.stdout.read())
        try:
            assert up.wait_for_connections(1, 15)
            rid = up.send_request(PAYLOAD)  # the service has served: every module is loaded
            assert up.wait_for_reply(rid, 10)["type"] == "message"
            service = psutil.Process(proc.pid)
            assert wait_until(lambda: len(service.threads()) >= 1, 1)
            sockets = service.net_connections(kind="all")
            inet = [c for c in sockets if c.family in (2, 10)]  # AF_INET, AF_INET6
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=20)
            reader.join(timeout=5)
    assert code == 0
    assert not [c for c in sockets if c.status == psutil.CONN_LISTEN], sockets
    assert len(inet) == 1, inet  # the upstream connection, nothing else
    (link,) = inet
    assert link.status == psutil.CONN_ESTABLISHED and link.raddr.port == up.port


# -- log forging -------------------------------------------------------------------------------

FORGED = "CRITICAL forged"
LOG_LINE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z [A-Z]+ [\w.]+: ")


def test_upstream_text_cannot_forge_log_lines(tmp_path):
    # Every upstream-controlled string that reaches a log line, with line breaks in it.
    # Each printed line must still be one event: starting with its timestamp and level.
    breaks = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"]
    with Upstream(heartbeat_interval_s=0.2) as up:
        env = service_env(tmp_path, EXRATE_URL=up.url, EXRATE_PROVIDER="ecb",
                          EXRATE_HEARTBEAT_INTERVAL=0.2, EXRATE_HEARTBEAT_TIMEOUT=0.6)
        proc = start_service(["--show-messages"], env)
        lines = []
        reader = gevent.spawn(lambda: [lines.append(raw.decode("utf-8", "replace"))
                                       for raw in iter(proc.stdout.readline, b"")])
        try:
            assert up.wait_for_connections(1, 15)
            for i, brk in enumerate(breaks):
                text = f"x{brk}{FORGED}"
                # no id: skipped and logged with the reason, which quotes the value
                up.send_raw(json.dumps({"type": text}))
                up.send_raw(json.dumps({"type": "message", "payload": {
                    "stake": 1, "currency": text, "date": "2021-05-18"}}))
                up.send_raw(json.dumps({"type": "message", "payload": {
                    "stake": 1, "currency": "USD", "date": text}}))
                # with an id: an error reply (and, with --show-messages, the message log)
                rid = up.send_request({**PAYLOAD, "currency": text}, id=f"id{brk}{i}")
                assert up.wait_for_reply(rid, 5)["type"] == "error"
            # a lone surrogate (the lenient parser, for NaN) is not even encodable: logging
            # would print a "--- Logging error ---" traceback instead of the line
            up.send_raw('{"type":"\\ud800' + FORGED + '","n":NaN}')
            # the close frame's reason is logged with the disconnect
            accepted = up.connections
            up.close(1000, f"bye\n{FORGED}")
            assert up.wait_for_connections(accepted + 1, 5)
            gevent.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            reader.join(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = "".join(lines)
    assert output.count(FORGED) >= 3 * len(breaks)  # the values were logged...
    # ...without ever starting a line of their own (log pipelines split on LF; a CR would
    # rewrite a line on a terminal; JSON in the message log may keep U+2028 and NEL raw)
    stray = [line for line in output.split("\n") if line and not LOG_LINE.match(line)]
    assert not stray, stray[:5]
    assert "\r" not in output
    assert "Logging error" not in output
