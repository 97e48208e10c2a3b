"""Sigma front-end: Sigma YAML rule files -> IR :class:`~ruletag.rules.ir.Rule` objects.

Parsing, modifier application and condition resolution are pySigma's; this module walks the
resulting condition tree (``rule.detection.parsed_condition``) and maps pySigma's value types
onto IR leaves. Errors become :class:`~ruletag.errors.InvalidRule` (not valid Sigma) or
:class:`~ruletag.errors.UnsupportedRule` (valid, but ruletag cannot evaluate it), each with the
file and the best line found for the offending YAML key.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import re2
import yaml
from sigma.collection import SigmaCollection
from sigma.conditions import (
    ConditionAND,
    ConditionFieldEqualsValueExpression,
    ConditionNOT,
    ConditionOR,
    ConditionValueExpression,
)
from sigma.exceptions import (
    SigmaConditionError,
    SigmaError,
    SigmaRegularExpressionError,
    SigmaRuleLocation,
)
from sigma.modifiers import modifier_mapping
from sigma.policy import SigmaPolicy
from sigma.policy.regex_engine import PythonRegexEngine
from sigma.rule import SigmaRule
from sigma.rule.base import SigmaYAMLLoader
from sigma.types import (
    CompareOperators,
    Placeholder,
    SigmaBool,
    SigmaCasedString,
    SigmaCIDRExpression,
    SigmaCompareExpression,
    SigmaExists,
    SigmaExpansion,
    SigmaFieldReference,
    SigmaNull,
    SigmaNumber,
    SigmaRegularExpression,
    SigmaRegularExpressionFlag,
    SigmaString,
    SigmaTimestampPart,
    SigmaType,
    SpecialChars,
)

from ruletag.errors import InvalidRule, RuleError, UnsupportedRule
from ruletag.rules import attack
from ruletag.rules.algebra import and_, not_, or_, tokens
from ruletag.rules.ir import (
    DEFAULT_RISK_SCORE,
    Attack,
    Cidr,
    Compare,
    Equals,
    Exists,
    FieldRef,
    IsNull,
    Logsource,
    Match,
    Node,
    Or,
    Regex,
    Rule,
    Token,
    Wild,
)
from ruletag.rules.regex import compile_re2

__all__ = ["load_sigma_file", "sigma_rule_to_ir"]

Variables = Mapping[str, Sequence[str]]

#: Modifiers pySigma knows but ruletag cannot evaluate (timestamp parts).
_UNSUPPORTED_MODIFIERS = frozenset({"minute", "hour", "day", "week", "month", "year"})
_LEVELS = ("informational", "low", "medium", "high", "critical")
_TECHNIQUE = re.compile(r"t\d{4}(?:\.\d{3})?", re.IGNORECASE)
_GROUP_OR_SOFTWARE = re.compile(r"[gs]\d{4}", re.IGNORECASE)
_COMPARE_OPS: dict[CompareOperators, Literal["<", "<=", ">", ">="]] = {
    CompareOperators.LT: "<",
    CompareOperators.LTE: "<=",
    CompareOperators.GT: ">",
    CompareOperators.GTE: ">=",
}
_RE_FLAGS = {
    SigmaRegularExpressionFlag.IGNORECASE: "i",
    SigmaRegularExpressionFlag.MULTILINE: "m",
    SigmaRegularExpressionFlag.DOTALL: "s",
}
#: pySigma validates regexes with Python ``re`` (invalid there -> InvalidRule); RE2 support is
#: checked separately, so a valid regex RE2 cannot run is an UnsupportedRule with its reason.
_POLICY = SigmaPolicy(regex_engine=PythonRegexEngine())
#: pySigma metadata error class -> the top-level key it is about.
_TOP_KEYS = {
    "SigmaAuthorError": "author",
    "SigmaDateError": "date",
    "SigmaModifiedError": "modified",
    "SigmaDescriptionError": "description",
    "SigmaFalsePositivesError": "falsepositives",
    "SigmaFieldsError": "fields",
    "SigmaIdentifierError": "id",
    "SigmaTaxonomyError": "taxonomy",
    "SigmaLevelError": "level",
    "SigmaLicenseError": "license",
    "SigmaLogsourceError": "logsource",
    "SigmaNameError": "name",
    "SigmaReferencesError": "references",
    "SigmaRelatedError": "related",
    "SigmaScopeError": "scope",
    "SigmaStatusError": "status",
    "SigmaTitleError": "title",
    "SigmaTagError": "tags",
}
_RE_ERROR = re.compile(r"Regular expression '(.*)' is invalid: (.*)", re.DOTALL)

#: ``locate(kind, **hints) -> line`` finds the YAML line of what an error is about.
Locate = Callable[..., int]


def _no_locate(*_args: Any, **_kwargs: Any) -> int:
    return 1


# --------------------------------------------------------------------------- loading


def load_sigma_file(path: Path, variables: Variables | None = None) -> list[Rule]:
    """Load every rule of one Sigma YAML file (usually one document) as IR rules.

    ``variables`` supplies the values of ``|expand`` placeholders (``%name%`` -> values).
    Raises :class:`InvalidRule` or :class:`UnsupportedRule`; never another exception for bad
    rule content (an unreadable file raises :class:`InvalidRule` too).
    """
    spath = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRule(f"cannot read rule file: {type(e).__name__}", spath, 1) from e
    nodes, docs = _parse_yaml(text, spath)
    pairs = [(n, d) for n, d in zip(nodes, docs, strict=True) if d is not None]
    if not pairs:
        raise InvalidRule("no rule in file", spath, 1)
    for node, doc in pairs:
        if not isinstance(doc, dict):
            raise InvalidRule("rule is not a YAML mapping", spath, node.start_mark.line + 1)
    if any("action" in doc for _, doc in pairs):
        return _load_collection([doc for _, doc in pairs], spath, variables)
    return [_load_document(node, doc, i, spath, variables) for i, (node, doc) in enumerate(pairs)]


def _parse_yaml(text: str, path: str) -> tuple[list[yaml.Node], list[Any]]:
    """All documents as (nodes, data); duplicate keys are errors, as in pySigma."""
    loader = SigmaYAMLLoader(text)
    nodes: list[yaml.Node] = []
    docs: list[Any] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            assert node is not None  # check_node() said a document follows
            nodes.append(node)
            docs.append(loader.construct_document(node))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        msg = str(e)
        if msg.startswith("Duplicate key"):
            line = _duplicate_key_line(text) or 1
            raise InvalidRule(f"duplicate YAML key: {msg.split(' ', 2)[-1]}", path, line) from e
        problem = getattr(e, "problem", None) or type(e).__name__
        raise InvalidRule(f"bad YAML: {problem}", path, mark.line + 1 if mark else 1) from e
    except (ValueError, TypeError) as e:  # e.g. an impossible date such as 2020-13-45
        raise InvalidRule(f"bad YAML value: {e}", path, 1) from e
    finally:
        loader.dispose()
    return nodes, docs


def _duplicate_key_line(text: str) -> int | None:
    """Line of the second occurrence of a duplicated mapping key (compose keeps both)."""
    try:
        roots = list(yaml.compose_all(text, Loader=yaml.CSafeLoader))
    except yaml.YAMLError:
        return None
    for root in roots:
        for mapping in _mappings(root):
            seen: set[str] = set()
            for key, _value in mapping.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        return key.start_mark.line + 1
                    seen.add(key.value)
    return None


def _load_document(
    node: yaml.Node, doc: dict[str, Any], index: int, path: str, variables: Variables | None
) -> Rule:
    """One rule document -> IR, with errors located in ``node``."""
    locate = _node_locator(node)
    start = node.start_mark.line + 1
    if "correlation" in doc:  # linked to the rules it uses once every file is loaded
        from ruletag.rules.stateful.correlation import correlation_rule

        return correlation_rule(doc, path, start, index)
    if "filter" in doc:
        raise UnsupportedRule("filter rules are not supported yet", path, start)
    if "id" in doc and not isinstance(doc["id"], str):
        raise InvalidRule("rule id is not a string", path, locate("top", key="id"))
    _precheck_detection(doc, path, locate)
    try:
        rule = SigmaRule.from_dict(doc, source=SigmaRuleLocation(Path(path)), policy=_POLICY)
    except SigmaError as e:
        raise _from_sigma_error(e, path, locate) from e
    except (TypeError, AttributeError, KeyError) as e:
        raise InvalidRule(f"malformed rule: {type(e).__name__}", path, start) from e
    return _convert(rule, path, variables, locate, line=start, index=index)


def _load_collection(
    docs: list[dict[str, Any]], path: str, variables: Variables | None
) -> list[Rule]:
    """Files with ``action: global/repeat/reset`` documents: let pySigma merge them."""
    try:
        collection = SigmaCollection.from_dicts(
            docs, source=SigmaRuleLocation(Path(path)), policy=_POLICY
        )
    except SigmaError as e:
        raise _from_sigma_error(e, path, _no_locate) from e
    except (TypeError, AttributeError, KeyError) as e:
        raise InvalidRule(f"malformed rule: {type(e).__name__}", path, 1) from e
    out: list[Rule] = []
    for index, rule in enumerate(collection.rules):
        if not isinstance(rule, SigmaRule):
            raise UnsupportedRule("correlation rules are not supported yet", path, 1)
        out.append(_convert(rule, path, variables, _no_locate, line=1, index=index))
    return out


def sigma_rule_to_ir(rule: SigmaRule, path: str, variables: Variables | None = None) -> Rule:
    """Translate one already-parsed pySigma rule (line numbers are 1: no YAML at hand)."""
    return _convert(rule, path, variables, _no_locate, line=1, index=0)


def _convert(
    rule: SigmaRule,
    path: str,
    variables: Variables | None,
    locate: Locate,
    *,
    line: int,
    index: int,
) -> Rule:
    try:
        condition = _Converter(path, variables or {}, locate).rule_condition(rule)
    except RuleError as e:
        if e.path is None:
            e.path, e.line = path, line
        raise
    except SigmaError as e:
        raise _from_sigma_error(e, path, locate) from e
    except (TypeError, AttributeError, KeyError) as e:  # pySigma on odd structures
        where = locate("top", key="detection")
        raise InvalidRule(f"malformed detection: {type(e).__name__}", path, where) from e
    return _metadata(rule, condition, path, line, index)


def _from_sigma_error(e: SigmaError, path: str, locate: Locate) -> RuleError:
    """A pySigma parse error -> InvalidRule with a short reason and the best line."""
    msg = str(e.args[0]) if e.args else type(e).__name__
    bad_regex = _RE_ERROR.fullmatch(msg)
    if isinstance(e, SigmaRegularExpressionError) and bad_regex:
        msg = f"invalid regex: {bad_regex.group(2)}"
    if len(msg) > 160:
        msg = msg[:157] + "..."
    top_key = _TOP_KEYS.get(type(e).__name__)
    if bad_regex:
        line = locate("value", text=bad_regex.group(1))
    elif "windash" in msg:
        line = locate("modifier", mod="windash")
    elif isinstance(e, SigmaConditionError):
        line = locate("key", key="condition")
    elif top_key is not None:
        line = locate("top", key=top_key)
    elif "detection" in type(e).__name__.lower() or _is_value_error(e):
        line = locate("top", key="detection")
    else:
        line = 1
    return InvalidRule(msg, path, line)


def _is_value_error(e: SigmaError) -> bool:
    name = type(e).__name__
    return any(w in name for w in ("Modifier", "Value", "Type", "RegularExpression"))


def _precheck_detection(doc: dict[str, Any], path: str, locate: Locate) -> None:
    """Reject odd keys/conditions and unknown/unsupported modifiers early, with exact lines."""
    detection = doc.get("detection")
    if not isinstance(detection, dict):
        return
    cond = detection.get("condition")
    if cond is not None and not (
        isinstance(cond, str) or (isinstance(cond, list) and all(isinstance(c, str) for c in cond))
    ):
        raise InvalidRule("condition is not a string", path, locate("key", key="condition"))
    for key in _detection_keys(detection):
        if not isinstance(key, str):
            where = locate("top", key="detection")
            raise InvalidRule("detection key is not a string", path, where)
        for mod in key.split("|")[1:]:
            if mod not in modifier_mapping:
                raise InvalidRule(f"unknown modifier: {mod}", path, locate("modifier", mod=mod))
            if mod in _UNSUPPORTED_MODIFIERS:
                raise UnsupportedRule(
                    f"unsupported modifier: {mod}", path, locate("modifier", mod=mod)
                )


def _detection_keys(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _detection_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _detection_keys(v)


# --------------------------------------------------------------------------- line lookup


def _mappings(node: yaml.Node) -> Iterator[yaml.MappingNode]:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            yield n
            stack.extend(v for pair in reversed(n.value) for v in reversed(pair))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(reversed(n.value))


def _scalars(node: yaml.Node) -> Iterator[str]:
    if isinstance(node, yaml.ScalarNode):
        yield node.value
    elif isinstance(node, yaml.SequenceNode):
        for n in node.value:
            yield from _scalars(n)


def _node_locator(root: yaml.Node) -> Locate:
    """A ``locate`` function over one document's YAML nodes."""
    top: dict[str, yaml.ScalarNode] = {}
    detection: yaml.Node | None = None
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            if isinstance(k, yaml.ScalarNode):
                top[k.value] = k
                if k.value == "detection":
                    detection = v

    def find(pred: Callable[[str, yaml.Node], bool]) -> int | None:
        if detection is None:
            return None
        for mapping in _mappings(detection):
            for k, v in mapping.value:
                if isinstance(k, yaml.ScalarNode) and pred(str(k.value), v):
                    return k.start_mark.line + 1
        return None

    def locate(kind: str, **hint: Any) -> int:
        line: int | None = None
        if kind == "modifier":
            line = find(lambda k, _v: hint["mod"] in k.split("|")[1:])
        elif kind == "placeholder":
            needle = f"%{hint['name']}%"
            line = find(
                lambda k, v: "expand" in k.split("|")[1:] and any(needle in s for s in _scalars(v))
            )
        elif kind == "field":
            fld = hint["field"] or ""
            mod = hint.get("mod")
            line = find(
                lambda k, _v: k.split("|")[0] == fld and (mod is None or mod in k.split("|")[1:])
            )
        elif kind == "value":
            text = hint["text"]
            line = find(
                lambda k, v: "re" in k.split("|")[1:] and any(s and s in text for s in _scalars(v))
            )
        elif kind == "key":
            line = find(lambda k, _v: k == hint["key"])
        if line is None:
            fallback = top.get("detection") if kind != "top" else top.get(hint["key"])
            line = fallback.start_mark.line + 1 if fallback is not None else 1
        return line

    return locate


