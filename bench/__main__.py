"""``python -m bench``: run the benchmark (see ``bench/README.md``)."""

from .run import main

raise SystemExit(main())
