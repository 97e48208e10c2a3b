"""Rule selection: which loaded rules go into the table (``rules.select`` and the CLI flags).

A :class:`Selection` is the ``rules.select`` section plus the older ``rules.exclude`` (ids or
names) and ``rules.building_blocks`` keys. :meth:`Selection.apply` runs its filters in a fixed
order over the loaded rules, before compile, and reports how many rules each filter left out;
:meth:`Selection.key` is the part of the compiled-table cache key it adds.

How each filter reads a rule:

* ``sources``: ``Rule.source``.
* ``status``: Sigma ``status``; Elastic ``maturity`` as a Sigma status (production = stable,
  development = experimental); a rule without one counts as ``experimental``.
* ``min_level``: Sigma ``level`` / Elastic ``severity``, ordered informational < low < medium
  < high < critical.
* ``rule_types``: the Elastic rule ``type``; Sigma rules are not affected.
* ``logsource`` include/exclude: ``key=glob`` items over the Sigma logsource's product,
  category and service (an item matches when all its keys do); Elastic rules carry no
  logsource and are not affected (select them by tags such as ``"OS: Windows"``).
* ``tags`` include/exclude: globs, compared case-insensitively with ``_`` and blanks read as
  ``-`` and blanks around ``:`` dropped (``"Tactic: Execution"`` = ``tactic:execution``),
  against the rule's tags, its ATT&CK tactics (``attack.execution``, ``TA0002``) and
  techniques (``attack.t1059.001``, ``T1059.001``, and the parent ``T1059``), so ``T1059``
  selects its sub-techniques too.
* ``building_blocks: drop``: Elastic building-block rules; ``exclude``: id or name globs
  (case-sensitive, as before).
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ruletag.config.model import (
    LEVELS,
    MATURITY_STATUS,
    NO_STATUS,
    RULE_SOURCES,
    RulesConfig,
    SelectConfig,
)
from ruletag.rules import attack
from ruletag.rules.ir import Rule

_DEFAULT = SelectConfig()


def rule_status(rule: Rule) -> str:
    """The Sigma status a rule is selected by (Elastic maturities mapped, none = experimental)."""
    status = rule.status.strip().lower()
    if rule.source == "elastic":
        status = MATURITY_STATUS.get(status, status)
    return status or NO_STATUS


def _norm(text: str) -> str:
    """``"Tactic: Defense Evasion"`` -> ``"tactic:defense-evasion"``; ``_`` -> ``-``."""
    text = re.sub(r"\s*:\s*", ":", text.strip().lower().replace("_", "-"))
    return "-".join(text.split())


def rule_tags(rule: Rule) -> set[str]:
    """The normalized names a ``tags`` pattern is matched against (see the module doc)."""
    out = {_norm(t) for t in rule.tags}
    for t in rule.tactics:
        names = {_norm(t.name)} if t.name else set()
        if t.id:
            out.update((t.id.lower(), f"attack.{t.id.lower()}"))
            names.update(attack.tactic_shortnames(t.id))
        out.update(f"attack.{n}" for n in names)
    for t in rule.techniques:
        tid = t.id.lower()
        for i in {tid, tid.split(".")[0]}:
            out.update((i, f"attack.{i}"))
    return out


def _globs(patterns: Iterable[str], norm: Callable[[str], str] = _norm) -> re.Pattern[str]:
    return re.compile("|".join(fnmatch.translate(norm(p)) for p in patterns))


def _logsource_matcher(items: Sequence[str]) -> Callable[[Rule], bool]:
    """True when the rule's logsource matches one of ``items`` (``key=glob,...``)."""
    compiled = []
    for item in items:
        pairs = dict(part.split("=", 1) for part in item.split(","))
        compiled.append({k: re.compile(fnmatch.translate(v)) for k, v in pairs.items()})

    def match(rule: Rule) -> bool:
        ls = rule.logsource
        assert ls is not None
        for item in compiled:
            if all(rx.match((getattr(ls, k) or "").lower()) for k, rx in item.items()):
                return True
        return False

    return match


@dataclass(frozen=True, slots=True)
class Step:
    """One filter's outcome: its name, its setting as text, the rules it left out."""

    filter: str
    setting: str
    left_out: int
    kept: int


