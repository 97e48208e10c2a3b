"""Allow ``python -m ruletag``."""

from ruletag.cli import main

raise SystemExit(main())
