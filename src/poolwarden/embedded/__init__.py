"""Throwaway local PostgreSQL servers (primary and streaming replica) for the demo and the tests.

``EmbeddedPostgres`` starts a private server on a free loopback port with a password-protected
user, and removes it afterwards::

    with EmbeddedPostgres() as pg:
        conn = await asyncpg.connect(pg.dsn)

Speed comes from a template: ``initdb`` runs once per PostgreSQL version into a cache directory
(``$POOLWARDEN_CACHE`` or ``~/.cache/poolwarden``); every server afterwards is a copy of it, so a
start costs a file copy plus the server's own start-up (a few hundred milliseconds).

PostgreSQL refuses to run as root: when this process is root, the server and its tools run as the
``postgres`` OS user and every directory they use is handed to that user.

The superuser ``postgres`` is reachable only over the server's private unix socket (trust);
TCP on 127.0.0.1 requires the application user's password (scram-sha-256). The application user
is deliberately *not* a superuser, so that it sees the same limits a service would
(``max_connections`` minus the reserved slots); it may create databases, signal backends and
read monitoring views.

Where things live:

- :mod:`._server` — :class:`EmbeddedPostgres`: connection facts, lifecycle (start, stop,
  restart, cleanup, context managers), queries, making a replica, provisioning the user;
- :mod:`._process` — its part for one server's files and process: port, data/socket/log
  directories, the settings it runs with, ``pg_ctl``, the log tail;
- :mod:`._replica` — its part for what a replica can do: pause/resume replay, wait for replay,
  promote;
- :mod:`._template` — the cached, initialised template data directory (``initdb``), the
  ``poolwarden.conf`` settings file, the cache and runtime directories;
- :mod:`._binaries` — finding the server programs (:func:`find_binaries`, :class:`PgBinaries`)
  and running them as the ``postgres`` OS user when this process is root;
- :mod:`._helpers` — :class:`EmbeddedError`, the role/database/host names, and the small
  helpers :func:`scram_verifier`, :func:`generate_password` and :func:`free_port`.
"""

from ._binaries import INSTALL_HINT as INSTALL_HINT
from ._binaries import PgBinaries, find_binaries
from ._helpers import DEFAULT_DATABASE as DEFAULT_DATABASE
from ._helpers import DEFAULT_USER as DEFAULT_USER
from ._helpers import LOOPBACK as LOOPBACK
from ._helpers import SUPERUSER as SUPERUSER
from ._helpers import EmbeddedError
from ._helpers import free_port as free_port
from ._helpers import generate_password as generate_password
from ._helpers import scram_verifier as scram_verifier
from ._process import PG_CTL_TIMEOUT_S as PG_CTL_TIMEOUT_S
from ._server import START_ATTEMPTS as START_ATTEMPTS
from ._server import EmbeddedPostgres, StopMode
from ._template import RAM_DIR as RAM_DIR
from ._template import RAM_DIR_MIN_FREE_BYTES as RAM_DIR_MIN_FREE_BYTES
from ._template import TEMPLATE_FORMAT as TEMPLATE_FORMAT

# The helpers and constants above (imported `as` themselves) stay importable from here as they
# were before the module became a package; the public API is:
__all__ = [
    "EmbeddedError",
    "EmbeddedPostgres",
    "PgBinaries",
    "StopMode",
    "find_binaries",
]
