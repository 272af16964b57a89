"""Database settings from the environment: ``DATABASE_URL``, ``DATABASE_REPLICA_URLS``, ``DB_*``.

Contract:

- :class:`DatabaseSettings` is validated once, at construction, and then sealed (frozen).
  Construction either succeeds or raises one :class:`~poolwarden.errors.ConfigurationError`
  listing *every* problem: parse errors, range errors and cross-field rules together, each
  naming the environment variable, the rule broken and the (masked) value given. Nothing is
  clamped or corrected silently.
- Precedence, highest first: constructor keyword arguments, environment variables, the
  values of the preset named by ``DB_PRESET``, then the defaults (which are
  :class:`~poolwarden.pool.config.PoolConfig`'s own, so the two never drift).
  :meth:`DatabaseSettings.sources` says where each value came from.
- Durations are seconds: ``"5"``, ``"0.5"``, or with a unit ``"500ms"``, ``"5s"``, ``"2m"``,
  ``"1h"`` (see :func:`parse_duration`). Booleans accept true/false, 1/0, yes/no, on/off.
  Empty variables count as unset.
- A password never appears in ``repr()``, ``str()``, ``model_dump()`` (URLs are
  :class:`~pydantic.SecretStr`), :meth:`DatabaseSettings.describe` or any error. The
  original ``pydantic.ValidationError`` (which would echo the input) is not chained.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
import os
import re
import ssl as _ssl
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, urlencode, urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ._secrets import mask_dsn
from .errors import ConfigProblem, ConfigurationError
from .pool.config import PoolConfig, ResetPolicy
from .protect.admission import AdmissionConfig
from .protect.limiter import LimiterConfig

__all__ = ["PRESETS", "DatabaseSettings", "SSLMode", "normalise_url", "parse_duration"]

SSLMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
PresetName = Literal["development", "small_api", "high_traffic", "background_worker"]
Driver = Literal["asyncpg", "psycopg"]

_POOL_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(PoolConfig)}
# settings field -> PoolConfig field; the setting's default is the PoolConfig default.
_TO_POOL: dict[str, str] = {
    "pool_size": "pool_size", "max_overflow": "max_overflow", "pool_min_size": "min_size",
    "pool_max_waiting": "max_waiting", "pool_timeout": "acquire_timeout",
    "pool_recycle": "max_lifetime", "pool_idle_timeout": "idle_timeout",
    "pool_pre_ping": "pre_ping", "pool_ping_after_idle": "ping_after_idle",
    "pool_reset": "reset", "statement_timeout": "statement_timeout",
    "lock_timeout": "lock_timeout", "idle_in_transaction_timeout": "idle_in_transaction_timeout",
    "connect_timeout": "connect_timeout", "command_timeout": "command_timeout",
    "application_name": "application_name", "statement_cache_size": "statement_cache_size",
    "echo_pool": "echo_pool", "slow_query_threshold": "slow_query_threshold",
    "leak_threshold": "leak_threshold", "log_query_params": "log_query_params",
}

PRESETS: Mapping[str, Mapping[str, Any]] = {
    # Local work: few connections, SQL echoed, fail fast so mistakes show at once.
    "development": {
        "pool_size": 5, "max_overflow": 5, "pool_min_size": 0, "pool_timeout": 3.0,
        "pool_max_waiting": 100, "connect_timeout": 3.0, "command_timeout": 15.0,
        "statement_timeout": 10.0, "lock_timeout": 5.0, "echo": True,
        "slow_query_threshold": 0.5,
    },
    # A modest web service: small pool, bounded statements, no idle-in-transaction leaks.
    "small_api": {
        "pool_size": 5, "max_overflow": 5, "pool_min_size": 1, "pool_timeout": 5.0,
        "pool_max_waiting": 200, "command_timeout": 15.0, "statement_timeout": 10.0,
        "lock_timeout": 5.0, "idle_in_transaction_timeout": 30.0, "slow_query_threshold": 0.5,
        "pool_admission": True,
    },
    # Many requests: warm bigger pool, short bounded queue, fail fast (503) rather than pile up.
    "high_traffic": {
        "pool_size": 20, "max_overflow": 10, "pool_min_size": 10, "pool_timeout": 1.0,
        "pool_max_waiting": 100, "command_timeout": 10.0, "statement_timeout": 5.0,
        "lock_timeout": 2.0, "idle_in_transaction_timeout": 15.0, "slow_query_threshold": 0.25,
        "pool_admission": True, "pool_adaptive_limit": True,
    },
    # Batch jobs: few connections, patient acquire, long statements.
    "background_worker": {
        "pool_size": 2, "max_overflow": 2, "pool_min_size": 0, "pool_timeout": 60.0,
        "pool_idle_timeout": 60.0, "command_timeout": 660.0, "statement_timeout": 600.0,
        "lock_timeout": 30.0, "idle_in_transaction_timeout": 300.0, "slow_query_threshold": 30.0,
    },
}

_SCHEMES = ("postgres", "postgresql", "postgresql+asyncpg", "postgresql+psycopg",
            "postgresql+psycopg2")
_URL_HINT = "postgresql://user:password@host:5432/dbname"
_DURATION = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DUR = "seconds, or with a unit: 500ms, 5s, 2m, 1h"
_VERIFYING = ("verify-ca", "verify-full")
_MANDATORY_TLS = ("require", *_VERIFYING)
_PLACEHOLDER_URL = "postgresql://placeholder/placeholder"

# The environment a construction reads; None means os.environ. A ContextVar so that
# from_env(mapping) never touches the process environment and is safe across tasks.
_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "poolwarden_settings_environ", default=None
)


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
        raise ValueError(f"not a duration ({_DUR})")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be finite")
    return seconds


def normalise_url(url: str) -> str:
    """The asyncpg form of a PostgreSQL URL: the scheme becomes ``postgresql://``, the rest is
    kept verbatim. Raises ``ValueError`` naming the rule broken (never echoing the URL)."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        raise ValueError(f"must be a URL like {_URL_HINT}")
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


