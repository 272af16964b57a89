"""Masking of credentials before anything is printed, logged or raised.

Every place that turns a DSN or a connection target into text goes through here, so that
the rule "a password never appears in a log, an error, a metric label or a response" has
one implementation.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

MASK = "***"

# userinfo in a URL: scheme://user:password@host — the password is everything between the
# first ':' after '//' and the last '@' before the host (passwords may contain '@' and ':').
_URL_PASSWORD = re.compile(
    r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@?#]*:)(?P<pw>.*)(?P<tail>@[^@]*$)"
)
# key=value connection strings: password=secret or password='se cret'
_KV_PASSWORD = re.compile(
    r"(?P<head>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE
)
# ?password=... in a URL query
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<pw>[^&#]*)", re.IGNORECASE)


def mask_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***``; everything else is kept."""
    masked = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", dsn, count=1)
    masked = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", masked)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", masked)


def dsn_target(dsn: str) -> str:
    """A short, credential-free description of where ``dsn`` points: ``host:port/database``."""
    if "://" not in dsn:
        return "<key=value DSN>"
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "<unparseable DSN>"
    database = parts.path.lstrip("/") or (parts.username or "")
    return f"{host}:{port}/{database}"


def scrub(text: str, *secrets: str | None) -> str:
    """Remove every occurrence of each non-empty secret from ``text`` and mask any DSN in it.

    Used on driver error messages before they are wrapped in our errors: a driver may echo
    the DSN or the password back in its message.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return mask_dsn(text)
