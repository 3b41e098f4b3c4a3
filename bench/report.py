"""Medians over rounds, the tables, the chart, and the headline."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Iterable

P99_LIMIT_MS = 50.0
CHECKINS_PER_MINUTE = 1


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict]) -> dict:
    """Median of each number over the rounds of one path and workload."""
    return {
        "rounds": len(runs),
        "rps": _median([r["rps"] for r in runs]),
        "p50_ms": _median([r["p50_us"] / 1000 for r in runs]),
        "p99_ms": _median([r["p99_us"] / 1000 for r in runs]),
        "cpu_us_per_request": _median([r["cpu_us_per_request"] for r in runs]),
        "origin_cpu_us_per_request": _median([r["origin_cpu_us_per_request"] for r in runs]),
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "status_errors": sum(r["status_errors"] for r in runs),
        "rps_each_round": [round(r["rps"], 1) for r in runs],
    }


def add_ratios(results: dict) -> None:
    """Each path's requests/s as a fraction of the direct and the HAProxy-alone paths."""
    for key, path in results["paths"].items():
        for name, summary in path["workloads"].items():
            for ref in ("direct", "haproxy"):
                ref_summary = results["paths"].get(ref, {}).get("workloads", {}).get(name)
                ratio = None
                if ref_summary and ref_summary["rps"] and summary["rps"] is not None:
                    ratio = summary["rps"] / ref_summary["rps"]
                summary[f"ratio_to_{ref}"] = ratio


def best_sustainable(points: Iterable[dict], errors_key: str) -> dict | None:
    """The point with the highest rate among those with p99 under P99_LIMIT_MS and no error
    (``errors_key``): the rate one node sustains."""
    sustainable = [p for p in points if p["rps"] and p["p99_ms"] is not None
                   and p["p99_ms"] < P99_LIMIT_MS and p[errors_key] == 0]
    return max(sustainable, key=lambda p: p["rps"], default=None)


def agents_at(rps: float) -> int:
    """Agents a rate serves at CHECKINS_PER_MINUTE check-ins a minute each."""
    return int(rps * 60 / CHECKINS_PER_MINUTE)


def headline(results: dict, path_key: str = "node") -> dict | None:
    """Agents one node carries: 60 x its highest small-request rate with p99 under 50 ms."""
    path = results["paths"].get(path_key)
    if not path:
        return None
    small = {name: summary for name, summary in path["workloads"].items() if name.startswith("get-200B-")}
    measured = sorted(small, key=lambda n: int(n.rsplit("-c", 1)[1]))
    best = best_sustainable(({**summary, "name": name} for name, summary in small.items()), "status_errors")
    if best is None:
        return {"path": path_key, "measured": measured, "sustainable_rps": None, "agents": None}
    return {"path": path_key, "measured": measured, "workload": best["name"], "sustainable_rps": best["rps"],
            "p99_ms": best["p99_ms"], "agents": agents_at(best["rps"])}


def headline_text(head: dict | None) -> str:
    if head is None:
        return "headline: the node was not measured"
    if head["agents"] is None:
        return (f"headline: no measured rate of {head['path']} ({', '.join(head['measured'])}) had p99 under "
                f"{P99_LIMIT_MS:g} ms; no sustainable rate to report")
    return (f"headline: one node carries ~{head['agents']:,} agents at one check-in per minute with p99 under "
            f"{P99_LIMIT_MS:g} ms (60 x {head['sustainable_rps']:,.0f} req/s, {head['workload']}, p99 "
            f"{head['p99_ms']:.1f} ms; measured {', '.join(head['measured'])}; 200-byte GETs)")


def _fmt(value, spec: str = ",.0f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"# Relay benchmark, {m['date']}",
        "",
        f"{m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, load average "
        f"{m['loadavg_start']} at start, {m.get('loadavg_end', '?')} at end.",
    ]
    if results["paths"]:
        lines += _paths_markdown(results)
    if results.get("scale"):
        lines += scale_markdown(results["scale"])
    return "\n".join(lines)


