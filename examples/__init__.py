"""Example applications built on poolwarden (importable, so that servers can load them)."""
