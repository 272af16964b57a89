#!/usr/bin/env bash
# The test command: set up whatever is missing, then lint, type-check and test.
#
#   scripts/test.sh [pytest arguments...]
#
# Set-up (each step only when needed, so a second run starts testing at once):
#   - PostgreSQL server programs and PgBouncer, from apt (needs root or sudo);
#   - the virtualenv .venv with poolwarden installed editable with its dev and bench extras,
#     re-installed when pyproject.toml changes.
# Then runs ruff, mypy (src, bench, examples) and pytest; all three run, and the exit status is
# non-zero if any failed.
# POOLWARDEN_SETUP_ONLY=1 stops after the set-up (scripts/demo.sh uses it).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }

have_pg_server() {
    command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1 && return 0
    compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null
}

have_pgbouncer() {
    command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]
}

have_venv_module() {
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root to run: $*  (run this script as root, or install it yourself)"
        return 1
    fi
}

install_system_packages() {
    local missing=()
    have_pg_server || missing+=(postgresql)
    have_pgbouncer || missing+=(pgbouncer)
    have_venv_module || missing+=(python3-venv)
    [ "${#missing[@]}" -eq 0 ] && return 0

    log "installing ${missing[*]} with apt-get"
    # Tests start their own servers on free ports: the cluster Debian would create and start
    # is not wanted. Ask postgresql-common not to create it (only if nobody configured this).
    if [[ " ${missing[*]} " == *" postgresql "* ]] && [ ! -e /etc/postgresql-common/createcluster.conf ]; then
        as_root mkdir -p /etc/postgresql-common
        echo 'create_main_cluster = false' | as_root tee /etc/postgresql-common/createcluster.conf >/dev/null
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    # Whatever the packages started (a cluster created anyway, the pgbouncer service) is stopped:
    # it would only hold memory and the default ports.
    if command -v pg_lsclusters >/dev/null 2>&1; then
        pg_lsclusters -h 2>/dev/null | while read -r version name _; do
            as_root pg_ctlcluster "$version" "$name" stop >/dev/null 2>&1 || true
        done
    fi
    if [[ " ${missing[*]} " == *" pgbouncer "* ]] && command -v service >/dev/null 2>&1; then
        as_root service pgbouncer stop >/dev/null 2>&1 || true
    fi
    have_pg_server || { log "PostgreSQL server programs still not found after install"; return 1; }
}

setup_venv() {
    if [ ! -x .venv/bin/python ]; then
        log "creating .venv"
        python3 -m venv .venv
    fi
    local stamp=.venv/.poolwarden-install-stamp want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/poolwarden ]; then
        log "installing poolwarden[dev,bench] into .venv"
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q -e '.[dev,bench]'
        echo "$want" >"$stamp"
    fi
}

install_system_packages
setup_venv

if [ "${POOLWARDEN_SETUP_ONLY:-0}" = "1" ]; then
    exit 0
fi

status=0
run() {
    log "$*"
    "$@" || status=1
}
lint_paths=()
for path in src tests bench examples; do
    [ -e "$path" ] && lint_paths+=("$path")
done
# mypy (strict, [tool.mypy] in pyproject.toml) checks the library, the benchmarks and the
# examples; tests are linted only.
type_paths=()
for path in src bench examples; do
    [ -e "$path" ] && type_paths+=("$path")
done
run .venv/bin/ruff check "${lint_paths[@]}"
run .venv/bin/mypy "${type_paths[@]}"
run .venv/bin/pytest "$@"

if [ "$status" -ne 0 ]; then
    log "FAILED (see above)"
fi
exit "$status"
