"""The ``ruletag`` command line: serve, rules check/compile/update/explain/stats, match, test,
validate, dead-letter list/resend."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the forward-protocol filter server")
    p.add_argument("--config", "-c", help="pipeline YAML file")
    p.add_argument("--listen", help="HOST:PORT (or unix:PATH) to accept Fluent forward input on")
    p.add_argument("--forward", help="downstream HOST:PORT[,HOST:PORT...] (forward output)")
    p.add_argument("--shared-key", help="shared key for both the listener and the downstream")
    p.add_argument("--listen-shared-key", help="shared key of the listener (the agents' key)")
    p.add_argument("--forward-shared-key", help="shared key of the downstream (the aggregator's)")
    p.add_argument("--rules", nargs="+", default=None, help="rule files or folders")
    p.add_argument("--metrics", help="HOST:PORT for Prometheus /metrics and /health")
    p.add_argument("--buffer-dir", help="turn the durable disk buffer on, in this folder")
    p.add_argument("--log-format", choices=["text", "json"], default=None)
    p.add_argument("--log-level", default=None)
    p.set_defaults(func=_run_serve)


def _run_serve(ns: argparse.Namespace) -> int:
    from ruletag.commands.serve import main_serve

    return main_serve(ns)


def add_select_flags(p: argparse.ArgumentParser) -> None:
    """The rule selection flags (``rules.select``, ``rules.exclude``, ``rules.building_blocks``);
    each replaces the config's value for its key. Lists: repeat the flag or separate by commas."""
    g = p.add_argument_group(
        "rule selection", "which loaded rules are used; each flag replaces the config's value"
    )
    g.add_argument("--source", action="append", help="sigma, elastic (default: both)")
    g.add_argument(
        "--min-level",
        help="lowest Sigma level / Elastic severity kept: informational (default), low, "
        "medium, high, critical",
    )
    g.add_argument(
        "--status",
        action="append",
        help="statuses kept: stable, test, experimental (default), deprecated, unsupported; "
        "Elastic production = stable, development = experimental",
    )
    g.add_argument(
        "--tag",
        action="append",
        help="keep rules with a matching tag or ATT&CK id (glob: T1059, attack.execution, "
        "'detection.*')",
    )
    g.add_argument("--exclude-tag", action="append", help="leave out rules with a matching tag")
    g.add_argument(
        "--logsource",
        action="append",
        help="keep Sigma rules of this logsource: product=windows[,category=process_creation]",
    )
    g.add_argument("--exclude-logsource", action="append", help="leave out this Sigma logsource")
    g.add_argument("--rule-type", action="append", help="Elastic rule types kept: query, eql, esql")
    g.add_argument("--building-blocks", choices=["keep", "drop"], help="Elastic building blocks")
    g.add_argument("--exclude", action="append", help="leave out rules by id or name (glob)")


def _add_rules(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rules", help="load, check and compile detection rules")
    rsub = p.add_subparsers(dest="rules_cmd", required=True)
    c = rsub.add_parser("check", help="load every rule and report what cannot be used")
    c.add_argument("paths", nargs="+")
    c.add_argument("--json", action="store_true", help="print one JSON summary object")
    c.add_argument("--vars", help="YAML map of Sigma |expand placeholders")
    add_select_flags(c)
    c.set_defaults(func=_run_rules_check)
    k = rsub.add_parser("compile", help="compile rules into a pattern table file")
    k.add_argument("paths", nargs="+")
    k.add_argument("-o", "--output", required=True, help="table file to write")
    k.add_argument("--vars", help="YAML map of Sigma |expand placeholders")
    add_select_flags(k)
    k.set_defaults(func=_run_rules_compile)
    _add_rules_ops(rsub)


def _run_rules_check(ns: argparse.Namespace) -> int:
    from ruletag.commands.rules import check

    return check(ns)


def _run_rules_compile(ns: argparse.Namespace) -> int:
    from ruletag.commands.rules import compile_

    return compile_(ns)


def _add_rules_ops(rsub: argparse._SubParsersAction) -> None:
    u = rsub.add_parser(
        "update",
        help="download upstream rule packages into versioned folders, switch DIR/<source>/current",
        description="Download, verify and install SigmaHQ / Elastic rule packages. Proxies: "
        "HTTPS_PROXY, HTTP_PROXY and NO_PROXY apply; a file:// URL installs a package brought "
        "in by hand.",
    )
    u.add_argument("--dest", required=True, help="folder holding <source>/versions and current")
    u.add_argument("--sigma", action="store_true", help="the SigmaHQ release package")
    u.add_argument("--elastic", action="store_true", help="Elastic's detection-rules archive")
    u.add_argument(
        "--sigma-package",
        choices=["core", "core+", "all"],
        default="core",
        help="which SigmaHQ release package (core)",
    )
    u.add_argument("--url", help="fetch this URL instead (http, https or file) for one source")
    u.add_argument("--sha256", help="refuse the download unless its sha256 is this")
    u.add_argument("--keep", type=int, default=3, help="versions kept per source (3)")
    u.add_argument("--timeout", type=float, default=60.0, help="network timeout, seconds (60)")
    u.add_argument("--rollback", action="store_true", help="switch current to the version before")
    u.set_defaults(func=_run_rules_update)
    e = rsub.add_parser("explain", help="why a rule did or did not match an event")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--rules", nargs="+", help="rule files or folders")
    src.add_argument("--config", "-c", help="pipeline YAML file: its rules")
    e.add_argument("--rule", required=True, help="rule id or name (or a unique part of a name)")
    e.add_argument("--event", required=True, help="JSON object or JSON lines file ('-' = stdin)")
    e.add_argument("--vars", help="YAML map of Sigma |expand placeholders")
    e.add_argument("--json", action="store_true", help="one JSON object per event")
    e.set_defaults(func=_run_rules_explain)
    s = rsub.add_parser("stats", help="noisiest and costliest rules of a running relay")
    s.add_argument("--metrics", required=True, help="the relay's metrics URL or HOST:PORT")
    s.add_argument("--top", type=int, default=10, help="rules per list (10)")
    s.add_argument("--interval", type=float, default=0.0, help="scrape twice, this many s apart")
    s.add_argument("--rules", nargs="+", help="rule files/folders, to show rule names")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_run_rules_stats)


