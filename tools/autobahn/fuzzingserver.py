# Python 2.7 (runs inside .autobahn/py27): the Autobahn fuzzingserver, bound to one interface.
#
# `wstest -m fuzzingserver` listens on every interface (its startServer calls listenWS
# without one). This launcher makes the same call bound to the host of the spec's "url"
# (127.0.0.1 from tools/autobahn/run.py), then runs wstest as usual with no web port.
#
# usage: python fuzzingserver.py SPEC.json
import json
import sys

from autobahn.twisted import websocket as twisted_websocket
from autobahntestsuite import fuzzing, wstest
from urlparse import urlparse


def main(spec_path):
    with open(spec_path) as f:
        host = urlparse(json.load(f)["url"]).hostname
    if not host:
        sys.exit("the spec's url names no host")
    listen = twisted_websocket.listenWS

    def listen_on_host(factory, context_factory=None):
        return listen(factory, context_factory, interface=host)

    fuzzing.listenWS = listen_on_host
    sys.argv = ["wstest", "--mode", "fuzzingserver", "--spec", spec_path, "--webport", "0"]
    wstest.run()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: fuzzingserver.py SPEC.json")
    main(sys.argv[1])
