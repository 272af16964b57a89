"""Worker processes for the multiprocess metrics tests: each runs a script that does a
workload, syncs its pool's stats into PROMETHEUS_MULTIPROC_DIR, prints "synced" and waits
for a line on stdin before it exits."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def worker_processes(
    tmp_path: Path, source: str, env: dict[str, str], counts: Sequence[int]
) -> Iterator[tuple[Path, list[subprocess.Popen[str]]]]:
    """Start one worker per entry of ``counts`` (its argument), wait until each has synced,
    yield the multiprocess directory and the processes; on exit, let the live ones finish."""
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(source)
    full_env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir), **env}
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(count)], env=full_env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for count in counts
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = worker.stdout.readline()
            assert line.strip() == "synced", worker.stderr.read() if worker.stderr else ""
        yield multiproc_dir, workers
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.communicate("\n", timeout=30)
