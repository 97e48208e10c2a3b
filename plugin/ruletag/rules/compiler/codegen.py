"""Code generation: rule formulas (and pre-filter requirements) as compiled Python functions.

Each rule formula becomes ``def _r<N>(h, L): return ...`` over the set ``h`` of the scanned
atoms that hit and ``L(i)``, the lazily evaluated leaf ``i``; the module is compiled once
(and ``marshal``-ed in the table file) and executed into a tuple of functions.

The same formulas also become *programs*, plain nested tuples the C evaluator of the
matcher walks (``_native.holding``) with the same short-circuit order as the generated
code: an int ``i`` is the scanned atom test ``i in h``, ``True``/``False`` a constant, and a
tuple starts with its operator: ``(AND, *args)``, ``(OR, *args)``, ``(NOT, arg)``,
``(LAZY, i)`` (``L(i)``), ``(ALL, ids)`` (``ids <= h``), ``(ANY, ids)`` (``not
h.isdisjoint(ids)``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ruletag.rules.ir import And, Const, Node, Not, Or

__all__ = [
    "ALL",
    "AND",
    "ANY",
    "LAZY",
    "NOT",
    "OR",
    "CodeGen",
    "Formula",
    "Program",
    "compile_pieces",
    "exec_formulas",
    "exec_pieces",
]

Hits = set[int]
#: A compiled rule formula: (atoms hit, lazy leaf by atom) -> does the rule hold.
Formula = Callable[[Hits, Callable[[int], bool]], bool]
#: A rule formula as data (see the module docstring).
Program = int | bool | tuple[Any, ...]
#: the operators of a program node
AND, OR, NOT, LAZY, ALL, ANY = range(6)


class CodeGen:
    """Turns rule formulas into one Python module of ``def _r<N>(h, L): return ...``."""

    def __init__(self, atom_of: Mapping[Node, int], eager: frozenset[int]) -> None:
        self.atom_of = atom_of
        self.eager = eager
        self.consts: list[frozenset[int]] = []
        self._const_index: dict[frozenset[int], int] = {}

    def _set(self, ids: Iterable[int]) -> str:
        return f"_S[{self._index(ids)}]"

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
            if not parts:  # all of nothing holds, any of nothing does not
                return "True" if isinstance(n, And) else "False"
            return "(" + (" and " if isinstance(n, And) else " or ").join(parts) + ")"
        i = self.atom_of[n]
        return f"({i} in h)" if i in self.eager else f"L({i})"

    def program(self, n: Node) -> Program:
        """``n`` as a program: the same tests in the same order as :meth:`expr`'s code."""
        if isinstance(n, Const):
            return bool(n.value)
        if isinstance(n, Not):
            return (NOT, self.program(n.arg))
        if isinstance(n, And | Or):
            atoms = [self.atom_of[a] for a in n.args if self._is_eager(a)]
            parts: list[Program] = []
            if len(atoms) == 1:
                parts.append(atoms[0])
            elif atoms:
                parts.append((ALL if isinstance(n, And) else ANY, self.consts[self._index(atoms)]))
            parts.extend(self.program(a) for a in n.args if not self._is_eager(a))
            return (AND if isinstance(n, And) else OR, *parts)
        i = self.atom_of[n]
        return i if i in self.eager else (LAZY, i)

    def _index(self, ids: Iterable[int]) -> int:
        """The index in :attr:`consts` of the set ``ids`` (added when new)."""
        s = frozenset(ids)
        k = self._const_index.get(s)
        if k is None:
            k = self._const_index[s] = len(self.consts)
            self.consts.append(s)
        return k

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
