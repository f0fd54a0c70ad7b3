"""The package as users install it: pyproject.toml against requirements.txt, ``pip install .``
into a fresh venv, the command from another directory, and the Procfile run by honcho."""

import importlib.metadata
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
import tomllib

import gevent
import psutil
import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

from exrate_green.simulator import Upstream

from .support import ROOT, wait_until

pytestmark = pytest.mark.timeout(240)


def pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def pinned():
    """{canonical name: Requirement} of requirements.txt."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            pins[_canonical(requirement.name)] = requirement
    return pins


def _canonical(name):
    return name.lower().replace("_", "-").replace(".", "-")


def test_every_dependency_in_pyproject_is_pinned_in_requirements_txt_within_its_range():
    pins = pinned()
    for line in pyproject()["project"]["dependencies"]:
        wanted = Requirement(line)
        pin = pins.get(_canonical(wanted.name))
        assert pin is not None, f"{wanted.name} is in pyproject.toml but not requirements.txt"
        (specifier,) = pin.specifier
        assert specifier.operator == "==", f"requirements.txt must pin {pin} exactly"
        assert wanted.specifier.contains(specifier.version), (str(wanted), str(pin))


def test_every_pin_in_requirements_txt_is_needed_by_a_dependency_in_pyproject():
    """Nothing pinned that the package does not need (directly or through a dependency)."""
    pins = pinned()
    needed, todo = set(), [Requirement(d) for d in pyproject()["project"]["dependencies"]]
    while todo:
        requirement = todo.pop()
        name = _canonical(requirement.name)
        if name in needed:
            continue
        needed.add(name)
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # only needed on other Pythons (a marker): not installed here
        for line in requires:
            dependency = Requirement(line)
            if dependency.marker is None or "extra" not in str(dependency.marker):
                todo.append(dependency)
    assert set(pins) - needed == set()


def test_the_pins_that_apply_here_are_the_versions_installed():
    for name, pin in pinned().items():
        if pin.marker is not None and not Marker(str(pin.marker)).evaluate():
            continue
        (specifier,) = pin.specifier
        assert importlib.metadata.version(pin.name) == specifier.version, name


def test_app_json_runs_one_worker_with_redis_and_declares_only_what_an_app_must_set():
    from exrate_green.config import VARIABLES

    with open(ROOT / "app.json", encoding="utf-8") as f:
        app = json.load(f)
    assert app["formation"] == {"worker": {"quantity": 1, "size": "basic"}}
    assert [addon["plan"].split(":")[0] for addon in app["addons"]] == ["heroku-redis"]
    # only the one var a Heroku app must set: a pinned default would never see a change
    assert set(app["env"]) == {"EXRATE_REDIS_VERIFY"} <= set(VARIABLES.values())
    verify = app["env"]["EXRATE_REDIS_VERIFY"]
    assert verify["value"] == "0" and "self-signed" in verify["description"]


def test_the_license_file_matches_pyproject():
    assert pyproject()["project"]["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


# -- a fresh venv ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A copy of the checkout ``pip install``-ed into a fresh venv; returns (venv, copy).

    The venv reuses the running environment's packages (a .pth file naming its
    site-packages) so that the test installs only this package (``--no-deps``): the
    dependencies themselves are what requirements.txt pins and the tests above check. The
    build runs as pip runs it for users, isolated, with setuptools from the registry.
    """
    base = tmp_path_factory.mktemp("install")
    checkout = base / "checkout"
    # Not the venvs (.ci/run keeps one per Python version in the checkout) nor other dev
    # folders; and on gevent's threadpool: a file copy never yields to the hub.
    gevent.get_hub().threadpool.apply(shutil.copytree, (ROOT, checkout), {
        "ignore": shutil.ignore_patterns(
            ".git", ".venv*", ".autobahn", "bench-results", "__pycache__", "*.egg-info",
            "build", ".mypy_cache", ".ruff_cache", ".pytest_cache")})
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "_parent_env.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
         str(checkout)],
        capture_output=True, text=True, timeout=180, cwd=str(base))
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return venv, checkout


def in_venv_env(venv, tmp_path, **variables):
    return {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path),
            "EXRATE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1",
            **{k: str(v) for k, v in variables.items()}}


def test_pip_install_gives_a_working_command_from_any_directory(installed, tmp_path):
    venv, _ = installed
    env = in_venv_env(venv, tmp_path)
    version = subprocess.run(["exrate-service", "--version"], cwd=str(tmp_path), env=env,
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"exrate-service {_version()}"
    converted = subprocess.run(["exrate-service", "convert", "253.67", "USD", "2021-05-18"],
                               cwd=str(tmp_path), env=env, capture_output=True, text=True,
                               timeout=60)
    assert converted.returncode == 0, converted.stderr
    assert "253.67 USD = 207.55196 EUR on 2021-05-18" in converted.stdout
    module = subprocess.run([str(venv / "bin" / "python"), "-m", "exrate_green", "--help"],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True,
                            timeout=60)
    assert module.returncode == 0 and "Exit codes:" in module.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import exrate_green; print(exrate_green.__file__)"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(venv)), where.stdout  # installed, not the checkout


def test_the_console_script_patches_ssl_and_socket_before_anything_imports_them(installed,
                                                                                tmp_path):
    venv, _ = installed
    # python -m imports the package first: it must not pull in ssl or socket itself
    bare = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sys, exrate_green; print(sorted({'ssl', 'socket'} & "
                           "set(sys.modules)))"], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert bare.stdout.strip() == "[]", bare.stdout + bare.stderr
    probe = ("import exrate_green.__main__, gevent.monkey, ssl, socket; "
             "print(gevent.monkey.is_module_patched('ssl'), "
             "gevent.monkey.is_module_patched('socket'))")
    result = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=str(tmp_path),
                            env=in_venv_env(venv, tmp_path), capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.split() == ["True", "True"], result.stderr


def test_the_procfile_runs_under_honcho_connects_and_stops_cleanly_on_sigterm(installed,
                                                                            tmp_path):
    venv, checkout = installed
    # exec: honcho runs the line with /bin/sh -c; dash would stay as the worker's parent,
    # die of the SIGTERM itself, and hide the worker's own exit code and shutdown.
    assert (checkout / "Procfile").read_text().strip() == "worker: exec bin/exrate-service"
    with Upstream() as up:
        env = in_venv_env(venv, tmp_path, EXRATE_URL=up.url)
        honcho = subprocess.Popen(
            [str(venv / "bin" / "python"), "-m", "honcho", "start", "--no-colour"],
            cwd=str(checkout), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert up.wait_for_connections(1, 30)
            assert wait_until(lambda: len(up.client_heartbeats()) >= 2, 10)
            honcho.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            assert wait_until(lambda: honcho.poll() is not None, 20)
            took_s = time.monotonic() - stopped_at
        finally:
            output = _stop(honcho)
        closes = up.client_closes()
    assert honcho.returncode == 128 + signal.SIGTERM, output  # honcho's own convention
    assert "connected to" in output
    assert "worker.1 stopped (rc=0)" in output  # the worker's exit code, thanks to exec
    assert any(code == 1000 for code, _ in closes), (closes, output)
    assert took_s < 15, took_s


def _stop(process):
    """Kill ``process`` and what it started, if still running; return its output."""
    if process.poll() is None:
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
    output, _ = process.communicate(timeout=10)
    return output.decode()


def _version():
    import exrate_green
    return exrate_green.__version__
