from gevent import monkey; monkey.patch_all()  # noqa: E702  first: before ssl, socket, requests

# ``exrate-service`` (the console script) and ``python -m exrate_green``. The standard library
# is patched for gevent as this module's first statement, before anything imports ssl or
# socket: that is why the console script points here and not at ``exrate_green.cli:main``.

import sys  # noqa: E402

from exrate_green.cli import main as _cli_main  # noqa: E402


def main() -> int:
    """Run the command line with ``sys.argv``; returns the exit code for the console script."""
    return _cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
