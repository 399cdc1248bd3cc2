"""Output of bench/fanout.py: the machine it ran on and the summary against the issue's aims."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess

from fanout_processes import ROOT

LIBRARIES = (
    "Django",
    "channels",
    "channels-redis",
    "uvicorn",
    "uvloop",
    "httptools",
    "websockets",
    "redis",
    "psycopg",
    "django-eventstream",
    "django-ninja",
)
AIMS = {  # the speed aims: fanout at least the bare server, durable latency, memory, SSE
    "ws_msgs_per_s": 50_000,
    "ws_ratio": 1.0,
    "p50_ms": 1.5,
    "p99_ms": 5.0,
    "kb_per_idle_conn": 20.0,
    "sse_events_per_s": 30_000,
    "sse_ratio": 0.75,
    "held_connections": 50_000,  # on one machine, one publish reaching all (--hold-total)
}


# --- report -----------------------------------------------------------------------------------


def machine_info(args) -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            libs[name] = "absent"
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libraries": libs,
        "redis_server": redis_v.split()[2] if redis_v else "?",
        "server_core": args.server_core,
        "client_core": args.client_core,
        "load_avg_at_start": os.getloadavg(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_files": len(git("status", "--short", "--untracked-files=no").splitlines()),
    }


def git(*argv: str) -> str:
    done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def _values(runs: list[dict], target: str, key: str) -> list:
    return [r[target][key] for r in runs if r.get(target, {}).get(key) is not None]


def _fmt(values: list, unit: str = "") -> str:
    if not values:
        return "n/a"
    shown = ", ".join(f"{v:,}" if isinstance(v, int) else f"{v}" for v in values)
    med = statistics.median(values)
    return f"{shown}{unit} (median {med:,.3g}{unit})" if len(values) > 1 else f"{shown}{unit}"


def _check(label: str, values: list, aim: float, higher_is_better: bool) -> str:
    if not values:
        return f"  {label}: not measured"
    med = statistics.median(values)
    ok = med >= aim if higher_is_better else med <= aim
    op = ">=" if higher_is_better else "<="
    return f"  {label}: median {med:,.4g} vs aim {op} {aim:,} -> {'MET' if ok else 'NOT MET'}"


def metrics_cost_lines(results: dict) -> list[str]:
    """Ratios ours with metrics recording / ours without it, per part (``--metrics both``)."""
    parts = [(f"ws {variant}", runs) for variant, runs in results.get("ws", {}).items()]
    parts += [(part, results[part]["runs"]) for part in ("latency", "sse") if part in results]
    lines = []
    for label, runs in parts:
        keys = sorted({key for run in runs for key in run if key.startswith("metrics_on_off_")})
        for key in keys:
            values = [run[key] for run in runs if key in run]
            lines.append(
                f"{label} metrics on/off {key.removeprefix('metrics_on_off_')}: {_fmt(values)}"
            )
    return lines


def summarize(results: dict) -> None:
    print("\n=== summary (each value is one run) ===")
    checks = []
    if "ws" in results:
        for variant in results["ws"]:
            runs = results["ws"][variant]
            ours = _values(runs, "ours", "msgs_per_s")
            bare = _values(runs, "bare", "msgs_per_s")
            ratios = [r["ratio"] for r in runs if "ratio" in r]
            print(f"ws {variant:7s} delivered msg/s  ours: {_fmt(ours)}")
            print(f"ws {variant:7s} delivered msg/s  bare: {_fmt(bare)}")
            print(f"ws {variant:7s} ratio ours/bare: {_fmt(ratios)}")
            print(
                f"ws {variant:7s} client CPU % ours: "
                f"{_fmt(_values(runs, 'ours', 'client_cpu_pct'))}"
                f"  bare: {_fmt(_values(runs, 'bare', 'client_cpu_pct'))}"
            )
            print(
                f"ws {variant:7s} server us per delivery ours: "
                f"{_fmt(_values(runs, 'ours', 'server_us_per_delivery'))}"
                f"  bare: {_fmt(_values(runs, 'bare', 'server_us_per_delivery'))}"
            )
            if variant == "paced":
                marginal = [
                    r["ours_marginal_us_per_delivery"]
                    for r in runs
                    if "ours_marginal_us_per_delivery" in r
                ]
                print(
                    f"ws paced   ours marginal us per delivery (ingest taken out): {_fmt(marginal)}"
                )
            print(
                f"ws {variant:7s} server CPU % ours: "
                f"{_fmt(_values(runs, 'ours', 'server_cpu_pct'))}"
                f"  bare: {_fmt(_values(runs, 'bare', 'server_cpu_pct'))}"
            )
            if variant == "plain":
                checks.append(_check("ws msg/s (plain)", ours, AIMS["ws_msgs_per_s"], True))
                checks.append(_check("ws ratio to bare (plain)", ratios, AIMS["ws_ratio"], True))
    if "latency" in results:
        runs = results["latency"]["runs"]
        for target in ("ours", "ours-bus", "bare"):
            for key in ("p50_ms", "p95_ms", "p99_ms", "answer_p50_ms"):
                vals = _values(runs, target, key)
                if vals:
                    print(f"latency {target} {key}: {_fmt(vals, ' ms')}")
        checks.append(
            _check("latency p50 ms", _values(runs, "ours", "p50_ms"), AIMS["p50_ms"], False)
        )
        checks.append(
            _check("latency p99 ms", _values(runs, "ours", "p99_ms"), AIMS["p99_ms"], False)
        )
    if "idle" in results:
        runs = results["idle"]["memory"]
        for key in ("memory", "memory_deflate"):
            for target in ("ours", "bare"):
                vals = _values(results["idle"][key], target, "kb_per_idle_conn")
                if vals:
                    label = "with permessage-deflate" if key == "memory_deflate" else "plain"
                    print(f"idle {target} KB per idle connection ({label}): {_fmt(vals)}")
        held = _values(results["idle"]["hold"], "ours", "held")
        opened = _values(results["idle"]["hold"], "ours", "opened")
        total = f"{max(opened):,}" if opened else "?"
        print(f"idle ours {total} sockets held: {held}")
        checks.append(
            _check(
                "KB per idle conn",
                _values(runs, "ours", "kb_per_idle_conn"),
                AIMS["kb_per_idle_conn"],
                False,
            )
        )
        aim = AIMS["held_connections"]
        met = "MET" if held and all(held) and opened and min(opened) >= aim else "NOT MET"
        checks.append(f"  {aim:,} held: {held} at {total} sockets -> {met}")
    if "sse" in results:
        runs = results["sse"]["runs"]
        for target in ("ours", "bare"):
            print(
                f"sse {target} delivered events/s: {_fmt(_values(runs, target, 'msgs_per_s'))}; "
                f"client CPU %: {_fmt(_values(runs, target, 'client_cpu_pct'))}"
            )
        ratios = [r["ratio"] for r in runs if "ratio" in r]
        print(f"sse ratio ours/bare: {_fmt(ratios)}")
        vals = _values(runs, "ours", "msgs_per_s")
        checks.append(_check("SSE events/s", vals, AIMS["sse_events_per_s"], True))
        checks.append(_check("SSE ratio ours/bare", ratios, AIMS["sse_ratio"], True))
    for line in metrics_cost_lines(results):
        print(line)
    print("aims:")
    for line in checks:
        print(line)
