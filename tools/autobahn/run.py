"""Run the Autobahn testsuite's client cases against exrate-green and print the tables.

usage: python tools/autobahn/run.py [--agents A,B] [--groups 1-10] [--json] ...

Starts the fuzzingserver installed by tools/autobahn/install.sh on 127.0.0.1 (a free port,
no web port), runs tools/autobahn_client.py once per agent (each case bounded in time),
has the reports written, stops the server, and prints per agent a table of the cases'
verdicts per group (from the report's index.json) and the cases that were not OK.

Agents: ``exrate-green`` (the project's Connection) and ``websocket-client`` (plain
websocket-client, for comparison). Group 9 (limits and performance: messages up to
16 MiB) runs with the client's message limit raised to --perf-message-bytes; the other
groups run with the service's own 1 MiB limit.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PY27 = ROOT / ".autobahn" / "py27" / "bin" / "python"
LAUNCHER = HERE / "fuzzingserver.py"
CLIENT = ROOT / "tools" / "autobahn_client.py"
AGENTS = ("exrate-green", "websocket-client")
GROUP_NAMES = {
    1: "Framing", 2: "Pings/Pongs", 3: "Reserved bits", 4: "Opcodes", 5: "Fragmentation",
    6: "UTF-8 handling", 7: "Close handling", 9: "Limits/performance", 10: "Miscellaneous",
    12: "Compression (payloads)", 13: "Compression (parameters)",
}
PERF_GROUP = 9
VERDICTS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
SERVER_START_S = 60.0
SERVER_STOP_S = 10.0


# -- the fuzzingserver ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(outdir: Path, port: int, groups: list[int]) -> Path:
    """The fuzzingserver's spec: 127.0.0.1 only, the chosen groups, reports in outdir."""
    spec = {
        "url": f"ws://127.0.0.1:{port}",
        "outdir": str(outdir),
        "cases": [f"{g}.*" for g in groups],
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    path = outdir / "fuzzingserver-spec.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def start_server(spec: Path, port: int, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        server = subprocess.Popen([str(PY27), str(LAUNCHER), str(spec)], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=spec.parent)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the fuzzingserver exited at start; see {log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.2)
    stop_server(server)
    raise SystemExit(f"the fuzzingserver did not listen within {SERVER_START_S:g} s; "
                     f"see {log_path}")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)  # twisted's reactor stops cleanly on it
        try:
            server.wait(SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(SERVER_STOP_S)


# -- the clients ------------------------------------------------------------------------------

def run_agent(agent: str, port: int, groups: list[int], args: argparse.Namespace) -> None:
    """Run the agent's cases: the ordinary groups, then group 9 with the limit raised."""
    ordinary = [g for g in groups if g != PERF_GROUP]
    if ordinary:
        run_client(agent, port, ordinary, args.case_timeout_s, None)
    if PERF_GROUP in groups:
        run_client(agent, port, [PERF_GROUP], args.perf_case_timeout_s, args.perf_message_bytes)


def run_client(agent: str, port: int, groups: list[int], case_timeout_s: float,
               max_message_bytes: int | None) -> None:
    command = [sys.executable, str(CLIENT), "--url", f"ws://127.0.0.1:{port}",
               "--agent", agent, "--library", agent,
               "--cases", ",".join(str(g) for g in groups),
               "--case-timeout-s", str(case_timeout_s)]
    if max_message_bytes:
        command += ["--max-message-bytes", str(max_message_bytes)]
    # generous whole-run bound: every case at its own bound, plus the case-info round trips
    bound_s = 600 + 600 * case_timeout_s
    print(f"== {agent}: groups {', '.join(map(str, groups))}", file=sys.stderr, flush=True)
    result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, timeout=bound_s,
                            cwd=ROOT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{agent}: autobahn_client.py exited with {result.returncode}")


# -- the report -----------------------------------------------------------------------------

def group_of(case_id: str) -> int:
    return int(case_id.split(".")[0])


def case_sort_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def summarize(outdir: Path, agents: list[str]) -> dict[str, Any]:
    """Per agent: verdict counts and time per group, and every case that was not OK."""
    index = json.loads((outdir / "index.json").read_text())
    summary: dict[str, Any] = {}
    for agent in agents:
        cases = index.get(agent, {})
        groups: dict[int, dict[str, int]] = {}
        not_ok = []
        for case_id in sorted(cases, key=case_sort_key):
            entry = cases[case_id]
            row = groups.setdefault(group_of(case_id), dict.fromkeys(VERDICTS, 0) | {"ms": 0})
            row[entry["behavior"]] = row.get(entry["behavior"], 0) + 1
            row["ms"] += entry.get("duration") or 0
            if entry["behavior"] != "OK" or entry["behaviorClose"] != "OK":
                not_ok.append(case_detail(outdir, case_id, entry))
        summary[agent] = {"groups": {str(g): groups[g] for g in sorted(groups)},
                          "not_ok": not_ok}
    return summary


def case_detail(outdir: Path, case_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    report = json.loads((outdir / entry["reportfile"]).read_text())
    return {
        "case": case_id,
        "behavior": entry["behavior"],
        "behaviorClose": entry["behaviorClose"],
        "description": plain(report.get("description", "")),
        "result": plain(report.get("result", "")),
        "resultClose": plain(report.get("resultClose", "")),
    }


def plain(text: str) -> str:
    """One line of text from a case's HTML-flavoured description."""
    words = " ".join(re.sub(r"<[^>]+>", " ", str(text)).split())
    return re.sub(r" ([.,])", r"\1", words)


def table(groups: dict[str, dict[str, int]]) -> list[str]:
    lines = ["| group | cases | " + " | ".join(VERDICTS) + " | time (s) |",
             "|---|--:|" + "--:|" * len(VERDICTS) + "--:|"]
    totals = {"all": dict.fromkeys(VERDICTS, 0) | {"ms": 0},
              "no9": dict.fromkeys(VERDICTS, 0) | {"ms": 0}}
    for g, row in groups.items():
        lines.append(table_row(f"{g} {GROUP_NAMES.get(int(g), '')}", row))
        for key in ("all", "no9") if int(g) != PERF_GROUP else ("all",):
            for field in (*VERDICTS, "ms"):
                totals[key][field] += row.get(field, 0)
    if str(PERF_GROUP) in groups and len(groups) > 1:
        lines.append(table_row("all but 9", totals["no9"]))
    lines.append(table_row("**total**", totals["all"]))
    return lines


def table_row(label: str, row: dict[str, int]) -> str:
    count = sum(row.get(v, 0) for v in VERDICTS)
    return (f"| {label} | {count} | " + " | ".join(str(row.get(v, 0)) for v in VERDICTS)
            + f" | {row.get('ms', 0) / 1000:.1f} |")


def print_text(summary: dict[str, Any], header: str) -> None:
    print(header)
    for agent, result in summary.items():
        print(f"\n### {agent}\n")
        print("\n".join(table(result["groups"])))
        if result["not_ok"]:
            print(f"\nnot OK ({len(result['not_ok'])}):\n")
            print("| case | behavior | close | description | result |")
            print("|---|---|---|---|---|")
            for c in result["not_ok"]:
                print(f"| {c['case']} | {c['behavior']} | {c['behaviorClose']} | "
                      f"{c['description']} | {c['result']} {c['resultClose']} |")


def provenance() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10,
                                check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit or "unknown",
            "machine": f"{os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
                       f"Python {platform.python_version()}"}


# -- entry point ----------------------------------------------------------------------------

def parse_groups(text: str) -> list[int]:
    """'1-10' or '1-7,10' -> the Autobahn groups among them (there is no group 8)."""
    wanted: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        wanted.update(range(int(low), int(high or low) + 1))
    groups = sorted(g for g in wanted if g in GROUP_NAMES)
    if not groups:
        raise argparse.ArgumentTypeError(f"no Autobahn group in {text!r}")
    return groups


def parse_agents(text: str) -> list[str]:
    agents = [a.strip() for a in text.split(",") if a.strip()]
    unknown = set(agents) - set(AGENTS)
    if unknown or not agents:
        raise argparse.ArgumentTypeError(f"agents are among {', '.join(AGENTS)}")
    return agents


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=parse_agents, default=list(AGENTS),
                        help="comma-separated, among: " + ", ".join(AGENTS))
    parser.add_argument("--groups", type=parse_groups, default=parse_groups("1-10"),
                        help="case groups, e.g. 1-10 (default) or 1-7,10")
    parser.add_argument("--outdir", type=Path, default=ROOT / ".autobahn" / "reports",
                        help="where the fuzzingserver writes its reports")
    parser.add_argument("--case-timeout-s", type=float, default=30.0)
    parser.add_argument("--perf-case-timeout-s", type=float, default=180.0)
    parser.add_argument("--perf-message-bytes", type=int, default=32 << 20,
                        help="the client's message limit for group 9 (16 MiB messages)")
    parser.add_argument("--json", action="store_true", help="print JSON, not tables")
    parser.add_argument("--tables-only", action="store_true",
                        help="print the tables of the reports already in --outdir; run nothing")
    return parser.parse_args(argv)


