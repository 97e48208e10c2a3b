"""Stateful detections: engines that keep state across records, fed in arrival order.

Every engine follows :class:`Engine`. :func:`stateful_engines` builds one engine of each kind
that a rule set needs, from the builders listed in :func:`builders`. A new kind of stateful
rule adds its builder there and its annotation to
:func:`ruletag.enrich.annotate.stateful_detection`; ``ruletag match`` and the relay then run it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    from ruletag.rules.fields import FieldMap
    from ruletag.rules.ir import Rule

__all__ = ["Clocked", "Engine", "builders", "stateful_engines"]


class Engine(Protocol):
    """What every stateful engine offers its callers."""

    #: the rule kind it runs (``Rule.kind``)
    kind: str

    def step_hits(
        self, entries: bytes, spans: Sequence[tuple[int, int]]
    ) -> dict[int, list[int]] | None:
        """Entry index -> the engine's own condition hits for packed ``[time, record]``
        entries, so that only those records need :meth:`feed`; None: feed every record."""
        ...

    def feed(self, record: Mapping[str, object], hits: Sequence[int] | None = None) -> list[Any]:
        """Offer one record (``hits``: its :meth:`step_hits` when known); what it completes."""
        ...

    def stats(self) -> dict[str, int]:
        """Live state and counters, summed over the engine's rules."""
        ...


@runtime_checkable
class Clocked(Protocol):
    """An engine some of whose results wait for event time to pass (EQL missing events): the
    watermark is the latest event time seen minus ``lateness`` seconds."""

    lateness: float

    def pending(self) -> int:
        """Results waiting for the watermark; while any, show every record to :meth:`observe`."""
        ...

    def observe(self, record: Mapping[str, object]) -> list[Any]:
        """A record the engine was not fed moves the watermark; the results that releases."""
        ...

    def flush(self) -> list[Any]:
        """End of input: every waiting result, decided now."""
        ...


Builder = Callable[["Iterable[Rule]", "FieldMap | None"], "Engine | None"]


def builders() -> list[Builder]:
    """The engine builders, one per stateful rule kind (imported late: no import cycle)."""
    from ruletag.rules.stateful.aggregation import AggregationEngine
    from ruletag.rules.stateful.correlation import CorrelationEngine
    from ruletag.rules.stateful.newterms import NewTermsEngine
    from ruletag.rules.stateful.sample import SampleEngine
    from ruletag.rules.stateful.sequence import SequenceEngine
    from ruletag.rules.stateful.threshold import ThresholdEngine

    return [
        SequenceEngine.of,
        ThresholdEngine.of,
        NewTermsEngine.of,
        CorrelationEngine.of,
        SampleEngine.of,
        AggregationEngine.of,
    ]


def stateful_engines(
    rules: Iterable[Rule],
    fieldmap: FieldMap | None = None,
    cache_dir: str | Path | None = None,
    version: str | None = None,
) -> list[Engine]:
    """One engine per stateful rule kind present in ``rules``; their step tables cached in
    ``cache_dir`` when given (:mod:`.tables`; ``version``: the rules' table version)."""
    from ruletag.rules.stateful.tables import step_cache

    found = list(rules)
    with step_cache(cache_dir, version):
        return [e for build in builders() if (e := build(found, fieldmap)) is not None]
