"""The rule compiler: rules (IR) -> one immutable :class:`CompiledTable`, and table files.

``build`` compiles (``table.py`` with ``codegen.py``, ``hyperscan.py`` and ``prefilter.py``),
``save``/``load`` write and read table files (``store.py``). Matching a table is the
business of :mod:`ruletag.rules.matcher`.
"""

from ruletag.rules.compiler.store import TableError, load, save
from ruletag.rules.compiler.table import CompiledTable, build

__all__ = ["CompiledTable", "TableError", "build", "load", "save"]
