#!/usr/bin/env bash
# Set up like scripts/test.sh (PostgreSQL, PgBouncer, .venv), then run `poolwarden demo`.
# With no database URL the demo starts a throwaway PostgreSQL of its own.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
POOLWARDEN_SETUP_ONLY=1 bash scripts/test.sh
exec .venv/bin/poolwarden demo "$@"
