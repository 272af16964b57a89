"""Helpers for testing code that uses poolwarden: a TCP fault proxy and throwaway servers.

``FaultProxy`` breaks the network between a client and PostgreSQL on demand;
``EmbeddedPostgres`` (re-exported from :mod:`poolwarden.embedded`) starts a private server.
"""

from ..embedded import EmbeddedError, EmbeddedPostgres
from .proxy import FaultProxy, ProxyMode

__all__ = ["EmbeddedError", "EmbeddedPostgres", "FaultProxy", "ProxyMode"]
