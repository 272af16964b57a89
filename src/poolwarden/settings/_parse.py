"""Value parsing: durations (``"500ms"``, ``"2m"``), PostgreSQL URLs (one, or a list), and
the pydantic fields whose description states the rule a parsed value must meet.

Each parser raises ``ValueError`` naming the rule broken; none echoes the value given, as a
URL may carry a password.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr

_SCHEMES = ("postgres", "postgresql", "postgresql+asyncpg", "postgresql+psycopg",
            "postgresql+psycopg2")
URL_HINT = "postgresql://user:password@host:5432/dbname"
_DURATION = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_FORMS = "seconds, or with a unit: 500ms, 5s, 2m, 1h"


def parse_duration(value: object) -> float:
    """Seconds in ``value``: a number, a numeric string, a string with a unit ``ms``/``s``/``m``/
    ``h`` (``"500ms"``, ``"2m"``) or a :class:`~datetime.timedelta`.

    Raises ``ValueError`` if it is none of these or not finite. The sign is kept: range
    rules belong to the caller.
    """
    seconds: float
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match[1]) * _UNITS[(match[2] or "s").lower()]
    else:
        raise ValueError(f"not a duration ({_DURATION_FORMS})")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be finite")
    return seconds


def normalise_url(url: str) -> str:
    """The asyncpg form of a PostgreSQL URL: the scheme becomes ``postgresql://``, the rest is
    kept verbatim. Raises ``ValueError`` naming the rule broken (never echoing the URL)."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        raise ValueError(f"must be a URL like {URL_HINT}")
    if scheme.lower() not in _SCHEMES:
        raise ValueError(f"must start with one of {', '.join(s + '://' for s in _SCHEMES)}")
    normalised = "postgresql://" + rest
    bad = ("is not a valid URL: percent-encode special characters in the user name and "
           "password ('@' as %40, ':' as %3A, '/' as %2F, '#' as %23, '%' as %25)")
    try:
        parts = urlsplit(normalised)
        if "," not in parts.netloc:  # multi-host URLs (h1:5432,h2:5432) have no single port
            _ = parts.port
    except ValueError:
        raise ValueError(bad) from None
    if parts.fragment or "@" in parts.path:
        raise ValueError(bad)
    return normalised


def split_urls(value: object) -> list[str]:
    """Entries of a comma-separated URL list; a comma starts a new entry only where a scheme
    follows, so multi-host URLs (``postgresql://h1,h2/db``) stay whole."""
    if isinstance(value, str):
        return [u for u in re.split(r",\s*(?=[A-Za-z][A-Za-z0-9+.\-]*://)", value.strip()) if u]
    if isinstance(value, Iterable):
        return [v.get_secret_value() if isinstance(v, SecretStr) else str(v) for v in value]
    raise ValueError("must be a comma-separated list of URLs")


# -- fields: range and rule text; the rule text is what a problem with the value says ------


def duration_field(default: float | None, *, minimum: float, strict: bool) -> Any:
    op = ">" if strict else ">="
    unset = " or unset" if default is None and minimum == 0 else ""
    rule = f"must be a duration {op} {minimum:g} ({_DURATION_FORMS}){unset}"
    if strict:
        return Field(default, gt=minimum, description=rule)
    return Field(default, ge=minimum, description=rule)


def int_field(default: int, minimum: int) -> Any:
    return Field(default, ge=minimum, description=f"must be an integer >= {minimum}")


BOOL_RULE = "must be a boolean (true/false, 1/0, yes/no, on/off)"
FILE_RULE = "must be the path of an existing, readable file"
