"""Code generation: rule formulas (and pre-filter requirements) as compiled Python functions.

Each rule formula becomes ``def _r<N>(h, L): return ...`` over the set ``h`` of the scanned
atoms that hit and ``L(i)``, the lazily evaluated leaf ``i``; the module is compiled once
(and ``marshal``-ed in the table file) and executed into a tuple of functions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ruletag.rules.ir import And, Const, Node, Not, Or

__all__ = ["CodeGen", "Formula", "compile_pieces", "exec_formulas", "exec_pieces"]

Hits = set[int]
#: A compiled rule formula: (atoms hit, lazy leaf by atom) -> does the rule hold.
Formula = Callable[[Hits, Callable[[int], bool]], bool]


class CodeGen:
    """Turns rule formulas into one Python module of ``def _r<N>(h, L): return ...``."""

    def __init__(self, atom_of: Mapping[Node, int], eager: frozenset[int]) -> None:
        self.atom_of = atom_of
        self.eager = eager
        self.consts: list[frozenset[int]] = []

    def _set(self, ids: Iterable[int]) -> str:
        self.consts.append(frozenset(ids))
        return f"_S[{len(self.consts) - 1}]"

    def expr(self, n: Node) -> str:
        if isinstance(n, Const):
            return "True" if n.value else "False"
        if isinstance(n, Not):
            return f"(not {self.expr(n.arg)})"
        if isinstance(n, And | Or):
            atoms = [self.atom_of[a] for a in n.args if self._is_eager(a)]
            rest = [self.expr(a) for a in n.args if not self._is_eager(a)]
            parts: list[str] = []
            if len(atoms) == 1:
                parts.append(f"({atoms[0]} in h)")
            elif atoms:
                s = self._set(atoms)
                parts.append(f"({s} <= h)" if isinstance(n, And) else f"(not h.isdisjoint({s}))")
            parts.extend(rest)
            return "(" + (" and " if isinstance(n, And) else " or ").join(parts) + ")"
        i = self.atom_of[n]
        return f"({i} in h)" if i in self.eager else f"L({i})"

    def _is_eager(self, n: Node) -> bool:
        return not isinstance(n, And | Or | Not | Const) and self.atom_of[n] in self.eager

    def module(self, formulas: Sequence[Node]) -> str:
        lines = [f"def _r{k}(h, L):\n    return {self.expr(f)}" for k, f in enumerate(formulas)]
        lines.append(f"_RULES = ({''.join(f'_r{k}, ' for k in range(len(formulas)))})")
        return "\n".join(lines) + "\n"


def exec_formulas(code: Any, consts: Sequence[frozenset[int]]) -> tuple[Formula, ...]:
    """The rule functions of the compiled module ``code`` (``consts``: its ``_S`` sets)."""
    ns: dict[str, Any] = {"_S": tuple(consts)}
    old = sys.getrecursionlimit()
    exec(code, ns)
    sys.setrecursionlimit(old)
    return ns["_RULES"]


def compile_pieces(source: str, piece: int = 1 << 16) -> tuple[Any, ...]:
    """``source`` compiled in pieces of about ``piece`` characters, cut between functions, so
    the compiler's peak memory follows the piece size rather than the whole module's."""
    out: list[Any] = []
    start = 0
    while start < len(source):
        cut = source.find("\ndef ", start + piece)
        end = len(source) if cut < 0 else cut + 1
        out.append(compile(source[start:end], "<ruletag-raw>", "exec"))
        start = end
    return tuple(out)


def exec_pieces(
    code: Sequence[Any], consts: Sequence[frozenset[int]]
) -> dict[int, Callable[[set[int], dict[int, bool]], bool]]:
    """The requirement functions (rule -> function) of :func:`compile_pieces` output."""
    ns: dict[str, Any] = {"_S": tuple(consts)}
    for piece in code:
        exec(piece, ns)
    return ns["_REQS"]
