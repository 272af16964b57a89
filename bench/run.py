"""``python -m bench``: measure poolwarden and its peers in one interleaved run, then report.

Writes ``report.md`` and ``results.json`` into the results folder (``--out``, by default
``bench/results/<timestamp>``) and prints the report.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import env
from .bar import checks
from .limits import Pgbench
from .ours import OURS
from .peers import PEERS
from .plan import FULL, QUICK, Profile, one_round
from .report import Report
from .results import BASELINE, Results
from .servers import target

REGISTRY = {s.key: s for s in (*OURS, *PEERS)}
OFF_BY_DEFAULT = {"poolwarden-noping"}  # variants that answer a question, not the bar


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (2 rounds, ~3 min)")
    parser.add_argument(
        "--dsn",
        help="server to measure (default: $DATABASE_URL, else a throwaway embedded PostgreSQL)",
    )
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<ts>)")
    parser.add_argument(
        "--systems",
        help="comma-separated system keys, or 'all' "
        f"(default: all but {', '.join(sorted(OFF_BY_DEFAULT))}); "
        f"known: {', '.join(REGISTRY)}",
    )
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--duration", type=float, help="override the window of a/b (s)")
    parser.add_argument("--overload-duration", type=float, help="override c's window (s)")
    parser.add_argument(
        "--shed-pause", type=float, help="c: pause of a caller after a refusal/timeout (s)"
    )
    parser.add_argument("--no-pgbench", action="store_true", help="skip pgbench")
    return parser.parse_args(argv)


def profile_of(args: argparse.Namespace) -> Profile:
    profile = QUICK if args.quick else FULL
    timing = profile.timing
    if args.duration:
        timing = dataclasses.replace(timing, duration_s=args.duration)
    if args.shed_pause is not None:
        timing = dataclasses.replace(timing, shed_pause_s=args.shed_pause)
    if args.overload_duration:
        timing = dataclasses.replace(timing, overload_s=args.overload_duration)
    return dataclasses.replace(profile, timing=timing, rounds=args.rounds or profile.rounds)


def select(spec: str | None) -> list[str]:
    if spec is None:
        return [k for k in REGISTRY if k not in OFF_BY_DEFAULT]
    if spec == "all":
        return list(REGISTRY)
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in keys if k not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {', '.join(REGISTRY)}")
    if BASELINE not in keys:
        keys.append(BASELINE)  # every ratio is to it
    return [k for k in REGISTRY if k in keys]


def _brief(figures: dict[str, Any]) -> str:
    if "error" in figures:
        return f"ERROR {figures['error']}"
    text = f"{figures.get('throughput') or 0:,.0f}/s"
    if figures.get("p99_ms") is not None:
        text += f" p50 {figures['p50_ms']:.2f} ms p99 {figures['p99_ms']:.2f} ms"
    if figures.get("timeouts") or figures.get("refusals"):
        text += f" timeouts {figures['timeouts']} refusals {figures['refusals']}"
    if figures.get("errors"):
        text += f" errors {figures['errors']} ({figures.get('first_error')})"
    return text


def _python() -> str:
    """The interpreter as typed from the current directory (``.venv/bin/python``)."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    profile = profile_of(args)
    keys = select(args.systems)
    started = datetime.now(UTC)
    out_dir = args.out or Path("bench/results") / started.strftime("%Y%m%dT%H%M%SZ")
    skipped = {k: why for k in keys if (why := REGISTRY[k].missing())}
    systems = [REGISTRY[k] for k in keys if k not in skipped]
    for key, why in skipped.items():
        print(f"skip {key}: {why}", flush=True)

    t_start = time.monotonic()
    results = Results(profile.rounds)
    with target(args.dsn) as tgt:
        server = asyncio.run(env.server(tgt.dsn))
        pgbench = None
        if not args.no_pgbench and (why := Pgbench.missing()) is None:
            pgbench = Pgbench(tgt.dsn, threads=2)
            pgbench.prepare()
        elif not args.no_pgbench:
            print(f"skip pgbench: {why}", flush=True)
        try:
            tasks = one_round(profile, systems, tgt.dsn, pgbench)
            total = len(tasks) * profile.rounds
            print(
                f"{profile.name}: {len(tasks)} measurements x {profile.rounds} rounds "
                f"against {tgt.masked} ({tgt.origin})",
                flush=True,
            )
            done = 0
            for round_no in range(profile.rounds):
                for task in one_round(profile, systems, tgt.dsn, pgbench, round_no):
                    done += 1
                    try:
                        by_participant = task.run()
                    except Exception as exc:  # report the failure, go on
                        failed = {"error": f"{type(exc).__name__}: {exc}"}
                        by_participant = dict.fromkeys(task.participants, failed)
                    for participant, figures in by_participant.items():
                        results.add(round_no, task.point, participant, figures)
                        print(
                            f"[{done}/{total}] {task.point.key:<16} {participant:<18} "
                            f"{_brief(figures)}",
                            flush=True,
                        )
        finally:
            if pgbench is not None:
                pgbench.cleanup()
        target_text = f"{tgt.origin}: {tgt.masked}"

    meta = {
        "started": started.isoformat(timespec="seconds"),
        "command": shlex.join([_python(), "-m", "bench", *sys.argv[1:]]),
        "profile": profile.name,
        "timing": dataclasses.asdict(profile.timing),
        "target": target_text,
        "machine": env.machine(),
        "server": server,
        "elapsed_s": time.monotonic() - t_start,
        "notes": {s.key: s.note for s in systems},
        "skipped": skipped,
    }
    bar = checks(results)
    report = Report(results, {k: REGISTRY[k].label for k in keys}, meta, bar).render()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(report)
    payload = {
        **meta,
        "rounds": profile.rounds,
        "bar": [dataclasses.asdict(c) for c in bar],
        "summary": results.summary(),
        "records": results.records,
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    print(report)
    print(f"written to {out_dir}/report.md and results.json", flush=True)
    return 0
