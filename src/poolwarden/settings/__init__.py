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

Where things live (private modules, re-exported here):

- ``_model``: :class:`DatabaseSettings`: fields, validators, construction, cross-field rules,
  views (:meth:`~DatabaseSettings.pool_config`, :meth:`~DatabaseSettings.sqlalchemy_url`, ...).
- ``_parse``: value parsing (:func:`parse_duration`, :func:`normalise_url`, URL lists) and the
  field declarations that carry each value's rule text.
- ``_tls``: ``sslmode`` values (:data:`SSLMode`), the client SSL context, the TLS rules.
- ``_presets``: :data:`PRESETS` and the :class:`~poolwarden.pool.config.PoolConfig` defaults.
- ``_environ``: which environment a construction reads (``from_env(mapping)`` or ``os.environ``).
- ``_problems``: pydantic's errors as :class:`~poolwarden.errors.ConfigProblem` (masked),
  unknown ``DB_*``/``DATABASE_*`` variables.
"""

from __future__ import annotations

from ._model import DatabaseSettings
from ._model import Driver as Driver
from ._parse import normalise_url, parse_duration
from ._presets import PRESETS
from ._presets import PresetName as PresetName
from ._tls import SSLMode

__all__ = ["PRESETS", "DatabaseSettings", "SSLMode", "normalise_url", "parse_duration"]
