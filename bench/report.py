"""Figures from raw load-generator output, the PASS/FAIL targets, and the result files
(latest.md, latest.json, latency.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path

# The targets of the issue (2 cores, gunicorn, loopback).
P50_100_MS = 5.0
P99_100_MS = 20.0
P50_10K_MS = 250.0
LINEARITY_MAX = 1.5
ECHO_RATIO_MIN = 0.5
FALLBACK_RATIO_MAX = 1.5
START_MAX_S = 1.0
WORKER_RSS_MAX_MB = 150.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no data."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarise(raw: dict) -> dict:
    """Pool the runs of one configuration per mode (closed, paced) into p50/p95/p99 and rates."""
    summary: dict = {"body_bytes": raw.get("body_bytes"), "first_response": raw.get("first_response"),
                     "worker_cpu_ms_per_request": raw.get("worker_cpu_ms_per_request")}
    for mode in ("single", "closed", "paced"):
        runs = [r for r in raw.get("runs", []) if r["mode"] == mode]
        if not runs:
            continue
        latencies = [x for r in runs for x in r["latencies_ms"]]
        elapsed = sum(r["elapsed_s"] for r in runs)
        entry = {
            "n": len(latencies),
            "errors": sum(r["errors"] for r in runs),
            "statuses": _merge_counts(r["statuses"] for r in runs),
            "p50_ms": percentile(latencies, 50),
            "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99),
            "mean_ms": sum(latencies) / len(latencies) if latencies else math.nan,
            "throughput_rps": len(latencies) / elapsed if elapsed else 0.0,
            "runs_p50_ms": [percentile(r["latencies_ms"], 50) for r in runs],
            "runs_rps": [r["throughput_rps"] for r in runs],
        }
        if mode == "paced":
            entry["offered_rps"] = runs[0]["offered_rps"]
        summary[mode] = entry
    return summary


def _merge_counts(dicts) -> dict:
    merged: dict[str, int] = {}
    for counts in dicts:
        for key, value in counts.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _check(name: str, figure: float | None, limit: float, unit: str, *, at_most: bool = True,
           note: str = "") -> dict:
    if figure is None or math.isnan(figure):
        verdict = "SKIP"
    elif at_most:
        verdict = "PASS" if figure <= limit else "FAIL"
    else:
        verdict = "PASS" if figure >= limit else "FAIL"
    sign = "<=" if at_most else ">="
    return {"target": name, "figure": figure, "limit": limit, "unit": unit,
            "rule": f"{sign} {limit:g} {unit}".strip(), "verdict": verdict, "note": note}


def marginal_ms_per_resource(by_size: dict, size: int, base_size: int, figure: str = "cpu") -> float | None:
    """(cost(size) - cost(base)) / (size - base): what each extra resource adds. `figure` "cpu" is
    the workers' CPU time per request (robust to queueing and to a busy machine), "p50" the paced p50."""
    try:
        if figure == "cpu":
            high = by_size[size]["worker_cpu_ms_per_request"]
            low = by_size[base_size]["worker_cpu_ms_per_request"]
        else:
            high = by_size[size]["paced"]["p50_ms"]
            low = by_size[base_size]["paced"]["p50_ms"]
    except KeyError:
        return None
    if high is None or low is None:
        return None
    return (high - low) / (size - base_size)


