"""The runtime matcher: a :class:`Matcher` per consumer over one shared compiled table.

It owns what changes while traffic flows (value caches, the re-tuned pre-filter, the tuning
thread); the table (:mod:`ruletag.rules.compiler`) never changes.
"""

from ruletag.rules.matcher.table import Matcher

__all__ = ["Matcher"]
