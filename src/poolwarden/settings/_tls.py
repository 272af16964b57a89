"""TLS: libpq's ``sslmode`` values, the client :class:`ssl.SSLContext` built from the
``DB_SSL_*`` files, and the rules between those settings and the URL's ``sslmode``."""

from __future__ import annotations

import ssl as _ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from ..errors import ConfigProblem, ConfigurationError

SSLMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]

_VERIFYING = ("verify-ca", "verify-full")
_MANDATORY_TLS = ("require", *_VERIFYING)


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's password.
    return b""


def ssl_context(
    mode: str, ca: Path | None, cert: Path | None, key: Path | None
) -> _ssl.SSLContext:
    """A client context following libpq's meaning of ``mode`` (``require`` with a CA verifies it,
    as libpq does). Raises ConfigurationError naming the variable whose file failed to load."""
    ctx = _ssl.SSLContext(_ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = mode == "verify-full"
    ctx.verify_mode = _ssl.CERT_REQUIRED if (ca or mode in _VERIFYING) else _ssl.CERT_NONE
    try:
        if ca is not None:
            ctx.load_verify_locations(cafile=str(ca))
    except (_ssl.SSLError, OSError) as exc:
        raise ConfigurationError([ConfigProblem(
            "DB_SSL_CA", f"could not be loaded as PEM CA certificates ({exc.strerror or exc})",
            repr(str(ca)))]) from None
    try:
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key else None, password=_no_password)
    except (_ssl.SSLError, OSError) as exc:
        raise ConfigurationError([ConfigProblem(
            "DB_SSL_CERT", "with DB_SSL_KEY could not be loaded as a PEM certificate and its "
            f"unencrypted private key ({exc.strerror or exc})", repr(str(cert)))]) from None
    return ctx


def client_ssl(
    ssl_mode: str | None, url_mode: str | None,
    ca: Path | None, cert: Path | None, key: Path | None,
) -> _ssl.SSLContext | str | None:
    """The driver's ``ssl``: a context when certificate files are set (for ``ssl_mode``, else the
    URL's ``sslmode``, else ``require``), else ``ssl_mode`` itself. Raises as
    :func:`ssl_context` does."""
    if ca or cert:
        return ssl_context(ssl_mode or url_mode or "require", ca, cert, key)
    return ssl_mode


def ssl_problems(
    ssl_mode: str | None, query: Mapping[str, str],
    ca: Path | None, cert: Path | None, key: Path | None,
) -> list[ConfigProblem]:
    """Every TLS rule broken by ``DB_SSL_*`` and the URL's ``query``; when none is, the
    certificate files given are loaded, and a file that fails to load is the problem."""
    out: list[ConfigProblem] = []
    url_mode = query.get("sslmode")
    if ssl_mode and url_mode and url_mode != ssl_mode:
        out.append(ConfigProblem("DB_SSL_MODE", f"conflicts with sslmode={url_mode} in "
                                 "DATABASE_URL", repr(ssl_mode)))
    mode = ssl_mode or url_mode
    if (cert is None) != (key is None):
        given, missing = ("DB_SSL_CERT", "DB_SSL_KEY") if key is None else (
            "DB_SSL_KEY", "DB_SSL_CERT")
        out.append(ConfigProblem(missing, f"must be given together with {given}"))
    if mode in _VERIFYING and ca is None and "sslrootcert" not in query:
        out.append(ConfigProblem("DB_SSL_CA", f"is required when DB_SSL_MODE={mode}"))
    if (ca or cert or key) and mode not in _MANDATORY_TLS:
        out.append(ConfigProblem(
            "DB_SSL_MODE", "must be require, verify-ca or verify-full when DB_SSL_CA, "
            "DB_SSL_CERT or DB_SSL_KEY is given (otherwise they are not enforced)",
            repr(mode)))
    if not out and (ca or cert):
        try:
            client_ssl(ssl_mode, url_mode, ca, cert, key)
        except ConfigurationError as exc:
            out += exc.problems
    return out
