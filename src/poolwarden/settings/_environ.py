"""The environment a construction reads, and the settings source over it."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Mapping
from typing import Any

from pydantic_settings import BaseSettings, EnvSettingsSource

# The environment a construction reads; None means os.environ. A ContextVar so that
# from_env(mapping) never touches the process environment and is safe across tasks.
ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "poolwarden_settings_environ", default=None
)


def current_environ() -> Mapping[str, str]:
    """The mapping set in :data:`ENVIRON`, else ``os.environ``."""
    environ = ENVIRON.get()
    return os.environ if environ is None else environ


class EnvSource(EnvSettingsSource):
    """Environment source over a given mapping, leaving values undecoded (our validators parse
    them; pydantic-settings would otherwise try JSON on the replica list)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items() if not self.env_ignore_empty or v}

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        return value
