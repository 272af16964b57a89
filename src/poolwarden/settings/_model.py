"""The :class:`DatabaseSettings` model: its fields, their validators, construction (every
problem at once, presets applied), the cross-field rules and the views it gives (masked
description, :class:`~poolwarden.pool.config.PoolConfig`, SQLAlchemy URL)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, urlencode, urlsplit

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .._secrets import mask_dsn
from ..errors import ConfigProblem, ConfigurationError
from ..pool.config import PoolConfig, ResetPolicy
from ..protect.admission import AdmissionConfig
from ..protect.limiter import LimiterConfig
from ._environ import ENVIRON, EnvSource, current_environ
from ._parse import (
    BOOL_RULE,
    FILE_RULE,
    URL_HINT,
    duration_field,
    int_field,
    normalise_url,
    parse_duration,
    split_urls,
)
from ._presets import POOL_DEFAULTS, PRESETS, TO_POOL, PresetName
from ._problems import SECRET_FIELDS, VariableNames, translate, unknown_variables
from ._tls import SSLMode, client_ssl, ssl_problems

Driver = Literal["asyncpg", "psycopg"]

_PLACEHOLDER_URL = "postgresql://placeholder/placeholder"
_D = POOL_DEFAULTS  # short, for the field table below


class DatabaseSettings(BaseSettings):
    """Settings of one PostgreSQL cluster (primary + optional replicas), sealed after validation.

    Raises :class:`~poolwarden.errors.ConfigurationError` listing every problem at once.
    """

    model_config = SettingsConfigDict(
        env_prefix="DB_", case_sensitive=False, env_ignore_empty=True, frozen=True,
        populate_by_name=True, extra="forbid", hide_input_in_errors=True,
    )

    database_url: SecretStr = Field(
        validation_alias="DATABASE_URL", description=f"is required: a URL like {URL_HINT}")
    replica_urls: tuple[SecretStr, ...] = Field(
        (), validation_alias="DATABASE_REPLICA_URLS",
        description="must be a comma-separated list of PostgreSQL URLs")
    preset: PresetName | None = Field(
        None, description=f"must be one of: {', '.join(PRESETS)}")
    pool_size: int = int_field(_D["pool_size"], 1)
    max_overflow: int = int_field(_D["max_overflow"], 0)
    pool_min_size: int = int_field(_D["pool_min_size"], 0)
    pool_max_waiting: int = int_field(_D["pool_max_waiting"], 0)
    pool_timeout: float = duration_field(_D["pool_timeout"], minimum=0, strict=True)
    pool_recycle: float = duration_field(_D["pool_recycle"], minimum=0, strict=True)
    pool_idle_timeout: float = duration_field(_D["pool_idle_timeout"], minimum=0, strict=True)
    pool_pre_ping: bool = Field(_D["pool_pre_ping"], description=BOOL_RULE)
    pool_ping_after_idle: float = duration_field(
        _D["pool_ping_after_idle"], minimum=0, strict=False)
    pool_reset: ResetPolicy = Field(
        _D["pool_reset"], description=f"must be one of: {', '.join(p.value for p in ResetPolicy)}")
    echo: bool = Field(False, description=BOOL_RULE)
    echo_pool: bool = Field(False, description=BOOL_RULE)
    slow_query_threshold: float = duration_field(1.0, minimum=0, strict=True)
    log_query_params: bool = Field(False, description=BOOL_RULE)
    pool_admission: bool = Field(False, description=BOOL_RULE)
    pool_adaptive_limit: bool = Field(False, description=BOOL_RULE)
    breaker: bool = Field(True, description=BOOL_RULE)
    leak_threshold: float | None = duration_field(None, minimum=0, strict=True)
    statement_timeout: float | None = duration_field(None, minimum=0, strict=False)
    lock_timeout: float | None = duration_field(None, minimum=0, strict=False)
    idle_in_transaction_timeout: float | None = duration_field(None, minimum=0, strict=False)
    connect_timeout: float = duration_field(_D["connect_timeout"], minimum=0, strict=True)
    command_timeout: float = duration_field(_D["command_timeout"], minimum=0, strict=True)
    application_name: str = Field(
        _D["application_name"], pattern=r"^[\x20-\x7e]{1,63}$",
        description="must be 1 to 63 printable ASCII characters (PostgreSQL truncates longer)")
    ssl_mode: SSLMode | None = Field(
        None, description="must be one of: disable, allow, prefer, require, verify-ca, "
        "verify-full")
    ssl_ca: Path | None = Field(None, description=FILE_RULE)
    ssl_cert: Path | None = Field(None, description=FILE_RULE)
    ssl_key: Path | None = Field(None, description=FILE_RULE)
    statement_cache_size: int = int_field(_D["statement_cache_size"], 0)

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
        problems += unknown_variables(current_environ(), _NAMES)
        if problems:
            raise ConfigurationError(problems)

    def _parse(self, values: dict[str, Any]) -> tuple[list[ConfigProblem], set[str]]:
        """Run pydantic on ``values`` + the environment; translate its errors (not chained)."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            return translate(exc, _NAMES)
        return [], set()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> DatabaseSettings:
        """Settings from ``env`` (default: ``os.environ``) and ``overrides`` (which win).

        With a mapping, the process environment is not read at all.
        """
        token = ENVIRON.set(env)
        try:
            return cls(**overrides)
        finally:
            ENVIRON.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, EnvSource(settings_cls, current_environ()))

    @field_validator("database_url", mode="before")
    @classmethod
    def _check_url(cls, value: object) -> SecretStr:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(raw, str):
            raise PydanticCustomError("poolwarden", f"must be a URL like {URL_HINT}")
        try:
            return SecretStr(normalise_url(raw))
        except ValueError as exc:
            raise PydanticCustomError("poolwarden", str(exc)) from None

    @field_validator("replica_urls", mode="before")
    @classmethod
    def _check_replicas(cls, value: object) -> tuple[SecretStr, ...]:
        urls, errors = [], []
        for i, raw in enumerate(split_urls(value), start=1):
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
            raise ValueError(FILE_RULE)
        return path

    # -- cross-field rules ----------------------------------------------------------------

    def _rule_problems(self, failed: set[str]) -> list[ConfigProblem]:
        """Every cross-field rule broken; a rule involving a field that failed to parse is
        skipped (its parse error is already reported)."""
        out: list[ConfigProblem] = []

        def need(ok: bool, fields: tuple[str, ...], rule: str) -> None:
            if not ok and not failed.intersection(fields):
                variable = _NAMES.env_name(fields[0])
                out.append(ConfigProblem(variable, rule, self._shown(fields[0])))

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
        ssl_fields = {"ssl_mode", "ssl_ca", "ssl_cert", "ssl_key", "database_url"}
        if not failed & ssl_fields:
            out += ssl_problems(self.ssl_mode, self._url_query(),
                                self.ssl_ca, self.ssl_cert, self.ssl_key)
        primary = self.database_url.get_secret_value()
        replicas = [u.get_secret_value() for u in self.replica_urls]
        need(primary not in replicas, ("replica_urls", "database_url"),
             "must not contain the primary's DATABASE_URL")
        need(len(set(replicas)) == len(replicas), ("replica_urls",), "must not repeat a URL")
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
        return {_NAMES.env_name(n): s for n, s in self._sources.items()}

    def describe(self) -> list[tuple[str, str, str]]:
        """``(variable, value, source)`` for every setting, values masked, in declaration order."""
        return [(_NAMES.env_name(n), self._display(n), s) for n, s in self._sources.items()]

    def pool_config(self, name: str = "primary") -> PoolConfig:
        """The pool core's configuration for the primary, named ``name``.

        ``ssl`` is an :class:`ssl.SSLContext` when certificate files are set, else the
        ``DB_SSL_MODE`` string (or ``None``: asyncpg then honours ``sslmode`` in the URL).
        """
        options: dict[str, Any] = {
            pool: getattr(self, setting) for setting, pool in TO_POOL.items()}
        options["admission"] = AdmissionConfig() if self.pool_admission else None
        options["limiter"] = LimiterConfig() if self.pool_adaptive_limit else None
        if not self.breaker:
            options["breaker"] = None
        ssl = client_ssl(self.ssl_mode, self._url_query().get("sslmode"),
                         self.ssl_ca, self.ssl_cert, self.ssl_key)
        return PoolConfig(dsn=self.dsn, name=name, ssl=ssl, **options)

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
            yield name, self._display(name) if name in SECRET_FIELDS else value

    # -- helpers --------------------------------------------------------------------------

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


# Built once the class, and so its fields, exist; the methods above read it when called.
_NAMES = VariableNames(DatabaseSettings.model_fields)
