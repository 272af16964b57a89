"""A small users-and-orders service on poolwarden's FastAPI integration (see README.md)."""
