"""``python -m tmb`` behaves like the ``tmb`` console script."""

from tmb.cli import main

raise SystemExit(main())