# --------------------------------------------------------------------------- conditions


class _Converter:
    """Walks pySigma's resolved condition tree and builds IR nodes."""

    def __init__(self, path: str, variables: Variables, locate: Locate) -> None:
        self.path = path
        self.variables = variables
        self.locate = locate

    def unsupported(self, reason: str, kind: str, **hint: Any) -> UnsupportedRule:
        return UnsupportedRule(reason, self.path, self.locate(kind, **hint))

    def rule_condition(self, rule: SigmaRule) -> Node:
        conditions = rule.detection.parsed_condition
        nodes: list[Node] = []
        for cond in conditions:
            tree = cond.parsed
            if tree is None:
                raise InvalidRule("empty condition", self.path, self.locate("key", key="condition"))
            nodes.append(self.node(tree))
        return _or(nodes)

    def node(self, item: Any) -> Node:
        if isinstance(item, ConditionAND):
            return and_(*(self.node(a) for a in item.args))
        if isinstance(item, ConditionOR):
            return _or([self.node(a) for a in item.args])
        if isinstance(item, ConditionNOT):
            return not_(self.node(item.args[0]))
        if isinstance(item, ConditionFieldEqualsValueExpression):
            return self.leaf(item.field, item.value)
        if isinstance(item, ConditionValueExpression):
            return self.leaf(None, item.value)
        raise InvalidRule(
            f"unexpected condition element: {type(item).__name__}",
            self.path,
            self.locate("key", key="condition"),
        )

    def leaf(self, field: str | None, value: SigmaType) -> Node:
        """One field/value pair (``field=None``: keyword) -> IR leaf or small Or."""
        if isinstance(value, SigmaExpansion):
            return _or([self.leaf(field, v) for v in value.values])
        if isinstance(value, SigmaString):
            cased = isinstance(value, SigmaCasedString)
            return _or([Match(field, _tokens(s), cased) for s in self.expand(value, field)])
        if isinstance(value, SigmaRegularExpression):
            return _or([self.regex(field, p, f) for p, f in self.expand_regex(value, field)])
        if isinstance(value, SigmaNull):
            if field is None:
                raise InvalidRule("null keyword", self.path, self.locate("top", key="detection"))
            return IsNull(field)
        if isinstance(value, SigmaTimestampPart):
            raise self.unsupported("unsupported modifier: timestamp part", "field", field=field)
        if isinstance(value, SigmaBool):  # before numbers: plain bools are ints in Python
            if field is None:
                return Match(None, ("true" if value.boolean else "false",))
            return Equals(field, value.boolean)
        if isinstance(value, SigmaNumber):
            if field is None:
                return Match(None, (str(value.number),))
            return Equals(field, value.number)
        if field is None:
            raise self.unsupported(
                f"keyword value not supported: {type(value).__name__}", "top", key="detection"
            )
        if isinstance(value, SigmaCIDRExpression):
            return Cidr(field, (value.cidr,))
        if isinstance(value, SigmaCompareExpression):
            number = value.number.number
            if value.op is CompareOperators.NEQ:
                return not_(Equals(field, number))
            return Compare(field, _COMPARE_OPS[value.op], number)
        if isinstance(value, SigmaFieldReference):
            if value.starts_with and value.ends_with:
                op: Literal["eq", "startswith", "endswith", "contains"] = "contains"
            elif value.starts_with:
                op = "startswith"
            elif value.ends_with:
                op = "endswith"
            else:
                op = "eq"
            return FieldRef(field, value.field, op)
        if isinstance(value, SigmaExists):
            return Exists(field) if value.exists else IsNull(field)
        raise self.unsupported(
            f"unsupported value type: {type(value).__name__}", "field", field=field
        )

    # ----------------------------------------------------------------- placeholders

    def _replacements(self, field: str | None) -> Callable[[Placeholder], Iterator[SigmaString]]:
        def callback(p: Placeholder) -> Iterator[SigmaString]:
            values = self.variables.get(p.name)
            if values is None:
                raise self.unsupported(f"unset placeholder: %{p.name}%", "placeholder", name=p.name)
            if isinstance(values, str):
                values = [values]
            for v in values:
                yield SigmaString(str(v))

        return callback

    def expand(self, value: SigmaString, field: str | None) -> list[SigmaString]:
        """Placeholders -> one string per combination of variable values."""
        if not value.contains_placeholder():
            return [value]
        try:
            out = value.replace_placeholders(self._replacements(field))
        except SigmaError as e:  # more than pySigma's expansion limit
            raise self.unsupported(
                "placeholder expansion too large", "field", field=field, mod="expand"
            ) from e
        return out

    def expand_regex(
        self, value: SigmaRegularExpression, field: str | None
    ) -> list[tuple[str, str]]:
        """(pattern, flags) per expansion; placeholder values are inserted as escaped literals."""
        if not value.regexp.contains_placeholder():
            return [_with_flags(str(value.regexp), value)]
        callback = self._replacements(field)

        def literal(p: Placeholder) -> Iterator[SigmaString]:
            for s in callback(p):
                yield SigmaString.from_str(re.escape(s.to_plain_regex()))

        try:
            strings = value.regexp.replace_placeholders(literal)
        except SigmaError as e:
            raise self.unsupported(
                "placeholder expansion too large", "field", field=field, mod="expand"
            ) from e
        return [_with_flags(s.to_plain_regex(), value) for s in strings]

    def regex(self, field: str | None, pattern: str, flags: str) -> Regex:
        """A Regex leaf, once RE2 has accepted the pattern with its flags."""
        prefix = f"(?{flags})" if flags else ""
        try:
            compile_re2(prefix + pattern)
        except re2.error as e:
            why = e.args[0] if e.args else str(e)
            if isinstance(why, bytes):
                why = why.decode("utf-8", "replace")
            raise self.unsupported(
                f"regex not supported by RE2: {why}", "field", field=field, mod="re"
            ) from e
        return Regex(field, pattern, flags)


