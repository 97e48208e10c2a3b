"""Pick the pinned corpus sample in ``tests/data/corpus/``: few rules, every feature.

For each rule file of the Sigma and Elastic corpora this lists the features it exercises:
its load outcome (loaded, or each unsupported/invalid reason, placeholder names folded into
one), the Sigma modifiers, keywords and condition forms of its source, the EQL operators,
functions (plain and ``~``), ``?field``, value lists, event categories and pipes of its
query, and the IR node kinds the front-end built. A greedy set cover then picks, per corpus, the
files that together exercise every feature (the smallest file wins ties). The chosen files
are copied with their relative paths and the corpus license files, and ``MANIFEST.json``
records, per file, its expected load outcome and the features it was chosen for.

Usage (run once; the result is committed)::

    .venv/bin/python scripts/pick_corpus_sample.py ../shared/rules tests/data/corpus
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from ruletag.errors import RuleError
from ruletag.rules.elastic import load_elastic_file
from ruletag.rules.functions import FUNCTIONS
from ruletag.rules.ir import Rule
from ruletag.rules.sigma import load_sigma_file

LICENSES = {
    "sigma": ["LICENSE", "LICENSE.Detection.Rules.md"],
    "elastic": ["LICENSE.txt", "NOTICE.txt", "rules/integrations/aws/NOTICE.txt"],
}
EQL_OPERATORS = {
    "like~": r"\blike~\s",
    "like": r"\blike\s",
    "in~": r"\bin~\s*\(",
    "in": r"\bin\s*\(",
    "regex~": r"\bregex~\s",
    "regex": r"\bregex\s",
    ":": r"[\w`]\s*:\s*[\"(\d-]",
    "==": r"==",
    "!=": r"!=",
    "<": r"[^<]<[^=]",
    "<=": r"<=",
    ">": r"[^>-]>[^=]",
    ">=": r">=",
    "not": r"\bnot\b",
    "or": r"\bor\b",
    "?field": r"\?[A-Za-z_]",
    ": (list)": r":\s*\(",
    "null": r"\bnull\b",
    "true/false": r"\b(true|false)\b",
    "backtick field": r"`",
    "sequence": r"^\s*sequence\b",
    "sample": r"^\s*sample\b",
    "until": r"\buntil\b",
    "with runs": r"\bwith runs\b",
    "maxspan": r"\bmaxspan\b",
    "pipe": r"\|\s*[a-z]+",
}
EQL_CALL = re.compile(r"\b([A-Za-z]+)(~?)\s*\(")
EQL_STRING = re.compile(r'"""(?:.|\n)*?"""|"(?:[^"\\\n]|\\.)*"')
EQL_CATEGORY = re.compile(r"(?:^|\]|\n)\s*([a-z_]+)\s+where\b")


def outcome(load: Callable[[Path], list[Rule]], path: Path) -> tuple[str, list[Rule]]:
    """``loaded`` or ``<kind>: <reason>``, and the rules built."""
    try:
        return "loaded", load(path)
    except RuleError as exc:
        return f"{exc.kind}: {exc.reason}", []


def outcome_feature(result: str) -> str:
    return re.sub(r"%[^%]*%", "%NAME%", result)


def keyword(node: Any) -> str:
    return " keyword" if node.field is None else ""


def ir_features(node: Any, out: set[str]) -> None:
    """Node kinds (with the operator, function name or flags that change the compiled form)."""
    if isinstance(node, tuple | list):
        for x in node:
            ir_features(x, out)
        return
    if not dataclasses.is_dataclass(node):
        if node.__class__.__name__ == "Wild":
            out.add(f"ir wildcard {node.name}")
        return
    kind = type(node).__name__
    extra = {
        "Match": lambda n: ("cased" if n.cased else "nocase") + keyword(n),
        "Regex": lambda n: f"flags={n.flags or '-'}" + keyword(n),
        "Compare": lambda n: n.op,
        "FieldRef": lambda n: f"{n.op}{' cased' if n.cased else ''}",
        "Call": lambda n: f"{n.name}{'' if n.cased else '~'}",
        "Predicate": lambda n: f"{n.op}{'' if n.cased else '~'}",
        "Const": lambda n: str(n.value),
    }.get(kind)
    out.add(f"ir {kind}" + (f" {extra(node)}" if extra else ""))
    for f in dataclasses.fields(node):
        if f.name not in ("field", "other", "name", "op", "pattern", "flags", "cased"):
            ir_features(getattr(node, f.name), out)
        elif f.name == "pattern" and isinstance(node.pattern, tuple):
            ir_features(node.pattern, out)


def sigma_keys(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                yield k
            yield from sigma_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from sigma_keys(v)


def sigma_features(path: Path) -> set[str]:
    """Modifiers, keywords and condition forms of one Sigma file."""
    try:
        doc = yaml.safe_load(path.read_text("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return {"sigma unreadable YAML"}
    det = doc.get("detection") if isinstance(doc, dict) else None
    if not isinstance(det, dict):
        return set()
    out: set[str] = set()
    for key in sigma_keys({k: v for k, v in det.items() if k != "condition"}):
        mods = key.split("|")[1:]
        out.update(f"sigma modifier {m}" for m in mods)
        if len(mods) > 1:
            out.add(f"sigma modifier chain {'|'.join(mods)}")
        if key.startswith("|"):
            out.add("sigma keywords with modifiers")
    for name, value in det.items():
        if name == "condition":
            continue
        if isinstance(value, list) and value and all(not isinstance(v, dict) for v in value):
            out.add("sigma keywords (list)")
        elif isinstance(value, str | int):
            out.add("sigma keywords (single)")
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            out.add("sigma list of maps")
        if isinstance(value, dict):
            for v in value.values():
                if v is None:
                    out.add("sigma value null")
                elif isinstance(v, bool):
                    out.add("sigma value bool")
                elif isinstance(v, int | float):
                    out.add("sigma value number")
                elif v == "" or v == [""]:
                    out.add("sigma value empty string")
    conds = det.get("condition")
    for cond in conds if isinstance(conds, list) else [conds]:
        if not isinstance(cond, str):
            continue
        if isinstance(conds, list):
            out.add("sigma condition list")
        for form, pattern in {
            "1 of x*": r"\b1 of \w+\*",
            "all of x*": r"\ball of \w+\*",
            "1 of them": r"1 of them",
            "all of them": r"all of them",
            "not": r"\bnot\b",
            "parentheses": r"\(",
            "and": r"\band\b",
            "or": r"\bor\b",
            "aggregation": r"\|",
        }.items():
            if re.search(pattern, cond):
                out.add(f"sigma condition {form}")
    return out


def eql_features(path: Path) -> set[str]:
    """Operators, functions, ``?field``, lists, categories and pipes of one EQL query."""
    text = path.read_text("utf-8")
    m = re.search(r"^query\s*=\s*'''(.*?)'''", text, re.S | re.M)
    lang = re.search(r'^language\s*=\s*"([^"]+)"', text, re.M)
    if not (m and lang and lang.group(1) == "eql"):
        return set()
    query = EQL_STRING.sub('""', m.group(1))
    out = {f"eql {op}" for op, pat in EQL_OPERATORS.items() if re.search(pat, query, re.M)}
    out.update(
        f"eql function {name.lower()}{tilde}"
        for name, tilde in EQL_CALL.findall(query)
        if name.lower() in FUNCTIONS
    )
    out.update(f"eql category {c}" for c in EQL_CATEGORY.findall(query))
    return out


def features(corpus: str, path: Path) -> tuple[str, set[str]]:
    load = load_sigma_file if corpus == "sigma" else load_elastic_file
    result, rules = outcome(load, path)
    feats = {f"{corpus} {outcome_feature(result)}"}
    feats |= sigma_features(path) if corpus == "sigma" else eql_features(path)
    ir: set[str] = set()
    for rule in rules:
        ir_features(rule.condition, ir)
    feats |= {f"{corpus} {f}" for f in ir}
    return result, feats


def cover(candidates: dict[Path, set[str]]) -> list[tuple[Path, set[str]]]:
    """Greedy set cover: most new features first, then the smallest file."""
    left = set().union(*candidates.values())
    chosen = []
    while left:
        best = max(candidates, key=lambda p: (len(candidates[p] & left), -p.stat().st_size, str(p)))
        chosen.append((best, candidates[best] & left))
        left -= candidates[best]
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path, help="folder holding sigma/ and elastic/")
    ap.add_argument("out", type=Path, help="where to write the sample (e.g. tests/data/corpus)")
    args = ap.parse_args()
    manifest: dict[str, Any] = {}
    for corpus, pattern in (("sigma", "*.yml"), ("elastic", "*.toml")):
        root = args.corpus / corpus
        found = {}
        results = {}
        for path in sorted(root.rglob(pattern)):
            results[path], found[path] = features(corpus, path)
        for path, why in cover(found):
            rel = path.relative_to(args.corpus)
            dest = args.out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            manifest[rel.as_posix()] = {"outcome": results[path], "chosen_for": sorted(why)}
        for name in LICENSES[corpus]:
            dest = args.out / corpus / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, dest)
        total = set().union(*found.values())
        print(
            f"{corpus}: {len(total)} features, {sum(k.startswith(corpus) for k in manifest)} "
            f"of {len(found)} files"
        )
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
