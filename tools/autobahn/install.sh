#!/usr/bin/env bash
# Install the Autobahn testsuite's fuzzingserver (Python 2.7 only) under .autobahn/.
#
# autobahntestsuite runs on Python 2.7 alone. pyenv's 2.7.18 provides the interpreter;
# virtualenv 20.15.1 (the last release that still creates 2.7 environments, and which needs
# distutils, so it lives in a Python 3.11 venv of its own) makes the 2.7 environment, so
# nothing is installed into pyenv's own 2.7. Versions come from requirements-py27.txt.
#
# Idempotent: a finished install is left alone (delete .autobahn/ to start again).
# Overrides: PY27=/path/to/python2.7  PY311=/path/to/python3.11
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dest="$root/.autobahn"
py27="${PY27:-$HOME/.pyenv/versions/2.7.18/bin/python2.7}"
py311="${PY311:-$HOME/.pyenv/versions/3.11.7/bin/python3.11}"
if [ ! -x "$py311" ]; then py311="$(command -v python3.11 || true)"; fi
wstest="$dest/py27/bin/wstest"
stamp="$dest/py27/.installed"

if [ -x "$wstest" ] && [ -f "$stamp" ] && cmp -s "$stamp" "$here/requirements-py27.txt"; then
    echo "autobahn testsuite already installed: $wstest"
    exit 0
fi
for py in "$py27" "$py311"; do
    if [ ! -x "$py" ]; then
        echo "missing interpreter: $py (pyenv install 2.7.18 / 3.11, or set PY27 / PY311)" >&2
        exit 1
    fi
done

mkdir -p "$dest"
if [ ! -x "$dest/venv-maker/bin/virtualenv" ]; then
    "$py311" -m venv "$dest/venv-maker"
    "$dest/venv-maker/bin/python" -m pip install --quiet "virtualenv==20.15.1"
fi
rm -rf "$dest/py27"
"$dest/venv-maker/bin/virtualenv" --quiet --python "$py27" "$dest/py27"
"$dest/py27/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$here/requirements-py27.txt"
"$dest/py27/bin/python" -c "import autobahntestsuite" 
cp "$here/requirements-py27.txt" "$stamp"
echo "autobahn testsuite installed: $wstest"