def _with_flags(pattern: str, value: SigmaRegularExpression) -> tuple[str, str]:
    """(pattern, sorted flag letters) pair for :meth:`_Converter.regex`."""
    return pattern, "".join(sorted(_RE_FLAGS[f] for f in value.flags))


def _tokens(value: SigmaString) -> tuple[Token, ...]:
    """SigmaString parts -> Match tokens: literals merged, ``**`` collapsed."""
    parts: list[Token] = []
    for part in value.s:
        if isinstance(part, str):
            parts.append(part)
        elif part is SpecialChars.WILDCARD_MULTI:
            parts.append(Wild.ANY)
        elif part is SpecialChars.WILDCARD_SINGLE:
            parts.append(Wild.ONE)
        else:  # a Placeholder left over: expand() should have replaced it
            raise UnsupportedRule(f"unset placeholder: %{getattr(part, 'name', part)}%")
    return tokens(*parts)


# --------------------------------------------------------------------------- simplification


def _or(args: Iterable[Node]) -> Node:
    """The Or of ``args``, the networks of Cidr leaves on one field merged."""
    node = or_(*args)
    if not isinstance(node, Or):
        return node
    merged = _merge_cidrs(list(node.args))
    return merged[0] if len(merged) == 1 else Or(tuple(merged))