def _run_rules_update(ns: argparse.Namespace) -> int:
    from ruletag.commands.update import main_update

    return main_update(ns)


def _run_rules_explain(ns: argparse.Namespace) -> int:
    from ruletag.commands.explain import main_explain

    return main_explain(ns)


def _run_rules_stats(ns: argparse.Namespace) -> int:
    from ruletag.commands.stats import main_stats

    return main_stats(ns)


def _add_match(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("match", help="match records from a file against rules, print JSON lines")
    p.add_argument("--rules", nargs="+", required=True, help="rule files/folders or a table file")
    p.add_argument("--events", required=True, help="JSON lines or msgpack stream ('-' = stdin)")
    p.add_argument("--vars", help="YAML map of Sigma |expand placeholders")
    p.add_argument("--only-matches", action="store_true", help="print matched records only")
    p.add_argument(
        "--explain",
        action="store_true",
        help="add an 'explain' key to matched records: why each rule fired",
    )
    p.add_argument(
        "--no-prefilter",
        action="store_true",
        help="match every decoded record instead of using the raw pre-filter (slower, same "
        "matches; for comparison)",
    )
    p.add_argument(
        "--tune-after",
        type=int,
        metavar="N",
        help="records the pre-filter observes before it re-tunes itself (default: as the "
        "relay's rules.tune_after; 0: never)",
    )
    p.add_argument(
        "--new-terms-no-learning",
        action="store_true",
        help="Elastic new_terms rules fire from the first record (default: each rule learns "
        "for its history window of event time first, like a fresh server)",
    )
    p.add_argument(
        "--lateness",
        type=float,
        metavar="SECONDS",
        help="allowed lateness of event time: an EQL sequence that needs an event to be "
        "missing is confirmed once a record this much past its window is seen (default 2)",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        default="1",
        help="processes matching JSON lines in parallel, output in input order (default 1; "
        "'auto': one per usable CPU); stateful rules and msgpack input use one",
    )
    add_select_flags(p)
    p.set_defaults(func=_run_match)


def _run_match(ns: argparse.Namespace) -> int:
    from ruletag.commands.match import match

    return match(ns)


def _add_pipeline_cmds(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("test", help="run the tests: block of pipeline configs")
    t.add_argument("configs", nargs="+")
    t.set_defaults(func=_run_test)
    v = sub.add_parser("validate", help="check a pipeline config and its rules without starting")
    v.add_argument("configs", nargs="+")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    add_select_flags(v)
    v.set_defaults(func=_run_validate)


def _run_test(ns: argparse.Namespace) -> int:
    from ruletag.commands.test import main_test

    return main_test(ns)


def _run_validate(ns: argparse.Namespace) -> int:
    from ruletag.commands.validate import main_validate

    return main_validate(ns)


def _add_dead_letter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dead-letter", help="list or re-send chunks set aside as dead letters")
    dsub = p.add_subparsers(dest="dead_letter_cmd", required=True)
    ls = dsub.add_parser("list", help="one line per dead-lettered chunk in DIR")
    ls.add_argument("dir")
    ls.set_defaults(func=_run_dead_letter)
    rs = dsub.add_parser("resend", help="send DIR's dead letters; delete each once acked")
    rs.add_argument("dir")
    rs.add_argument("--config", "-c", help="pipeline YAML file (its forward section)")
    rs.add_argument("--forward", help="downstream HOST:PORT[,HOST:PORT...]")
    rs.add_argument("--shared-key", help="shared key for the downstream")
    rs.add_argument("--retry-limit", type=int, default=5, help="failed tries per chunk (5)")
    rs.set_defaults(func=_run_dead_letter)


def _run_dead_letter(ns: argparse.Namespace) -> int:
    from ruletag.commands.dead_letter import main_dead_letter

    return main_dead_letter(ns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ruletag", description=__doc__)
    from ruletag import __version__

    parser.add_argument("--version", action="version", version=f"ruletag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_rules(sub)
    _add_match(sub)
    _add_pipeline_cmds(sub)
    _add_dead_letter(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ruletag.errors import ConfigError

    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns) or 0)
    except ConfigError as exc:  # a bad config or --vars file: one line, exit 2
        print(f"ruletag: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