def _paths_markdown(results: dict) -> list[str]:
    lines = [
        "",
        f"{results['settings']['rounds']} rounds of {results['settings']['seconds']:g} s per path and "
        f"workload, paths in alternation; medians of the rounds. Absolute numbers move with "
        f"whatever else runs on the machine; the ratios are measured side by side.",
        "",
        "## Small requests (200-byte GET)",
        "",
        "| path | req/s c32 | p50 c1 ms | p99 c1 ms | p50 c32 ms | p99 c32 ms | CPU µs/req c32 | origin µs/req | peak RSS/worker MiB | × direct | × HAProxy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, path in results["paths"].items():
        w = path["workloads"]
        c32, c1 = w.get("get-200B-c32", {}), w.get("get-200B-c1", {})
        lines.append(
            f"| {path['title']} | {_fmt(c32.get('rps'))} | {_fmt(c1.get('p50_ms'), '.2f')} | "
            f"{_fmt(c1.get('p99_ms'), '.2f')} | {_fmt(c32.get('p50_ms'), '.2f')} | {_fmt(c32.get('p99_ms'), '.2f')} | "
            f"{_fmt(c32.get('cpu_us_per_request'))} | {_fmt(c32.get('origin_cpu_us_per_request'))} | "
            f"{_fmt(path.get('peak_rss_mib'), '.1f')} | {_fmt(c32.get('ratio_to_direct'), '.3f')} | "
            f"{_fmt(c32.get('ratio_to_haproxy'), '.3f')} |"
        )
    lines += [
        "",
        "CPU µs/req: utime+stime of the path's own server processes (HAProxy, workers; for the "
        "direct path the origin) over the run, divided by the requests served. The origin's "
        "share is its own column. Peak RSS: VmHWM of the agent-proxy workers (the largest), "
        "else of the path's server processes.",
        "",
        "## Every workload",
        "",
        "| path | workload | req/s | p50 ms | p99 ms | CPU µs/req | × direct | × HAProxy | errors | req/s each round |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for key, path in results["paths"].items():
        for name, s in path["workloads"].items():
            lines.append(
                f"| {key} | {name} | {_fmt(s['rps'])} | {_fmt(s['p50_ms'], '.2f')} | {_fmt(s['p99_ms'], '.2f')} | "
                f"{_fmt(s['cpu_us_per_request'])} | {_fmt(s['ratio_to_direct'], '.3f')} | "
                f"{_fmt(s['ratio_to_haproxy'], '.3f')} | {s['errors']} | {', '.join(f'{v:,.0f}' for v in s['rps_each_round'])} |"
            )
    if results.get("big_bodies"):
        lines += ["", "## Large bodies through one worker", "",
                  "| transfer | status | MiB | seconds | MiB/s | worker RSS before MiB | peak MiB | growth MiB |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for b in results["big_bodies"]:
            lines.append(
                f"| {b['name']} | {b['status']} | {b['bytes'] / 2**20:.0f} | {b['seconds']:.2f} | "
                f"{b['bytes'] / 2**20 / b['seconds']:.0f} | {b['rss_before_mib']:.1f} | {b['peak_rss_mib']:.1f} | "
                f"{b['rss_growth_mib']:.1f} |"
            )
    if results.get("tiny_chunks"):
        first = results["tiny_chunks"][0]
        lines += ["", f"## An origin sending one-byte chunks ({first['chunks_in']:,} in each answer, {first['downloads']} answers)", "",
                  "| relay | ms an answer | CPU ms an answer | chunks out | × HAProxy CPU |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for row in results["tiny_chunks"]:
            lines.append(f"| {row['relay']} | {row['seconds'] * 1e3:.1f} | {row['cpu_seconds'] * 1e3:.2f} | {row['chunks_out']:,} | "
                         f"{_fmt(row['ratio_to_haproxy'], '.1f')} |")
    heads = results.get("headlines") or {"node": None}
    lines += ["", "## Headline", "", *(f"- {key}: {headline_text(head)}" for key, head in heads.items()), ""]
    return lines


def sizing(scale: dict) -> dict:
    """What an operator sizes a site with, from the scale measurements of one node."""
    best = best_sustainable(scale.get("connections_curve", []), "errors")
    per_idle = (scale.get("idle_connections") or {}).get("rss_kib_per_connection")
    south = scale.get("southbound_agents") or {}
    return {
        "agents_per_node": agents_at(best["rps"]) if best else None,
        "agents_per_node_from": f"{best['rps']:,.0f} req/s at {best['connections']} connections, p99 "
                                f"{best['p99_ms']:.1f} ms" if best else None,
        "idle_agents_per_gib": int(2**20 / per_idle) if per_idle and per_idle > 0 else None,
        "southbound_calls_per_s": south.get("requests_per_s") if not south.get("errors") else None,
    }


def sizing_text(scale: dict) -> str:
    s = scale["sizing"]
    return (f"sizing: {_fmt(s['agents_per_node'])} agents per node at one check-in a minute "
            f"({s['agents_per_node_from'] or f'no point with p99 under {P99_LIMIT_MS:g} ms'}); "
            f"{_fmt(s['idle_agents_per_gib'])} idle agents per GiB; "
            f"{_fmt(s['southbound_calls_per_s'])} southbound calls/s to distinct agents")


def scale_errors(scale: dict, name: str) -> int:
    part = scale.get(name)
    if isinstance(part, list):
        return sum(p["errors"] for p in part)
    return part["errors"] if part else 0


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table of right-aligned (numeric) columns."""
    return ["| " + " | ".join(columns) + " |", "|" + " ---: |" * len(columns),
            *("| " + " | ".join(row) + " |" for row in rows)]


def scale_markdown(scale: dict) -> list[str]:
    size, met = scale["size"], scale.get("met", {})

    def verdict(name: str) -> str:
        met_or_not = {True: "met", False: "**NOT MET**"}.get(met.get(name), "not judged at this size")
        return f"Target: {scale['targets'][name]}: {met_or_not}."

    def errors(part: dict) -> str:
        kinds = {**part.get("error_kinds", {}), **{k: v for k, v in part.get("front", {}).items() if v}}
        return f"{part['errors']}{' (' + ', '.join(f'{k} {v}' for k, v in kinds.items()) + ')' if kinds else ''}"

    curve = scale.get("connections_curve", [])
    lines = ["", "## Scale (`--scale`)", "",
             f"The knee: 200-byte GETs through the full node, {size['seconds']:g} s per point "
             f"(bench/README.md says how each part is run). {verdict('connections_curve')}", "",
             *_table(["connections", "req/s", "p50 ms", "p99 ms", "errors", "× best"],
                     [[f"{p['connections']:,}", _fmt(p["rps"]), f"{p['p50_ms']:.2f}", f"{p['p99_ms']:.2f}",
                       errors(p), _fmt(p["share_of_best"], ".2f")] for p in curve])]
    idle = scale.get("idle_connections")
    if idle:
        held_while = f"{idle['load']['connections']} connections load it for {size['seconds']:g} s"
        lines += ["", f"Idle agents: {idle['asked']:,} TLS connections to the front, each idle after one GET "
                  f"/_proxy/health, held while {held_while}. {verdict('idle_connections')}", ""]
        lines += _table(["held", "errors", "opened in s", "load req/s", "load p99 ms", "p99 without idle ms",
                         "RSS front+workers KiB without / with", "KiB per idle connection"],
                        [[f"{idle['held']:,}", str(idle["errors"]), str(idle["open_seconds"]),
                          _fmt(idle["load"]["rps"]), f"{idle['p99_ms']:.2f}", f"{idle['load_without_idle']['p99_ms']:.2f}",
                          f"{idle['rss_kib_without_idle']:,} / {idle['rss_kib_with_idle']:,}",
                          _fmt(idle["rss_kib_per_connection"], ".1f")]])
    south = scale.get("southbound_agents")
    if south:
        lines += ["", f"Distinct agents southbound: one signed GET to each of {south['agents']:,} addresses "
                  f"(TLS) after {south['warm_agents']} warm-up calls. {verdict('southbound_agents')}", ""]
        columns = ["agents", "errors", "seconds", "calls/s", "CPU µs/call (front+workers)",
                   "worker RSS MiB before / after", "growth MiB", "worker fds before / after",
                   "of them to agents", "of them from the front", "fds growth (others)"]
        lines += _table(columns, [[
            f"{south['agents']:,}", str(south["errors"]), str(south["seconds"]), _fmt(south["requests_per_s"]),
            _fmt(south["cpu_us_per_request"]), f"{south['rss_before_mib']:.1f} / {south['rss_after_mib']:.1f}",
            f"{south['rss_growth_mib']:.1f}", f"{south['fds_before']} / {south['fds_after']}",
            f"{south['agent_connections_before']} / {south['agent_connections_after']}",
            f"{south['front_connections_before']} / {south['front_connections_after']}", f"{south['fds_growth']:+d}"]])
        if south["failures"]:
            lines += ["", "First failures: " + "; ".join(south["failures"])]
    lines += ["", sizing_text(scale), ""]
    return lines


def chart(results: dict, path: Path) -> None:
    """Throughput and p99 per path, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["paths"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    groups = [("get-200B-c32", "GET 200 B"), ("get-64KiB-c32", "GET 64 KiB"), ("post-1KiB-c32", "POST 1 KiB")]
    groups = [g for g in groups if any(g[0] in results["paths"][k]["workloads"] for k in keys)]
    width = 0.8 / max(1, len(groups))
    for i, (name, label) in enumerate(groups):
        values = [results["paths"][k]["workloads"].get(name, {}).get("rps") or 0 for k in keys]
        left.bar([x + i * width for x in range(len(keys))], values, width, label=label)
    left.set_yscale("log")
    left.set_ylabel("requests/s at 32 connections (log)")
    left.set_title("Throughput")
    left.set_xticks([x + width * (len(groups) - 1) / 2 for x in range(len(keys))], keys)
    left.legend()
    conc = [c for c in ("get-200B-c1", "get-200B-c4", "get-200B-c8", "get-200B-c32")
            if any(c in results["paths"][k]["workloads"] for k in keys)]
    width = 0.8 / max(1, len(conc))
    for i, name in enumerate(conc):
        values = [results["paths"][k]["workloads"].get(name, {}).get("p99_ms") or 0 for k in keys]
        right.bar([x + i * width for x in range(len(keys))], values, width, label=name.split("-")[-1].replace("c", "", 1) + " conn")
    right.axhline(P99_LIMIT_MS, color="grey", linestyle="--", linewidth=1, label=f"{P99_LIMIT_MS:g} ms")
    right.set_ylabel("p99 latency, ms (200-byte GET)")
    right.set_title("p99 latency")
    right.set_xticks([x + width * (len(conc) - 1) / 2 for x in range(len(keys))], keys)
    right.legend()
    m = results["machine"]
    fig.suptitle(f"agent-proxy relay paths, {m['date']}, {m['nproc']} CPUs, medians of {results['settings']['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scale_chart(results: dict, path: Path) -> None:
    """The knee: requests/s and p99 against connections (log scale), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = results["scale"]["connections_curve"]
    x = [p["connections"] for p in curve]
    fig, left = plt.subplots(figsize=(8, 5))
    left.plot(x, [p["rps"] for p in curve], "o-", color="tab:blue", label="requests/s")
    left.set_xscale("log", base=2)
    left.set_xticks(x, [f"{c:,}" for c in x])
    left.set_xlabel("connections (200-byte GETs through the full node)")
    left.set_ylabel("requests/s", color="tab:blue")
    left.set_ylim(bottom=0)
    right = left.twinx()
    right.plot(x, [p["p99_ms"] for p in curve], "s--", color="tab:red", label="p99 ms")
    right.axhline(P99_LIMIT_MS, color="grey", linestyle=":", linewidth=1)
    right.set_yscale("log")
    right.set_ylabel("p99 latency, ms (log)", color="tab:red")
    m = results["machine"]
    fig.suptitle(f"agent-proxy node: the knee, {m['date']}, {m['nproc']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(results: dict, directory: Path, stem: str, with_chart: bool) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / f"{stem}.json", directory / f"{stem}.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    written[1].write_text(markdown(results))
    if with_chart and results["paths"]:
        written.append(directory / f"{stem}.png")
        chart(results, written[-1])
    if with_chart and results.get("scale", {}).get("connections_curve"):
        written.append(directory / f"{stem}-scale.png")
        scale_chart(results, written[-1])
    return written
