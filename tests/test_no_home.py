"""No home, still a service: a uid without a passwd entry and HOME unset (as in many
containers) runs with a temporary disk cache and says so in one warning, no traceback.

The uid is real: the service runs under ``unshare --user --map-user=54321``, a user
namespace where it is uid 54321, which no passwd entry names.
"""

import os
import shutil
import subprocess
import sys

import pytest

from exrate_green.simulator import Upstream

from .support import BIN, ROOT, wait_until

pytestmark = pytest.mark.timeout(60)

NO_PASSWD_UID = "54321"


def homeless(args):
    """``unshare`` argv running ``bin/exrate-service ARGS`` as a uid with no passwd entry."""
    return ["unshare", "--user", f"--map-user={NO_PASSWD_UID}", f"--map-group={NO_PASSWD_UID}",
            sys.executable, str(BIN), *args]


def homeless_env(**variables):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1"}
    env.update(variables)   # no HOME, no EXRATE_CACHE_DIR, no XDG_CACHE_HOME
    return env


@pytest.fixture(scope="module", autouse=True)
def user_namespaces():
    probe = ["unshare", "--user", f"--map-user={NO_PASSWD_UID}", sys.executable, "-c",
             "import os, pwd; pwd.getpwuid(os.getuid())"]
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    result = subprocess.run(probe, capture_output=True, text=True, timeout=20)
    if "KeyError" not in result.stderr:
        pytest.skip(f"cannot run as a uid without a passwd entry here: {result.stderr[-200:]}")


def test_convert_without_a_home_answers_with_one_warning_and_no_traceback(tmp_path):
    result = subprocess.run(homeless(["convert", "10", "USD", "2021-05-18"]),
                            env=homeless_env(EXRATE_PROVIDER="ecb", TMPDIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=40, cwd=str(ROOT))
    output = result.stdout + result.stderr   # (where logs go is issue 16's business)
    assert result.returncode == 0, output
    assert "10 USD = 8.18197 EUR on 2021-05-18" in output
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "no usable home directory" in warnings[0]
    assert f"uid {NO_PASSWD_UID} has no passwd entry" in warnings[0]
    assert "Traceback" not in output
    assert list(tmp_path.iterdir()) == []   # the temporary cache went with the process


def test_the_service_without_a_home_serves_requests(tmp_path):
    with Upstream() as up:
        proc = subprocess.Popen(homeless([]), cwd=str(ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                env=homeless_env(EXRATE_URL=up.url, EXRATE_PROVIDER="ecb",
                                                 TMPDIR=str(tmp_path)))
        try:
            assert up.wait_for_connections(1, 30)
            rid = up.send_request({"marketId": 1, "selectionId": 2, "odds": 1.5,
                                   "stake": 10, "currency": "USD",
                                   "date": "2021-05-18T12:00:00.000Z"})
            reply = up.wait_for_reply(rid, 10)
            assert reply is not None and reply["type"] == "message"
            assert reply["payload"]["stake"] == pytest.approx(8.18197)
        finally:
            proc.terminate()
            output = proc.communicate(timeout=30)[0].decode()
    assert output.count("no usable home directory") == 1
    assert "Traceback" not in output
    assert wait_until(lambda: list(tmp_path.iterdir()) == [], 5)
