"""``python -m modeling.cli``: the ``fspo`` command."""

from . import main

raise SystemExit(main())
