"""MITRE ATT&CK id <-> name lookups from the table shipped as package data.

CONTRACT STUB — signatures fixed, bodies being written.
"""

from __future__ import annotations

from ruletag.rules.ir import Attack


def tactic_by_shortname(shortname: str) -> Attack | None:
    """``"defense-evasion"``/``"defense_evasion"``/``"stealth"`` -> the tactic, or None."""
    return None


def tactic_by_id(tactic_id: str) -> Attack | None:
    """``"TA0005"`` -> the tactic, or None."""
    return None


def technique(technique_id: str) -> Attack | None:
    """``"T1218"`` or ``"T1218.011"`` (any case) -> the technique, or None."""
    return None