def _merge_cidrs(args: list[Node]) -> list[Node]:
    """Or(Cidr(f, a), Cidr(f, b)) -> Cidr(f, a + b), in the first one's place."""
    out: list[Node] = []
    where: dict[str, int] = {}
    for a in args:
        if isinstance(a, Cidr):
            i = where.get(a.field)
            if i is not None:
                prev = out[i]
                assert isinstance(prev, Cidr)
                nets = prev.networks + tuple(n for n in a.networks if n not in prev.networks)
                out[i] = Cidr(a.field, nets)
                continue
            where[a.field] = len(out)
        out.append(a)
    return out


# --------------------------------------------------------------------------- metadata


def _metadata(rule: SigmaRule, condition: Node, path: str, line: int, index: int) -> Rule:
    level = str(rule.level) if rule.level is not None else "medium"
    if level not in _LEVELS:
        level = "medium"
    stamp = rule.modified or rule.date
    logsource = rule.logsource
    tags = tuple(str(t) for t in rule.tags)
    tactics, techniques = _attack(rule)
    if rule.id is not None:
        rule_id = str(rule.id)
    else:  # no id: a stable one from where the rule lives
        rule_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sigma:{path}#{index}"))
    return Rule(
        id=rule_id,
        name=rule.title,
        source="sigma",
        condition=condition,
        path=path,
        line=line,
        severity=level,
        risk_score=DEFAULT_RISK_SCORE[level],
        author=_authors(rule.author),
        tactics=tactics,
        techniques=techniques,
        logsource=Logsource(logsource.product, logsource.category, logsource.service),
        modified=stamp.isoformat() if stamp is not None else "",
        tags=tags,
        status=str(rule.status) if rule.status is not None else "",
        ref_name=rule.name if isinstance(rule.name, str) else "",
    )


def _authors(author: Any) -> tuple[str, ...]:
    if not author:
        return ()
    if isinstance(author, list | tuple):
        return tuple(str(a).strip() for a in author if str(a).strip())
    text = str(author)
    parts = tuple(p.strip() for p in text.split(", ") if p.strip())
    return parts if len(parts) > 1 else (text,)


def _attack(rule: SigmaRule) -> tuple[tuple[Attack, ...], tuple[Attack, ...]]:
    tactics: list[Attack] = []
    techniques: list[Attack] = []
    for tag in rule.tags:
        if tag.namespace.lower() != "attack":
            continue
        name = tag.name
        if _TECHNIQUE.fullmatch(name):
            tid = name.upper()
            found = attack.technique(tid) or Attack(tid, tid)
            if found not in techniques:
                techniques.append(found)
        elif _GROUP_OR_SOFTWARE.fullmatch(name):
            continue
        else:
            found = attack.tactic_by_shortname(name) or Attack("", name)
            # stealth and defense-evasion are one tactic (TA0005) under two names
            if not any(t == found or (found.id and t.id == found.id) for t in tactics):
                tactics.append(found)
    return tuple(tactics), tuple(techniques)
