"""Integrations with web frameworks, each behind its own optional extra.

- :mod:`poolwarden.integrations.fastapi` (public name :mod:`poolwarden.fastapi`): lifespan,
  dependencies, health and metrics routes, exception handlers, request deadlines.
"""