def evaluate_targets(results: dict) -> list[dict]:
    checks: list[dict] = []
    service = results.get("service", {})
    sizes = results["settings"]["sizes"]
    clients = results["settings"]["clients"]
    for hook, by_size in service.items():
        if 100 in by_size:
            paced = by_size[100].get("paced", {})
            checks.append(_check(f"{hook} 100 res: p50 at {clients} clients", paced.get("p50_ms"), P50_100_MS, "ms",
                                 note=_errors_note(by_size[100])))
            checks.append(_check(f"{hook} 100 res: p99 at {clients} clients", paced.get("p99_ms"), P99_100_MS, "ms"))
        if 10000 in by_size:
            paced = by_size[10000].get("paced", {})
            checks.append(_check(f"{hook} 10,000 res: p50", paced.get("p50_ms"), P50_10K_MS, "ms",
                                 note=_errors_note(by_size[10000])))
        base = min(sizes)
        if 1000 in by_size and 10000 in by_size and base < 1000:
            per_1k = marginal_ms_per_resource(by_size, 1000, base)
            per_10k = marginal_ms_per_resource(by_size, 10000, base)
            ratio = per_10k / per_1k if per_1k and per_10k is not None and per_1k > 0 else None
            p50_1k = marginal_ms_per_resource(by_size, 1000, base, "p50")
            p50_10k = marginal_ms_per_resource(by_size, 10000, base, "p50")
            p50_ratio = p50_10k / p50_1k if p50_1k and p50_10k is not None and p50_1k > 0 else None
            echo = results.get("echo", {})
            echo_1k = marginal_ms_per_resource(echo, 1000, base) if base in echo else None
            echo_10k = marginal_ms_per_resource(echo, 10000, base) if base in echo else None
            echo_ratio = echo_10k / echo_1k if echo_1k and echo_10k is not None and echo_1k > 0 else None
            checks.append(_check(
                f"{hook} linear growth: CPU ms/resource 10k vs 1k", ratio, LINEARITY_MAX, "x",
                note=f"worker CPU per extra resource {_fmt(per_1k, 4)} ms at 1k, {_fmt(per_10k, 4)} ms at 10k; "
                     f"by paced p50: {_fmt(p50_ratio, 2)}x; the echo endpoint's own CPU ratio: {_fmt(echo_ratio, 2)}x"))
        echo = results.get("echo", {}).get(100, {}).get("closed", {})
        if 100 in by_size and echo:
            mine = by_size[100].get("closed", {}).get("throughput_rps")
            ratio = mine / echo["throughput_rps"] if mine and echo.get("throughput_rps") else None
            parse = results.get("echo_parse", {}).get(100, {}).get("closed", {})
            strict = (mine / parse["throughput_rps"]) if mine and parse.get("throughput_rps") else None
            checks.append(_check(
                f"{hook} 100 res: throughput vs echo", ratio, ECHO_RATIO_MIN, "x", at_most=False,
                note=f"{_fmt(mine, 0)} vs {_fmt(echo.get('throughput_rps'), 0)} req/s"
                     + (f"; vs parse-only endpoint {_fmt(strict, 2)}x" if strict else "")))
    for size, fallback in sorted(results.get("fallback", {}).items()):
        if "error" in fallback:
            checks.append(_check(f"FHIR fallback {size} res", None, FALLBACK_RATIO_MAX, "x",
                                 note=fallback["error"][:200]))
            continue
        total = fallback["hook"].get("closed", {}).get("p50_ms")
        slowest = fallback["slowest_single_ms"]
        ratio = total / slowest if total and slowest else None
        checks.append(_check(
            f"FHIR fallback {size} res: total / slowest single query", ratio, FALLBACK_RATIO_MAX, "x",
            note=f"total p50 {_fmt(total)} ms; slowest query {_fmt(slowest)} ms "
                 f"({fallback['slowest_key']}); sequential sum {_fmt(fallback['sequential_ms'])} ms; "
                 f"all queries at once from the bench {_fmt(fallback.get('parallel_floor', {}).get('p50_ms'))} ms"))
    startup = results.get("startup", {})
    if startup.get("cold_s"):
        checks.append(_check("start-up: gunicorn launch -> first 200 (median)",
                             percentile(startup["cold_s"], 50), START_MAX_S, "s"))
    if startup.get("respawn_s"):
        checks.append(_check("worker (re)start: fork -> first 200 (median)",
                             percentile(startup["respawn_s"], 50), START_MAX_S, "s"))
    memory = results.get("memory", {})
    if memory.get("idle_max_rss_mb") is not None:
        checks.append(_check("memory per worker, idle after start (VmRSS)",
                             memory["idle_max_rss_mb"], WORKER_RSS_MAX_MB, "MB"))
    if memory.get("peak_max_rss_mb") is not None:
        checks.append(_check("memory per worker, highest VmRSS under load (all sizes)",
                             memory["peak_max_rss_mb"], WORKER_RSS_MAX_MB, "MB",
                             note=f"at {memory.get('peak_at', '?')}"))
    return checks


def _errors_note(summary: dict) -> str:
    errors = sum(summary.get(m, {}).get("errors", 0) for m in ("closed", "paced"))
    return f"{errors} non-200 answers" if errors else ""