def clear_reports(outdir: Path) -> None:
    """Reports of an earlier run would mix into this one's index.json."""
    if outdir.exists():
        ours = (outdir / "index.json").exists() or (outdir / "fuzzingserver-spec.json").exists()
        if not ours and any(outdir.iterdir()):
            raise SystemExit(f"{outdir} holds something other than Autobahn reports")
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    outdir = args.outdir.resolve()
    facts = provenance() | {"groups": args.groups}
    if not args.tables_only:
        if not PY27.exists():
            print(f"no fuzzingserver at {PY27}: run tools/autobahn/install.sh first",
                  file=sys.stderr)
            return 2
        started = time.monotonic()
        run_suite(outdir, args)
        facts["wall_s"] = round(time.monotonic() - started)
        (outdir / "run.json").write_text(json.dumps(facts, indent=2))
    else:
        facts = json.loads((outdir / "run.json").read_text())
    summary = summarize(outdir, args.agents)
    if args.json:
        print(json.dumps({"run": facts, "agents": summary}, indent=2))
    else:
        print_text(summary, f"Autobahn testsuite, groups {', '.join(map(str, facts['groups']))}: "
                            f"exrate-green {facts['commit']}, {facts['date']}, "
                            f"{facts['machine']}, {facts['wall_s']} s")
    return 0


def run_suite(outdir: Path, args: argparse.Namespace) -> None:
    """Fresh reports in outdir: server up, every agent's cases, server down."""
    clear_reports(outdir)
    port = free_port()
    server = start_server(write_spec(outdir, port, args.groups), port,
                          outdir / "fuzzingserver.log")
    try:
        for agent in args.agents:
            run_agent(agent, port, args.groups, args)
    finally:
        stop_server(server)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
