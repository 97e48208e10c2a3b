"""Field mapping: which record paths can supply a rule's field, and logsource conditions.

CONTRACT STUB — signatures fixed, bodies being written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ruletag.rules.ir import Logsource, Node


class RecordView:
    """One record seen through the field mapping (built per record, values cached)."""

    def values(self, field: str) -> list[object]:
        """Every value the record has for ``field`` (lists flattened); ``[]`` when absent.

        ``None`` values are dropped, so ``[]`` means missing-or-null.
        """
        raise NotImplementedError

    def strings(self) -> list[str]:
        """Every scalar value in the record as text, for Sigma keywords."""
        raise NotImplementedError


class FieldMap:
    """The editable mapping shipped as ``ruletag/data/fields.yaml``."""

    @classmethod
    def default(cls) -> FieldMap:
        raise NotImplementedError

    @classmethod
    def load(cls, path: Path) -> FieldMap:
        raise NotImplementedError

    def view(self, record: Mapping[str, object]) -> RecordView:
        raise NotImplementedError

    def logsource_condition(self, logsource: Logsource) -> Node | None:
        """The condition a record must meet to be in this logsource; None = no restriction."""
        raise NotImplementedError

    @property
    def version(self) -> str:
        """Content hash of the mapping (part of the table cache key)."""
        raise NotImplementedError
