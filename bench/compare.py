"""A/B runs of tuning proposals: the bench under several configurations, one table.

    python -m bench.compare --sizes 100,1000,10000 --hooks order-sign \
        baseline "nostore=BENCH_NO_STORE=1" \
        "switch=BENCH_SWITCH_INTERVAL=0.0005" "threads1=RPL_CDS_THREADS=1"

Each configuration is `name=VAR=value VAR=value` (or `baseline`), any environment variables; all
run with bench/tuned_gunicorn_conf.py, whose probes are off unless set. Each configuration starts
from the environment the command was started with. Configurations are run in turn,
`--rounds` times (interleaved, so that a change in the machine's background load hits all of
them alike), and the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from bench import run



def parse_config(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition("=") if "=" in text.split()[0] else (text, "", "")
    env = dict(item.split("=", 1) for item in assignments.split()) if assignments else {}
    return name, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--sizes", default="100")
    parser.add_argument("--hooks", default="patient-view")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=2.0)
    args = parser.parse_args(argv)
    configs = [parse_config(c) for c in args.configs]
    figures: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    saved = dict(os.environ)
    for _ in range(args.rounds):
        for name, env in configs:
            os.environ.clear()
            os.environ.update(saved)
            os.environ.update(env)
            out = Path(tempfile.mkdtemp(prefix=f"rpl-bench-{name}-"))
            run.main(["--quick", "--no-fhir", "--no-echo", "--sizes", args.sizes, "--hooks", args.hooks,
                      "--duration", str(args.duration), "--gunicorn-conf", "bench/tuned_gunicorn_conf.py",
                      "--out", str(out)])
            results = json.loads((out / "latest.json").read_text())
            for hook, by_size in results["service"].items():
                for size, summary in by_size.items():
                    slot = figures.setdefault((name, hook, int(size)), {})
                    slot.setdefault("cpu", []).append(summary.get("worker_cpu_ms_per_request") or float("nan"))
                    slot.setdefault("rps", []).append(summary["closed"]["throughput_rps"])
                    slot.setdefault("p50", []).append(summary["paced"]["p50_ms"])
                    slot.setdefault("p99", []).append(summary["paced"]["p99_ms"])
                    slot.setdefault("single", []).append(summary.get("single", {}).get("p50_ms", float("nan")))
            slot = figures.setdefault((name, "start-up", 0), {})
            slot.setdefault("start", []).extend(results["startup"]["cold_s"])
            slot.setdefault("rss", []).append(results["memory"].get("peak_max_rss_mb") or float("nan"))
            slot.setdefault("db_busy", []).append(sum(results.get("log_findings", {}).values()))
    os.environ.clear()
    os.environ.update(saved)
    print("\n| config | hook | size | worker CPU ms/req | throughput req/s | 1-client p50 ms | paced p50 ms | paced p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, hook, size), slot in sorted(figures.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if hook == "start-up":
            continue
        med = {k: statistics.median(v) for k, v in slot.items()}
        print(f"| {name} | {hook} | {size} | {med['cpu']:.2f} | {med['rps']:.1f} | {med['single']:.1f} | "
              f"{med['p50']:.1f} | {med['p99']:.1f} |")
    print("\n| config | start-up s (median) | peak worker VmRSS MB | notable log lines (sum) |\n|---|---|---|---|")
    for (name, hook, _), slot in figures.items():
        if hook == "start-up":
            print(f"| {name} | {statistics.median(slot['start']):.3f} | {statistics.median(slot['rss']):.1f} | "
                  f"{sum(slot['db_busy'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
