"""Generate ``plugin/ruletag/data/field_types.json``: Elasticsearch field types for KQL/EQL.

Kibana compiles a KQL query against the index mapping, so a rule's meaning depends on each
field's type (``keyword`` exact and case-sensitive, ``text`` analyzed, ``ip`` with CIDR, ...).
The shipped table is made from two public sources::

    python scripts/gen_field_types.py ECS_FLAT_YML NON_ECS_SCHEMA_JSON

* ``ECS_FLAT_YML``: ``generated/ecs/ecs_flat.yml`` of elastic/ecs (Apache-2.0): every ECS
  field with its ``type`` and its ``multi_fields`` (``process.command_line`` is ``wildcard``
  with a ``process.command_line.text`` ``match_only_text`` sub-field).
* ``NON_ECS_SCHEMA_JSON``: ``detection_rules/etc/non-ecs-schema.json`` of
  elastic/detection-rules (Elastic License 2.0): types of the non-ECS fields the detection
  rules query, keyed by index pattern, with nested objects for dotted paths.

For example ``python scripts/gen_field_types.py ../shared/ecs/ecs_flat.yml
../shared/ecs/non-ecs-schema.json``. The output maps a dotted field name to its type (one
line per field, sorted); ECS wins where both sources name a field; a non-ECS field typed
differently by two index patterns keeps the first type seen. The license texts of both
sources are shipped in ``plugin/ruletag/data/licenses/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parents[1] / "plugin" / "ruletag" / "data" / "field_types.json"


def ecs_types(path: Path) -> dict[str, str]:
    """``flat_name -> type`` for every ECS field and multi-field."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for name, spec in doc.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            continue
        out[str(spec.get("flat_name") or name)] = spec["type"]
        for sub in spec.get("multi_fields") or ():
            if isinstance(sub, dict) and sub.get("flat_name") and sub.get("type"):
                out[str(sub["flat_name"])] = str(sub["type"])
    return out


def _flatten(obj: dict[str, Any], prefix: str, out: dict[str, str]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(value, name + ".", out)
        elif isinstance(value, str):
            out.setdefault(name, value)


def non_ecs_types(path: Path) -> dict[str, str]:
    """``field -> type`` over every index pattern of the detection rules' non-ECS schema."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for fields in doc.values():
        if isinstance(fields, dict):
            _flatten(fields, "", out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ecs_flat", type=Path, help="ECS generated/ecs/ecs_flat.yml")
    ap.add_argument("non_ecs", type=Path, help="detection-rules etc/non-ecs-schema.json")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args(argv)
    types = non_ecs_types(args.non_ecs)
    types.update(ecs_types(args.ecs_flat))
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(types.items())]
    args.output.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    print(f"{len(types)} field types -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