@dataclass
class SelectionReport:
    """How many rules were loaded, kept, and left out by each filter (in the order applied)."""

    loaded: int = 0
    kept: int = 0
    steps: list[Step] = field(default_factory=list)
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)  # loaded / kept

    def left_out(self, name: str) -> int:
        return sum(s.left_out for s in self.steps if s.filter == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "kept": self.kept,
            "filters": [asdict(s) for s in self.steps],
            "by_source": self.by_source,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SelectionReport:
        steps = [Step(**s) for s in data.get("filters", ())]
        by_source = {k: dict(v) for k, v in data.get("by_source", {}).items()}
        return cls(int(data.get("loaded", 0)), int(data.get("kept", 0)), steps, by_source)

    def text(self) -> str:
        """``selection: 28 loaded, 12 kept (status stable,test: 6 left out; ...)``."""
        parts = [f"{s.filter} {s.setting}: {s.left_out} left out" for s in self.steps]
        detail = f" ({'; '.join(parts)})" if parts else ""
        return f"selection: {self.loaded} loaded, {self.kept} kept{detail}"


Filter = tuple[str, str, Callable[[Rule], bool]]


@dataclass(frozen=True, slots=True)
class Selection:
    """Everything that decides which loaded rules go into the table."""

    select: SelectConfig = field(default_factory=SelectConfig)
    exclude: tuple[str, ...] = ()  # rule id / name globs (``rules.exclude``)
    building_blocks: str = "keep"  # keep | drop (``rules.building_blocks``)

    @classmethod
    def from_config(cls, rules: RulesConfig | None) -> Selection:
        if rules is None:
            return cls()
        return cls(rules.select, tuple(rules.exclude), rules.building_blocks)

    def key(self) -> str:
        """Canonical text of the settings that differ from the defaults ("" if none)."""
        changed = {k: v for k, v in asdict(self.select).items() if v != getattr(_DEFAULT, k)}
        if self.exclude:
            changed["exclude"] = sorted(self.exclude)
        if self.building_blocks != "keep":
            changed["building_blocks"] = self.building_blocks
        return json.dumps(changed, sort_keys=True) if changed else ""

    def filters(self) -> list[Filter]:
        """The active filters, in the order :meth:`apply` runs them: (name, setting, keep)."""
        sel = self.select
        out: list[Filter] = []
        if set(sel.sources) != set(RULE_SOURCES):
            sources = frozenset(sel.sources)
            out.append(("sources", ",".join(sel.sources), lambda r: r.source in sources))
        statuses = frozenset(sel.status)
        out.append(("status", ",".join(sel.status), lambda r: rule_status(r) in statuses))
        if sel.min_level != LEVELS[0]:
            lowest = LEVELS.index(sel.min_level)
            levels = frozenset(LEVELS[lowest:])
            out.append(("min_level", sel.min_level, lambda r: r.severity in levels))
        if sel.rule_types:
            types = frozenset(sel.rule_types)
            out.append(
                (
                    "rule_types",
                    ",".join(sel.rule_types),
                    lambda r: r.source != "elastic" or r.rule_type in types,
                )
            )
        if sel.logsource:
            inc = _logsource_matcher(sel.logsource)
            out.append(
                ("logsource", " | ".join(sel.logsource), lambda r: r.logsource is None or inc(r))
            )
        if sel.exclude_logsource:
            exc = _logsource_matcher(sel.exclude_logsource)
            out.append(
                (
                    "exclude_logsource",
                    " | ".join(sel.exclude_logsource),
                    lambda r: r.logsource is None or not exc(r),
                )
            )
        if sel.tags:
            tag_in = _globs(sel.tags)
            out.append(
                ("tags", ",".join(sel.tags), lambda r: any(tag_in.match(t) for t in rule_tags(r)))
            )
        if sel.exclude_tags:
            tag_out = _globs(sel.exclude_tags)
            out.append(
                (
                    "exclude_tags",
                    ",".join(sel.exclude_tags),
                    lambda r: not any(tag_out.match(t) for t in rule_tags(r)),
                )
            )
        if self.building_blocks == "drop":
            out.append(("building_blocks", "drop", lambda r: not r.building_block))
        if self.exclude:
            rx = _globs(self.exclude, norm=lambda p: p)
            out.append(
                (
                    "exclude",
                    ",".join(self.exclude),
                    lambda r: not (rx.match(r.id) or rx.match(r.name)),
                )
            )
        return out

    def apply(self, rules: Sequence[Rule]) -> tuple[list[Rule], SelectionReport]:
        """The rules every filter keeps (order kept), and the report."""
        kept = list(rules)
        report = SelectionReport(loaded=len(kept))
        for name, setting, keep in self.filters():
            before = len(kept)
            kept = [r for r in kept if keep(r)]
            report.steps.append(Step(name, setting, before - len(kept), len(kept)))
        report.kept = len(kept)
        for counted, rs in (("loaded", rules), ("kept", kept)):
            for r in rs:
                counts = report.by_source.setdefault(r.source, {"loaded": 0, "kept": 0})
                counts[counted] += 1
        return kept, report
