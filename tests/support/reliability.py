"""Figures the reliability tests report (docs/reliability.md quotes them).

``report(tmp_path, name, **figures)`` prints one ``RELIABILITY <name>: k=v ...`` line (visible
with ``pytest -s``) and appends the same figures as a JSON line to
``<pytest basetemp>/reliability.jsonl``, so the lead can copy them after a run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def report(tmp_path: Path, name: str, **figures: Any) -> Path:
    """Print and record ``figures`` for test ``name``; return the summary file's path."""
    line = " ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\nRELIABILITY {name}: {line}")
    out = tmp_path.parent / "reliability.jsonl"
    with open(out, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"test": name, "pid": os.getpid(), **figures}) + "\n")
    return out


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB, from /proc/<pid>/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")
