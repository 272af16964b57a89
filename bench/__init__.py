"""poolwarden's benchmark harness: poolwarden side by side with its peers and the limits.

Run it with ``python -m bench`` (``--quick`` for a short run); see ``bench/README.md``.
"""
