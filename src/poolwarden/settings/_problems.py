"""Problems in terms of environment variables: pydantic's errors translated (one per setting,
inputs masked) and unknown ``DB_*``/``DATABASE_*`` variables that look like typos."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo

from .._secrets import mask_dsn
from ..errors import ConfigProblem
from ._parse import URL_HINT, split_urls

SECRET_FIELDS = ("database_url", "replica_urls")


class VariableNames:
    """The environment variable that names each field of a settings class, and the way back."""

    def __init__(self, fields: Mapping[str, FieldInfo]) -> None:
        self.fields = fields
        self.known = {self.env_name(n) for n in fields}
        self._by_key = {**{n: n for n in fields}, **{self.env_name(n): n for n in fields}}

    def env_name(self, name: str) -> str:
        """The variable of field ``name``: its alias, else ``DB_`` + the name upper-cased."""
        alias = self.fields[name].validation_alias
        return alias if isinstance(alias, str) else f"DB_{name.upper()}"

    def field(self, key: str) -> str | None:
        """The field that ``key`` (a field name or a variable, any case) names, or None."""
        return self._by_key.get(key) or self._by_key.get(key.upper())


def masked_input(name: str, value: object) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if name in SECRET_FIELDS:
        text = value if isinstance(value, str) else ",".join(split_urls(value))
        return repr(mask_dsn(text))
    text = repr(value)
    return mask_dsn(text[:200])


def translate(
    exc: ValidationError, names: VariableNames
) -> tuple[list[ConfigProblem], set[str]]:
    """One problem per field from pydantic's errors, named by variable, values masked."""
    problems: list[ConfigProblem] = []
    failed: set[str] = set()
    for err in exc.errors(include_url=False, include_context=False):
        key = str(err["loc"][0]) if err["loc"] else "?"
        name = names.field(key)
        if name is None:
            problems.append(ConfigProblem(key, "is not a known setting"))
            continue
        if name in failed:
            continue
        failed.add(name)
        env = names.env_name(name)
        if err["type"] == "missing":
            problems.append(ConfigProblem(env, f"is required (a URL like {URL_HINT})"))
            continue
        rule = err["msg"] if err["type"] == "poolwarden" else (
            names.fields[name].description or "invalid")
        problems.append(ConfigProblem(env, rule, masked_input(name, err["input"])))
    return problems, failed


def unknown_variables(environ: Mapping[str, str], names: VariableNames) -> list[ConfigProblem]:
    """Likely typos: unknown ``DB_POOL_*`` variables, and ``DB_*``/``DATABASE_*`` ones that are
    a near miss of a known name. Other ``DB_*`` variables (DB_HOST, ...) belong to others."""
    out = []
    for key in sorted(environ):
        var = key.upper()
        if var in names.known or not var.startswith(("DB_", "DATABASE_")):
            continue
        close = difflib.get_close_matches(var, names.known, n=1, cutoff=0.85)
        if close or var.startswith("DB_POOL_"):
            hint = f"; did you mean {close[0]}?" if close else ""
            out.append(ConfigProblem(var, f"is not a known setting{hint}"))
    return out
