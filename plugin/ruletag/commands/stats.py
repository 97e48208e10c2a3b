"""``ruletag rules stats``: the noisiest and the costliest rules of a running relay, read
from its Prometheus ``/metrics``.

Noise is ``ruletag_detections_total{rule_id}`` (hits since the relay started; with
``--interval S`` the endpoint is scraped twice and hits per second over that window are shown
too). Cost is the sampled ``ruletag_rule_eval_seconds_total{rule_id}`` divided by
``ruletag_rule_eval_samples_total`` (:mod:`ruletag.runtime.rulecost`): present only when the
relay's config sets ``metrics.rule_cost_sample: N``. ``--rules PATH...`` adds rule names.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Scrape:
    """What ``rules stats`` reads from one scrape."""

    at: float
    hits: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    cost_samples: float = 0.0
    records_in: float = 0.0
    records_matched: float = 0.0
    rules_loaded: float = 0.0
    version: str = ""


def metrics_url(target: str) -> str:
    """``HOST:PORT`` or a URL -> the ``/metrics`` URL."""
    url = target if "://" in target else f"http://{target}"
    scheme, _, rest = url.partition("://")
    if "/" not in rest:
        url = f"{scheme}://{rest}/metrics"
    return url


def parse(text: str, at: float = 0.0) -> Scrape:
    s = Scrape(at)
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "ruletag_detections_total" and "rule_id" in labels:
                s.hits[labels["rule_id"]] = value
            elif name == "ruletag_rule_eval_seconds_total" and "rule_id" in labels:
                s.cost[labels["rule_id"]] = value
            elif name == "ruletag_rule_eval_samples_total":
                s.cost_samples = value
            elif name == "ruletag_records_in_total":
                s.records_in = value
            elif name == "ruletag_records_matched_total":
                s.records_matched = value
            elif name == "ruletag_rules_loaded":
                s.rules_loaded = value
            elif name == "ruletag_ruleset_info":
                s.version = labels.get("version", "")
    return s


def scrape(url: str, timeout: float = 10.0) -> Scrape:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode("utf-8", "replace")
    return parse(text, time.monotonic())


def report(first: Scrape, last: Scrape | None, top: int) -> dict[str, Any]:
    """The JSON object of ``rules stats --json``."""
    now = last or first
    window = (last.at - first.at) if last is not None else 0.0
    noisy = sorted(now.hits.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    noisiest = []
    for rid, n in noisy:
        row: dict[str, Any] = {"rule_id": rid, "hits": int(n)}
        if last is not None and window > 0:
            row["hits_per_second"] = round((n - first.hits.get(rid, 0.0)) / window, 3)
        noisiest.append(row)
    costliest = []
    if now.cost_samples > 0:
        ranked = sorted(now.cost.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        total = sum(now.cost.values()) or 1.0
        for rid, secs in ranked:
            costliest.append(
                {
                    "rule_id": rid,
                    "mean_us_per_record": round(secs / now.cost_samples * 1e6, 2),
                    "share": round(secs / total, 4),
                }
            )
    return {
        "ruleset": now.version,
        "rules_loaded": int(now.rules_loaded),
        "records_in": int(now.records_in),
        "records_matched": int(now.records_matched),
        "window_seconds": round(window, 3),
        "noisiest": noisiest,
        "cost_samples": int(now.cost_samples),
        "costliest": costliest,
    }


def _names(paths: list[str] | None) -> dict[str, str]:
    if not paths:
        return {}
    from ruletag.rules.loader import load_rules

    return {r.id: r.name for r in load_rules(paths).rules}


def to_text(rep: dict[str, Any], names: dict[str, str]) -> str:
    out = [
        f"ruleset {rep['ruleset'] or '?'}: {rep['rules_loaded']} rules, "
        f"{rep['records_in']} records in, {rep['records_matched']} matched"
    ]
    rate = rep["window_seconds"] > 0
    out.append(
        "noisiest rules (hits since start"
        + (f", hits/s over {rep['window_seconds']:.1f} s" if rate else "")
        + "):"
    )
    if not rep["noisiest"]:
        out.append("  (no detections yet)")
    for row in rep["noisiest"]:
        per = f" {row.get('hits_per_second', 0.0):>10.2f}/s" if rate else ""
        name = f"  {names[row['rule_id']]}" if row["rule_id"] in names else ""
        out.append(f"  {row['hits']:>10}{per}  {row['rule_id']}{name}")
    if rep["cost_samples"]:
        out.append(
            f"costliest rules (reference-evaluator time per record, "
            f"{rep['cost_samples']} sampled records):"
        )
        for row in rep["costliest"]:
            name = f"  {names[row['rule_id']]}" if row["rule_id"] in names else ""
            out.append(
                f"  {row['mean_us_per_record']:>10.1f} us {row['share'] * 100:5.1f}%  "
                f"{row['rule_id']}{name}"
            )
    else:
        out.append(
            "costliest rules: no samples (set metrics.rule_cost_sample: N in the relay's "
            "config to time the rules on 1 chunk in N)"
        )
    return "\n".join(out)


def main_stats(ns: argparse.Namespace) -> int:
    """Entry point of ``ruletag rules stats``."""
    url = metrics_url(ns.metrics)
    try:
        first = scrape(url)
        last = None
        if ns.interval and ns.interval > 0:
            time.sleep(ns.interval)
            last = scrape(url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"ruletag: {url}: {exc}", file=sys.stderr)
        return 1
    rep = report(first, last, max(1, ns.top))
    if ns.json:
        print(json.dumps(rep))
    else:
        print(to_text(rep, _names(getattr(ns, "rules", None))))
    return 0
