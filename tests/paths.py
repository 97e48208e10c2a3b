"""Re-export of ``support.paths`` for ``tests/test_table.py`` until it imports ``support.paths``;
delete this file then."""

from support.paths import *  # noqa: F403
from support.paths import CAPTURES as CAPTURES
from support.paths import SEED_RULES as SEED_RULES