def markdown(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [
        "# rpl-cds benchmark",
        "",
        f"Run {results['started']} ({'quick' if s['quick'] else 'full'}, {results['elapsed_s']:.0f} s), "
        f"commit {m.get('git_commit', '?')}.",
        "",
        f"**Machine:** {m['nproc']} CPUs (nproc), {m['cpu_model']}, {m['mem_total_gb']:.1f} GB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}, gunicorn {m['gunicorn']}, Flask {m['flask']}, "
        f"Node {m.get('node', 'n/a')}.",
        "",
        f"**Load average** before/after: {m.get('loadavg_before', ['?'])[0]} / {m.get('loadavg_after', ['?'])[0]}.",
        "",
        f"**Setup:** {s.get('gunicorn_conf', 'gunicorn.conf.py')} ({s['worker_class']}, {s['workers']} workers x {s['threads']} threads, "
        f"preload{', ' + ', '.join(f'{k}={v}' for k, v in s.get('tuning', {}).items()) if s.get('tuning') else ''}), "
        f"loopback, JWT checks off, database {s['database']}. Load generator: a separate "
        f"process, {s['clients']} threads with one keep-alive `http.client` connection each, on the same "
        f"{m['nproc']} CPUs. Per configuration: {s['warmup_s']} s warm-up, one client alone for at least "
        f"{s.get('plan', {}).get('single_duration_s', '?')} s, then {s['runs']} closed-loop "
        f"run(s) ({s.get('plan', {}).get('large_runs', s['runs'])} at {s.get('plan', {}).get('large_from_size', 10000):,} "
        f"resources) of {s['duration_s']} s (throughput: every client sends again as soon as it has its "
        f"answer), then {s['runs']} paced run(s) of at least {s['paced_duration_s']} s: the same clients as "
        f"interactive users who wait for the answer and then think for a random (exponential) time, "
        f"together offering {s['paced_fraction']:.0%} of the measured throughput. Latency targets are judged "
        f"on the paced runs; closed-loop latency is shown for reference (by Little's law it is about "
        f"clients / throughput), and so is the latency of one client alone (no queueing).",
        "",
        "## Targets",
        "",
        "| target | figure | rule | verdict | note |",
        "|---|---|---|---|---|",
    ]
    for check in results["targets"]:
        digits = 3 if check["unit"] == "s" else 2 if check["unit"] == "x" else 1
        lines.append(f"| {check['target']} | {_fmt(check['figure'], digits)} {check['unit']} | "
                     f"{check['rule']} | **{check['verdict']}** | {check['note']} |")
    lines += ["", "## Hook latency and throughput (prefetch)", "",
              "| hook | prefetch resources | body | paced p50 | paced p95 | paced p99 | offered | "
              "1 client p50 | closed p50 | closed p99 | throughput | worker CPU / request | errors | cards |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(hook, size, summ) for hook, by_size in results.get("service", {}).items()
            for size, summ in sorted(by_size.items())]
    rows += [("echo (Flask, parse + echo)", size, summ) for size, summ in sorted(results.get("echo", {}).items())]
    rows += [("parse-only (Flask, `{\"cards\":[]}`)", size, summ)
             for size, summ in sorted(results.get("echo_parse", {}).items())]
    for name, size, summ in rows:
        paced, closed, single = summ.get("paced", {}), summ.get("closed", {}), summ.get("single", {})
        first = summ.get("first_response") or {}
        cards = first.get("cards", "-")
        errors = paced.get("errors", 0) + closed.get("errors", 0) + single.get("errors", 0)
        lines.append(
            f"| {name} | {size:,} | {(summ.get('body_bytes') or 0) / 1024:,.0f} KiB | "
            f"{_fmt(paced.get('p50_ms'))} ms | {_fmt(paced.get('p95_ms'))} ms | {_fmt(paced.get('p99_ms'))} ms | "
            f"{_fmt(paced.get('offered_rps'))} req/s | {_fmt(single.get('p50_ms'))} ms | {_fmt(closed.get('p50_ms'))} ms | "
            f"{_fmt(closed.get('p99_ms'))} ms | {_fmt(closed.get('throughput_rps'))} req/s | "
            f"{_fmt(summ.get('worker_cpu_ms_per_request'), 2)} ms | {errors} | {cards} |")
    if results.get("fallback"):
        fhir_workers = results.get("settings", {}).get("fhir_workers", 1)
        server = ("one Node process, which answers one request at a time" if fhir_workers == 1 else
                  f"{fhir_workers} Node processes on one port, each with the same data, answering in parallel")
        lines += ["", f"## FHIR fallback (no prefetch; Node FHIR test server: {server}; one client)", "",
                  "| resources | hook total p50 | hook total p95 | slowest single query | sequential (sum) | "
                  "all queries at once (bench) | ratio total / slowest | with prefetch p50 |",
                  "|---|---|---|---|---|---|---|---|"]
        for size, fb in sorted(results["fallback"].items()):
            if "error" in fb:
                lines.append(f"| {size:,} | {fb['error'][:120]} | | | | | | |")
                continue
            closed = fb["hook"].get("closed", {})
            with_prefetch = results.get("service", {}).get("patient-view", {}).get(size, {}).get("paced", {})
            ratio = closed.get("p50_ms", math.nan) / fb["slowest_single_ms"]
            lines.append(
                f"| {size:,} | {_fmt(closed.get('p50_ms'))} ms | {_fmt(closed.get('p95_ms'))} ms | "
                f"{_fmt(fb['slowest_single_ms'])} ms ({fb['slowest_key']}) | {_fmt(fb['sequential_ms'])} ms | "
                f"{_fmt(fb.get('parallel_floor', {}).get('p50_ms'))} ms | "
                f"{ratio:.2f}x | {_fmt(with_prefetch.get('p50_ms'))} ms |")
        lines += ["", "Single queries (p50 of repeated calls from the bench, keep-alive, all pages):", ""]
        for size, fb in sorted(results["fallback"].items()):
            if "single" in fb:
                parts = [f"{k} {_fmt(v['p50_ms'], 2)} ms ({v['resources']} res, {v['pages']} p.)"
                         for k, v in fb["single"].items()]
                lines.append(f"- {size:,} resources: " + "; ".join(parts))
    startup, memory = results.get("startup", {}), results.get("memory", {})
    lines += ["", "## Start-up and memory", ""]
    if startup.get("cold_s"):
        lines.append("- gunicorn launch -> first 200: " + ", ".join(f"{x:.3f} s" for x in startup["cold_s"]))
    if startup.get("respawn_s"):
        lines.append("- worker respawn (SIGKILL -> replacement answers 200, other workers paused): "
                     + ", ".join(f"{x:.3f} s" for x in startup["respawn_s"]))
    if memory:
        lines.append(f"- worker VmRSS idle after start: max {_fmt(memory.get('idle_max_rss_mb'))} MB "
                     f"(Pss {_fmt(memory.get('idle_max_pss_mb'))} MB); master {_fmt(memory.get('master_idle_rss_mb'))} MB")
        for label, figures in memory.get("after", {}).items():
            lines.append(f"- after {label}: worker VmRSS max {_fmt(figures.get('max_rss_mb'))} MB, "
                         f"Pss max {_fmt(figures.get('max_pss_mb'))} MB, peak sampled under load "
                         f"{_fmt(figures.get('peak_rss_mb'))} MB")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def write_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    series = [(hook, by_size) for hook, by_size in results.get("service", {}).items()]
    if results.get("echo"):
        series.append(("echo (Flask parse + echo)", results["echo"]))
    for name, by_size in series:
        sizes = sorted(s for s in by_size if "paced" in by_size[s])
        if not sizes:
            continue
        style = "--" if name.startswith("echo") else "-"
        p50 = [by_size[s]["paced"]["p50_ms"] for s in sizes]
        p99 = [by_size[s]["paced"]["p99_ms"] for s in sizes]
        line, = left.plot(sizes, p50, style, marker="o", label=f"{name} p50")
        left.plot(sizes, p99, style, marker="^", alpha=0.5, color=line.get_color(), label=f"{name} p99")
        rps = [by_size[s]["closed"]["throughput_rps"] for s in sizes]
        right.plot(sizes, rps, style, marker="o", label=name, color=line.get_color())
    for axis in (left, right):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("prefetch resources")
        axis.grid(True, which="both", alpha=0.3)
    left.axhline(P50_100_MS, color="grey", lw=0.8, ls=":")
    left.axhline(P50_10K_MS, color="grey", lw=0.8, ls=":")
    left.set_ylabel(f"latency, ms ({results['settings']['clients']} clients, paced)")
    left.set_title("Hook latency vs prefetch size")
    right.set_ylabel("throughput, req/s (closed loop)")
    right.set_title("Throughput vs prefetch size")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(f"rpl-cds, {m['nproc']} CPUs {m['cpu_model']}, Python {m['python']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "latest.md", "json": out_dir / "latest.json", "png": out_dir / "latency.png"}
    paths["md"].write_text(markdown(results), encoding="utf-8")
    # Compact: the raw per-request latencies make up most of it.
    paths["json"].write_text(json.dumps(_json_ready(results), separators=(",", ":")), encoding="utf-8")
    write_chart(results, paths["png"])
    return paths


def _json_ready(value):
    """JSON keys must be strings; NaN becomes null."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