def _split_urls(value: object) -> list[str]:
    """Entries of a comma-separated URL list; a comma starts a new entry only where a scheme
    follows, so multi-host URLs (``postgresql://h1,h2/db``) stay whole."""
    if isinstance(value, str):
        return [u for u in re.split(r",\s*(?=[A-Za-z][A-Za-z0-9+.\-]*://)", value.strip()) if u]
    if isinstance(value, Iterable):
        return [v.get_secret_value() if isinstance(v, SecretStr) else str(v) for v in value]
    raise ValueError("must be a comma-separated list of URLs")


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's password.
    return b""


def _ssl_context(
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


class _EnvSource(EnvSettingsSource):
    """Environment source over a given mapping, leaving values undecoded (our validators parse
    them; pydantic-settings would otherwise try JSON on the replica list)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items() if not self.env_ignore_empty or v}

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        return value


def _duration_field(default: float | None, *, minimum: float, strict: bool) -> Any:
    op = ">" if strict else ">="
    unset = " or unset" if default is None and minimum == 0 else ""
    rule = f"must be a duration {op} {minimum:g} ({_DUR}){unset}"
    if strict:
        return Field(default, gt=minimum, description=rule)
    return Field(default, ge=minimum, description=rule)


def _int_field(default: int, minimum: int) -> Any:
    return Field(default, ge=minimum, description=f"must be an integer >= {minimum}")


_BOOL = "must be a boolean (true/false, 1/0, yes/no, on/off)"
_FILE = "must be the path of an existing, readable file"
_D = {name: _POOL_DEFAULTS[pool] for name, pool in _TO_POOL.items()}


class DatabaseSettings(BaseSettings):
    """Settings of one PostgreSQL cluster (primary + optional replicas), sealed after validation.

    Raises :class:`~poolwarden.errors.ConfigurationError` listing every problem at once.
    """

    model_config = SettingsConfigDict(
        env_prefix="DB_", case_sensitive=False, env_ignore_empty=True, frozen=True,
        populate_by_name=True, extra="forbid", hide_input_in_errors=True,
    )

    database_url: SecretStr = Field(
        validation_alias="DATABASE_URL", description=f"is required: a URL like {_URL_HINT}")
    replica_urls: tuple[SecretStr, ...] = Field(
        (), validation_alias="DATABASE_REPLICA_URLS",
        description="must be a comma-separated list of PostgreSQL URLs")
    preset: PresetName | None = Field(
        None, description=f"must be one of: {', '.join(PRESETS)}")
    pool_size: int = _int_field(_D["pool_size"], 1)
    max_overflow: int = _int_field(_D["max_overflow"], 0)
    pool_min_size: int = _int_field(_D["pool_min_size"], 0)
    pool_max_waiting: int = _int_field(_D["pool_max_waiting"], 0)
    pool_timeout: float = _duration_field(_D["pool_timeout"], minimum=0, strict=True)
    pool_recycle: float = _duration_field(_D["pool_recycle"], minimum=0, strict=True)
    pool_idle_timeout: float = _duration_field(_D["pool_idle_timeout"], minimum=0, strict=True)
    pool_pre_ping: bool = Field(_D["pool_pre_ping"], description=_BOOL)
    pool_ping_after_idle: float = _duration_field(
        _D["pool_ping_after_idle"], minimum=0, strict=False)
    pool_reset: ResetPolicy = Field(
        _D["pool_reset"], description=f"must be one of: {', '.join(p.value for p in ResetPolicy)}")
    echo: bool = Field(False, description=_BOOL)
    echo_pool: bool = Field(False, description=_BOOL)
    slow_query_threshold: float = _duration_field(1.0, minimum=0, strict=True)
    log_query_params: bool = Field(False, description=_BOOL)
    pool_admission: bool = Field(False, description=_BOOL)
    pool_adaptive_limit: bool = Field(False, description=_BOOL)
    breaker: bool = Field(True, description=_BOOL)
    leak_threshold: float | None = _duration_field(None, minimum=0, strict=True)
    statement_timeout: float | None = _duration_field(None, minimum=0, strict=False)
    lock_timeout: float | None = _duration_field(None, minimum=0, strict=False)
    idle_in_transaction_timeout: float | None = _duration_field(None, minimum=0, strict=False)
    connect_timeout: float = _duration_field(_D["connect_timeout"], minimum=0, strict=True)
    command_timeout: float = _duration_field(_D["command_timeout"], minimum=0, strict=True)
    application_name: str = Field(
        _D["application_name"], pattern=r"^[\x20-\x7e]{1,63}$",
        description="must be 1 to 63 printable ASCII characters (PostgreSQL truncates longer)")
    ssl_mode: SSLMode | None = Field(
        None, description="must be one of: disable, allow, prefer, require, verify-ca, "
        "verify-full")
    ssl_ca: Path | None = Field(None, description=_FILE)
    ssl_cert: Path | None = Field(None, description=_FILE)
    ssl_key: Path | None = Field(None, description=_FILE)
    statement_cache_size: int = _int_field(_D["statement_cache_size"], 0)

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    _ALIASES: ClassVar[dict[str, str]] = {
        "DATABASE_URL": "database_url", "DATABASE_REPLICA_URLS": "replica_urls"}

    # -- construction ---------------------------------------------------------------------

    def __init__(self, **values: Any) -> None:
        """Read keyword arguments and the environment, apply the preset, check every rule."""
        values = {self._ALIASES.get(k, k): v for k, v in values.items()}
        problems, failed = self._parse(values)
        if problems:
            # Parse again with each failed field replaced by a valid stand-in, so that the
            # cross-field rules that do not involve a failed field are still checked.
            retry = {k: v for k, v in values.items() if k in type(self).model_fields}
            for name in failed:
                field = type(self).model_fields[name]
                retry[name] = _PLACEHOLDER_URL if field.is_required() else field.default
            if self._parse(retry)[1]:  # pragma: no cover - a default is invalid: a bug here
                raise ConfigurationError(problems)
        explicit = self.model_fields_set
        sources = {n: ("argument" if n in values else "env") if n in explicit else "default"
                   for n in type(self).model_fields}
        if self.preset is not None and "preset" not in failed:
            for name, value in PRESETS[self.preset].items():
                if name not in explicit:
                    self.__dict__[name] = value  # sealed model: set once, before anyone sees it
                    sources[name] = "preset"
        self._sources = sources
        problems += self._rule_problems(failed)
        environ = _ENVIRON.get()
        problems += _unknown_variables(os.environ if environ is None else environ)
        if problems:
            raise ConfigurationError(problems)

    def _parse(self, values: dict[str, Any]) -> tuple[list[ConfigProblem], set[str]]:
        """Run pydantic on ``values`` + the environment; translate its errors (not chained)."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            return _translate(exc)
        return [], set()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> DatabaseSettings:
        """Settings from ``env`` (default: ``os.environ``) and ``overrides`` (which win).

        With a mapping, the process environment is not read at all.
        """
        token = _ENVIRON.set(env)
        try:
            return cls(**overrides)
        finally:
            _ENVIRON.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = _ENVIRON.get()
        return (init_settings, _EnvSource(settings_cls, os.environ if environ is None else environ))

    @field_validator("database_url", mode="before")
    @classmethod
    def _check_url(cls, value: object) -> SecretStr:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(raw, str):
            raise PydanticCustomError("poolwarden", f"must be a URL like {_URL_HINT}")
        try:
            return SecretStr(normalise_url(raw))
        except ValueError as exc:
            raise PydanticCustomError("poolwarden", str(exc)) from None

    @field_validator("replica_urls", mode="before")
    @classmethod
    def _check_replicas(cls, value: object) -> tuple[SecretStr, ...]:
        urls, errors = [], []
        for i, raw in enumerate(_split_urls(value), start=1):
            try:
                urls.append(SecretStr(normalise_url(raw)))
            except ValueError as exc:
                errors.append(f"entry {i} {exc}")
        if errors:
            raise PydanticCustomError("poolwarden", "; ".join(errors))
        return tuple(urls)

    @field_validator("pool_timeout", "pool_recycle", "pool_idle_timeout", "pool_ping_after_idle",
                     "slow_query_threshold", "statement_timeout", "lock_timeout",
                     "idle_in_transaction_timeout", "connect_timeout", "command_timeout",
                     mode="before")
    @classmethod
    def _check_duration(cls, value: object) -> float | None:
        return None if value is None else parse_duration(value)

    @field_validator("preset", "ssl_mode", "pool_reset", mode="before")
    @classmethod
    def _check_choice(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        value = value.strip().lower()  # case and '-'/'_' are not worth an error
        return value.replace("_", "-") if info.field_name == "ssl_mode" else value.replace("-", "_")

    @field_validator("ssl_ca", "ssl_cert", "ssl_key", mode="after")
    @classmethod
    def _check_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        path = value.expanduser()
        if not (path.is_file() and os.access(path, os.R_OK)):
            raise ValueError(_FILE)
        return path

    # -- cross-field rules ----------------------------------------------------------------

    def _rule_problems(self, failed: set[str]) -> list[ConfigProblem]:
        """Every cross-field rule broken; a rule involving a field that failed to parse is
        skipped (its parse error is already reported)."""
        out: list[ConfigProblem] = []

        def need(ok: bool, fields: tuple[str, ...], rule: str) -> None:
            if not ok and not failed.intersection(fields):
                out.append(ConfigProblem(_env_name(fields[0]), rule, self._shown(fields[0])))

        need(self.pool_min_size <= self.pool_size, ("pool_min_size", "pool_size"),
             f"must be <= DB_POOL_SIZE ({self._about('pool_size')})")
        cmd = ("command_timeout", f"DB_COMMAND_TIMEOUT ({self._about('command_timeout')})")
        st, lock = self.statement_timeout, self.lock_timeout
        need(not st or st < self.command_timeout, ("statement_timeout", cmd[0]),
             f"must be < {cmd[1]}, so that the server cancels a statement before the client "
             "gives up on it")
        if st:
            need(not lock or lock < st, ("lock_timeout", "statement_timeout"),
                 f"must be < DB_STATEMENT_TIMEOUT ({self._about('statement_timeout')}), "
                 "or it can never fire")
        else:
            need(not lock or lock < self.command_timeout, ("lock_timeout", cmd[0]),
                 f"must be < {cmd[1]}, so that a lock wait fails on the server first")
        need(self.slow_query_threshold < self.command_timeout,
             ("slow_query_threshold", cmd[0]),
             f"must be < {cmd[1]}, or no query is ever reported as slow")
        need(self.pool_pre_ping or self._sources["pool_ping_after_idle"] not in ("env", "argument"),
             ("pool_ping_after_idle", "pool_pre_ping"), "has no effect when DB_POOL_PRE_PING=false")
        out += self._ssl_problems(failed)
        primary = self.database_url.get_secret_value()
        replicas = [u.get_secret_value() for u in self.replica_urls]
        need(primary not in replicas, ("replica_urls", "database_url"),
             "must not contain the primary's DATABASE_URL")
        need(len(set(replicas)) == len(replicas), ("replica_urls",), "must not repeat a URL")
        return out

    def _ssl_problems(self, failed: set[str]) -> list[ConfigProblem]:
        ssl_fields = {"ssl_mode", "ssl_ca", "ssl_cert", "ssl_key", "database_url"}
        if failed & ssl_fields:
            return []
        out: list[ConfigProblem] = []
        query = self._url_query()
        url_mode = query.get("sslmode")
        if self.ssl_mode and url_mode and url_mode != self.ssl_mode:
            out.append(ConfigProblem("DB_SSL_MODE", f"conflicts with sslmode={url_mode} in "
                                     "DATABASE_URL", repr(self.ssl_mode)))
        mode = self.ssl_mode or url_mode
        if (self.ssl_cert is None) != (self.ssl_key is None):
            given, missing = ("DB_SSL_CERT", "DB_SSL_KEY") if self.ssl_key is None else (
                "DB_SSL_KEY", "DB_SSL_CERT")
            out.append(ConfigProblem(missing, f"must be given together with {given}"))
        if mode in _VERIFYING and self.ssl_ca is None and "sslrootcert" not in query:
            out.append(ConfigProblem("DB_SSL_CA", f"is required when DB_SSL_MODE={mode}"))
        if (self.ssl_ca or self.ssl_cert or self.ssl_key) and mode not in _MANDATORY_TLS:
            out.append(ConfigProblem(
                "DB_SSL_MODE", "must be require, verify-ca or verify-full when DB_SSL_CA, "
                "DB_SSL_CERT or DB_SSL_KEY is given (otherwise they are not enforced)",
                repr(mode)))
        if not out and (self.ssl_ca or self.ssl_cert):
            try:
                self._ssl()
            except ConfigurationError as exc:
                out += exc.problems
        return out

    # -- views ----------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The primary's URL in asyncpg form (``postgresql://``). Contains the password."""
        return self.database_url.get_secret_value()

    @property
    def masked_url(self) -> str:
        """The primary's URL with the password replaced by ``***``: safe to print."""
        return mask_dsn(self.dsn)

    @property
    def masked_replica_urls(self) -> tuple[str, ...]:
        return tuple(mask_dsn(u.get_secret_value()) for u in self.replica_urls)

    def sources(self) -> dict[str, str]:
        """Variable name -> where its value came from: argument, env, preset or default."""
        return {_env_name(n): s for n, s in self._sources.items()}

    def describe(self) -> list[tuple[str, str, str]]:
        """``(variable, value, source)`` for every setting, values masked, in declaration order."""
        return [(_env_name(n), self._display(n), s) for n, s in self._sources.items()]

    def pool_config(self, name: str = "primary") -> PoolConfig:
        """The pool core's configuration for the primary, named ``name``.

        ``ssl`` is an :class:`ssl.SSLContext` when certificate files are set, else the
        ``DB_SSL_MODE`` string (or ``None``: asyncpg then honours ``sslmode`` in the URL).
        """
        options: dict[str, Any] = {
            pool: getattr(self, setting) for setting, pool in _TO_POOL.items()}
        options["admission"] = AdmissionConfig() if self.pool_admission else None
        options["limiter"] = LimiterConfig() if self.pool_adaptive_limit else None
        if not self.breaker:
            options["breaker"] = None
        return PoolConfig(dsn=self.dsn, name=name, ssl=self._ssl(), **options)

    def sqlalchemy_url(self, driver: Driver = "asyncpg") -> str:
        """The URL for a SQLAlchemy engine with ``driver``. Contains the password.

        For ``psycopg`` (the sync engine) the SSL settings and ``application_name`` are added
        as libpq query parameters unless the URL already has them; for ``asyncpg`` the pool
        core applies them, so the URL is only re-labelled.
        """
        if driver not in ("asyncpg", "psycopg"):
            raise ValueError(f"driver must be 'asyncpg' or 'psycopg', not {driver!r}")
        url = f"postgresql+{driver}://" + self.dsn.partition("://")[2]
        if driver == "asyncpg":
            return url
        query = self._url_query()
        extra = {k: str(v) for k, v in (
            ("sslmode", self.ssl_mode), ("sslrootcert", self.ssl_ca), ("sslcert", self.ssl_cert),
            ("sslkey", self.ssl_key), ("application_name", self.application_name),
        ) if v is not None and k not in query}
        if not extra:
            return url
        return url + ("&" if "?" in url else "?") + urlencode(extra)

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name in type(self).model_fields:
            value = getattr(self, name)
            yield name, self._display(name) if name in _SECRET_FIELDS else value

    # -- helpers --------------------------------------------------------------------------

    def _ssl(self) -> _ssl.SSLContext | str | None:
        if self.ssl_ca or self.ssl_cert:
            mode = self.ssl_mode or self._url_query().get("sslmode") or "require"
            return _ssl_context(mode, self.ssl_ca, self.ssl_cert, self.ssl_key)
        return self.ssl_mode

    def _url_query(self) -> dict[str, str]:
        query = urlsplit(self.dsn).query
        return {k: v[-1] for k, v in parse_qs(query).items()}

    def _display(self, name: str) -> str:
        value = getattr(self, name)
        if name == "database_url":
            return self.masked_url
        if name == "replica_urls":
            return ",".join(self.masked_replica_urls)
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return str(value).lower()
        return str(value.value if isinstance(value, ResetPolicy) else value)

    def _shown(self, name: str) -> str:
        return repr(self._display(name))

    def _about(self, name: str) -> str:
        source = self._sources.get(name, "default")
        origin = f"preset {self.preset}" if source == "preset" else source
        return f"{self._display(name)}, {origin}"


_FIELDS = DatabaseSettings.model_fields


def _env_name(name: str) -> str:
    alias = _FIELDS[name].validation_alias
    return alias if isinstance(alias, str) else f"DB_{name.upper()}"


_SECRET_FIELDS = ("database_url", "replica_urls")
_KNOWN = {_env_name(n) for n in _FIELDS}
_BY_KEY = {**{n: n for n in _FIELDS}, **{_env_name(n): n for n in _FIELDS}}


def _masked_input(name: str, value: object) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if name in _SECRET_FIELDS:
        text = value if isinstance(value, str) else ",".join(_split_urls(value))
        return repr(mask_dsn(text))
    text = repr(value)
    return mask_dsn(text[:200])


def _translate(exc: ValidationError) -> tuple[list[ConfigProblem], set[str]]:
    """One problem per field from pydantic's errors, named by variable, values masked."""
    problems: list[ConfigProblem] = []
    failed: set[str] = set()
    for err in exc.errors(include_url=False, include_context=False):
        key = str(err["loc"][0]) if err["loc"] else "?"
        name = _BY_KEY.get(key) or _BY_KEY.get(key.upper())
        if name is None:
            problems.append(ConfigProblem(key, "is not a known setting"))
            continue
        if name in failed:
            continue
        failed.add(name)
        if err["type"] == "missing":
            problems.append(ConfigProblem(_env_name(name), f"is required (a URL like {_URL_HINT})"))
            continue
        rule = err["msg"] if err["type"] == "poolwarden" else _FIELDS[name].description or "invalid"
        problems.append(ConfigProblem(_env_name(name), rule, _masked_input(name, err["input"])))
    return problems, failed


def _unknown_variables(environ: Mapping[str, str]) -> list[ConfigProblem]:
    """Likely typos: unknown ``DB_POOL_*`` variables, and ``DB_*``/``DATABASE_*`` ones that are
    a near miss of a known name. Other ``DB_*`` variables (DB_HOST, ...) belong to others."""
    out = []
    for key in sorted(environ):
        var = key.upper()
        if var in _KNOWN or not var.startswith(("DB_", "DATABASE_")):
            continue
        close = difflib.get_close_matches(var, _KNOWN, n=1, cutoff=0.85)
        if close or var.startswith("DB_POOL_"):
            hint = f"; did you mean {close[0]}?" if close else ""
            out.append(ConfigProblem(var, f"is not a known setting{hint}"))
    return out
