"""Run the example service against a throwaway embedded PostgreSQL (removed on exit)::

    .venv/bin/python -m examples.service.run_embedded --workers 2 --port 8000

Starts :class:`poolwarden.embedded.EmbeddedPostgres` (it needs the PostgreSQL server
programs installed), then ``uvicorn examples.service.app:app`` with ``DATABASE_URL`` pointing
at it and Prometheus multiprocess mode on. Ctrl-C stops both. The password is never printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from poolwarden.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description="the example service on an embedded PostgreSQL")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    with EmbeddedPostgres() as pg, tempfile.TemporaryDirectory(prefix="prometheus-") as metrics:
        print(f"embedded PostgreSQL: {pg!r}", flush=True)
        env = {**os.environ, "DATABASE_URL": pg.dsn, "PROMETHEUS_MULTIPROC_DIR": metrics}
        command = [sys.executable, "-m", "uvicorn", "examples.service.app:app",
                   "--host", args.host, "--port", str(args.port),
                   "--workers", str(args.workers)]
        # Its own session: a Ctrl-C reaches only us, and we ask uvicorn once, with SIGTERM,
        # to drain and stop (a second SIGINT would make it quit without draining).
        server = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)

        def stop(signum: int, frame: object) -> None:
            server.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        return server.wait()


if __name__ == "__main__":
    raise SystemExit(main())
