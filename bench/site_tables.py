"""The site bench's printed report: site_report.summarize's summary as short markdown tables."""

from __future__ import annotations

from typing import Any

from site_load import STRESS_P95_LIMIT_S


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:,.0f}"


def _latency(rows: list[dict[str, Any]]) -> None:
    print("| requests | count | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = " | ".join(f"{row[k]:,.0f}" for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))
        print(f"| {row['kind']} | {row['count']:,} | {cells} |")
    print()


def _errors(found: dict[str, Any], exceptions: dict[str, dict[str, int]]) -> None:
    print(
        f"errors: {found['errors_by_category'] or 'none'} (5xx, connection errors, any 4xx, wrong page, timeout)"
    )
    for example in found["error_examples"]:
        print(f"  {example}")
    for server, lines in exceptions.items():
        for line, count in lines.items():
            print(f"  the {server} server's log: {count} x {line}")


def _cpu(found: dict[str, Any], what: str) -> None:
    cpu = ", ".join(f"{k} {v:.0f} s" for k, v in found["cpu_s"].items())
    print(f"CPU time during {what}: {cpu}")


def _print_ready(ready: dict[str, Any]) -> None:
    print(
        f"(a) from the last pick's response to responses ready: {ready['participants']} participants one "
        f"after another ({ready['errors']} errors)"
    )
    print()
    print("| measured by | n | p50 (ms) | p95 (ms) | min (ms) | max (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, s in ready.items():
        if isinstance(s, dict):
            cells = " | ".join(_ms(s[k]) for k in ("p50", "p95", "min", "max"))
            print(f"| {label} | {s['n']} | {cells} |")
    print()


def _print_load(load: dict[str, Any], exceptions: dict[str, dict[str, int]]) -> None:
    if not load["participants"]:
        print("(b) load test: none (--participants 0)")
        return
    print(
        f"(b) load test: {load['participants']} participants at once, {load['completed']} completed in "
        f"{load['seconds']:.1f} s; {load['requests']:,} requests, {load['requests_per_s']:.1f} req/s, "
        f"{load['errors']} errors"
    )
    print()
    _latency(load["latency_ms"])
    _errors(load, exceptions)
    r = load["ready_on_database_clock_s"]
    print(
        f"ready under load (database clock): p50 {r['p50']:.1f} s, p95 {r['p95']:.1f} s, max {r['max']:.1f} s "
        f"(status polled every {load['status_poll_interval_s']:g} s, as the page does)"
    )
    _cpu(load, f"the load test ({load['seconds']:.0f} s wall)")


def _print_human(human: dict[str, Any], exceptions: dict[str, dict[str, int]]) -> None:
    print(
        f"human pacing: {human['participants']} participants arriving {human['arrivals']}, "
        f"{human['completed']} completed in {human['seconds']:.1f} s; {human['requests']:,} requests "
        f"({human['requests_per_s']:.1f} req/s), {human['errors']} errors"
    )
    print(f"think time: {human['think_time']}")
    print()
    _latency(human["latency_ms"])
    _errors(human, exceptions)
    for label, s in human["last_pick_to_ready_s"].items():
        print(f"last pick -> ready, {label}: p50 {s['p50']:.2f} s, p95 {s['p95']:.2f} s (n {s['n']})")
    _cpu(human, f"the run ({human['seconds']:.0f} s wall)")
    goal, found = human["goal"], human["goal"]["found"]
    print(
        f"goal: page p95 < {goal['page_p95_ms']:g} ms, p99 < {goal['page_p99_ms']:g} ms, 0 errors -> "
        f"p95 {found['page_p95_ms']:,.0f} ms, p99 {found['page_p99_ms']:,.0f} ms, {found['errors']} errors: "
        + ("MET" if goal["met"] else "NOT MET")
    )


def _print_stress(stress: dict[str, dict[str, Any]], exceptions: dict[str, dict[str, int]]) -> None:
    servers = list(stress)
    print(
        f"stress: participants at once, no think time, until the pages' p95 passes {_ms(STRESS_P95_LIMIT_S)} ms"
    )
    print()
    print(
        "| at once | "
        + " | ".join(f"{s} req/s | {s} page p50 / p95 / p99 (ms) | {s} slowest page (p95)" for s in servers)
        + " |"
    )
    print("|---:|" + "---:|---:|---|" * len(servers))
    depth = max(len(stress[s]["levels"]) for s in servers)
    for i in range(depth):
        cells, at = [], ""
        for s in servers:
            levels = stress[s]["levels"]
            if i >= len(levels):
                cells += ["", "", ""]
                continue
            row = levels[i]
            at = str(row["participants_at_once"])
            cells.append(f"{row['requests_per_s']:,.1f}")
            cells.append(" / ".join(f"{row[f'page_p{q}_ms']:,.0f}" for q in (50, 95, 99)))
            cells.append(f"{row['slowest_page']} ({row['slowest_page_p95_ms']:,.0f})")
        print(f"| {at} | " + " | ".join(cells) + " |")
    print()
    for s in servers:
        cap, found = stress[s]["capacity"], stress[s]
        bound = (
            ""
            if cap["p95_limit_passed"]
            else "at least (the levels ran out before the p95 passed the limit) "
        )
        print(
            f"capacity of {s}: {bound}{cap['requests_per_s']:,.1f} requests/s ({cap['pages_per_s']:,.1f} pages/s) "
            f"at {cap['participants_at_once']} at once; {found['participants_walked']} participants walked, "
            f"{found['completed']} completed, {found['errors']} errors"
        )
        _cpu(found, f"{s}'s levels")
        _errors(found, {s: exceptions.get(s, {})})


def _print_profile(profile: dict[str, Any]) -> None:
    print()
    print(
        f"the slowest page, {profile['page']!r}, profiled: {profile['requests']} requests, "
        f"{profile.get('ms_per_request', float('nan')):.1f} ms each ({profile.get('how', '')}; "
        f"errors {profile['errors'] or 'none'})"
    )
    if not profile["requests"]:
        return
    print(
        "where the time goes: "
        + ", ".join(f"{area} {share:.0%}" for area, share in profile["by_area"].items())
    )
    print()
    print("| frame (self time) | ms | share |")
    print("|---|---:|---:|")
    for row in profile["top_frames"]:
        print(f"| `{row['frame']}` | {row['self_ms']:,.1f} | {row['share']:.0%} |")
    print(f"the whole call tree: {profile['tree']}")


def print_report(summary: dict[str, Any]) -> None:
    exceptions = summary["server_log_exceptions"]
    print()
    if summary["mode"] == "burst":
        _print_ready(summary["ready_latency_s"])
        _print_load(summary["load"], exceptions)
    elif summary["mode"] == "human":
        _print_human(summary["human"], exceptions)
    else:
        _print_stress(summary["stress"], exceptions)
        if "profile" in summary:
            _print_profile(summary["profile"])
    tasks = summary["personalize_tasks_s"]
    first = ", ".join(f"{s:.1f} s" for s in tasks["first_per_worker_incl_model_load"])
    seq, measured = tasks["warm-up and sequential"], tasks["measured"]
    print(
        f"personalize tasks (worker logs): {tasks['finished']} finished, "
        f"{tasks['skipped_as_already_done']} skipped as already done, "
        f"{tasks['generated_in_batches']} participants generated in another's batch; each worker's first (loads the "
        f"model) {first}; then p50/p95 {seq['p50']:.2f}/{seq['p95']:.2f} s warm-up and sequential, "
        f"{measured['p50']:.2f}/{measured['p95']:.2f} s measured"
    )
    print()
    print("| database rows | expected | acknowledged by the site | found |")
    print("|---|---:|---:|---:|")
    for phase, check in summary["database"].items():
        for key, want in check["expected"].items():
            print(f"| {phase}: {key} | {want:,} | {check['acknowledged'][key]:,} | {check['found'][key]:,} |")
    print()
    print(f"load average at the end: {summary['machine']['load_average_at_end']:.2f}")
    print("PASS: no error, every judgment stored once" if summary["ok"] else "FAIL: see the errors above")
