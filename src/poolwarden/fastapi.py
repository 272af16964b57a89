"""``poolwarden.fastapi``: the public name of :mod:`poolwarden.integrations.fastapi`
(everything in its ``__all__``, re-exported; the list lives there only).

This module does not shadow the ``fastapi`` package: imports are absolute, so inside
poolwarden ``import fastapi`` is still FastAPI itself.
"""

from .integrations.fastapi import *  # noqa: F403
from .integrations.fastapi import __all__ as _names

__all__ = list(_names)  # the list is kept once, in the integration package
