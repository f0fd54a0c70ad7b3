"""The bench's output: one line per measured level, tables, the side-by-side comparison.

Part of ``tools/bench.py``.
"""

_COLUMNS = (("level", "label", "{}"), ("req/s", "requests_per_s", "{:,.0f}"),
            ("replies/s", "replies_per_s", "{:,.0f}"), ("p50 ms", "p50_ms", "{:.2f}"),
            ("p99 ms", "p99_ms", "{:.2f}"), ("max ms", "max_ms", "{:.1f}"),
            ("hb gap s", "heartbeat_max_gap_s", "{:.3f}"), ("unanswered", "unanswered", "{}"),
            ("svc RSS MB", "service_peak_rss_mb", "{:.1f}"),
            ("svc CPU %", "service_cpu_percent", "{:.0f}"),
            ("sim CPU %", "simulator_cpu_percent", "{:.0f}"), ("kept up", "kept_up", "{}"))


def _cell(row, key, fmt):
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return fmt.format(value)


def format_row(row):
    return "  " + "  ".join(f"{name}={_cell(row, key, fmt)}" for name, key, fmt in _COLUMNS)


def format_table(rows, markdown=False):
    cells = [[_cell(row, key, fmt) for _, key, fmt in _COLUMNS] for row in rows]
    names = [name for name, _, _ in _COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(names) + " |", "|" + "|".join(["---"] * len(names)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(x) for x in column) for column in zip(names, *cells)]

    def line(values):
        return "  ".join(v.rjust(w) if i else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(names)] + [line(c) for c in cells])


def all_rows(scenarios):
    return (scenarios["generator_ceiling"]["levels"] + scenarios["warm"]["levels"]
            + [scenarios["cold"], scenarios["rate_api_failing"]])


def format_results(results, markdown=False):
    m, scenarios = results["machine"], results["scenarios"]
    warm, cold, failing = scenarios["warm"], scenarios["cold"], scenarios["rate_api_failing"]
    lines = [
        "",
        (f"{results['command']} on {m['cpus']} x {m['cpu_model']}, Python {m['python']}, "
        f"gevent {m['gevent']} ({results.get('duration_s', '?')} s; load average "
        f"{m['load_average_before']} before, {m.get('load_average_after')} after"
        f"{'; service on CPU 0, load generator on CPU 1' if m.get('pinned') else ''})"),
        "",
        format_table(all_rows(scenarios), markdown),
        "",
        (f"generator ceiling (simulator vs. echo client): "
        f"{scenarios['generator_ceiling']['sustained_replies_per_s']:,.0f} replies/s"),
        (f"warm: sustained {warm['sustained_replies_per_s']:,.0f} replies/s; service peak RSS "
        f"{warm['service_peak_rss_mb']} MB; exit code {warm['service_exit_code']}"),
        f"cold: {cold['rate_api_calls']} rate API calls for {cold['days']} days; "
        + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in cold["targets"].items()),
        f"rate API failing: {failing['rate_api_calls']} rate API calls; "
        + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in failing["targets"].items()),
        "verdict: " + ", ".join(f"{k}={'yes' if v else 'NO'}"
                                for k, v in results["verdict"].items()),
    ]
    return "\n".join(lines)




# -- the side-by-side comparison (--baseline) -------------------------------------------

#: (column, figure of one side, format); the figures are medians over the rounds
_SIDE_FIGURES = (("replies/s", "replies_per_s", "{:,.0f}"), ("p50 ms", "p50_ms", "{:.2f}"),
                 ("p99 ms", "p99_ms", "{:.2f}"), ("CPU %", "service_cpu_percent", "{:.0f}"),
                 ("CPU us/reply", "cpu_us_per_reply", "{:.0f}"), ("kept up", "kept_up", "{}"))


def side_summary(rows):
    """Medians over the rounds of one side at one level (kept up: in every round)."""
    def median(key):
        values = sorted(r[key] for r in rows if r.get(key) is not None)
        if not values:
            return None
        middle = len(values) // 2
        return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
    summary = {key: median(key) for _, key, _ in _SIDE_FIGURES if key != "kept_up"}
    summary["kept_up"] = all(r.get("kept_up") for r in rows) if rows else None
    summary["rounds"] = len(rows)
    return summary


def cpu_us_per_reply(row):
    """The service's CPU time per reply (µs): what a level costs when both sides keep up."""
    if not row.get("replies_per_s") or row.get("service_cpu_percent") is None:
        return None
    return round(row["service_cpu_percent"] / 100 * 1e6 / row["replies_per_s"], 1)


def format_comparison(results, markdown=False):
    """The baseline(s) and current side by side, one line per level."""
    sides = results.get("sides", ["baseline", "current"])
    short = {"baseline": "base", "current": "cur"}
    names = ["level"] + [f"{short.get(side, side)} {column}" for column, _, _ in _SIDE_FIGURES
                         for side in sides]
    cells = []
    for level in results["summary"]:
        line = [f"{level['rate']:g}"]
        for _, key, fmt in _SIDE_FIGURES:
            for side in sides:
                line.append(_cell(level[side], key, fmt))
        cells.append(line)
    m = results["machine"]
    head = (f"{results['command']}: baseline {results['baseline']} vs. this tree, medians of "
            f"{results['rounds']} alternating rounds of {results['level_s']:g} s per level, on "
            f"{m['cpus']} x {m['cpu_model']}, Python {m['python']} (load average "
            f"{m['load_average_before']} before, {m.get('load_average_after')} after)")
    if markdown:
        lines = ["| " + " | ".join(names) + " |", "|" + "|".join(["---"] * len(names)) + "|"]
        return "\n".join([head, ""] + lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(x) for x in column) for column in zip(names, *cells)]
    return "\n".join([head, ""] + ["  ".join(v.rjust(w) for v, w in zip(values, widths))
                                   for values in [names, *cells]])
