"""Where the tests' data lives.

Everything the suite needs travels with the repository: the recorded Fluent Bit streams in
``tests/data/captures/``, the seed rules bundled with the package, and a pinned sample of the
Sigma and Elastic corpora in ``tests/data/corpus/`` (see ``tests/data/README.md``). The whole
corpora are read only from the folder named by ``RULETAG_CORPUS`` (holding ``sigma/`` and
``elastic/``); the tests that need them are marked with :data:`needs_corpus`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
DATA = TESTS / "data"
JS_DIR = TESTS / "js"

CAPTURES = DATA / "captures"
CAPTURE_DIRS = (CAPTURES, CAPTURES / "fluent-bit-5.1.1")

SEED_RULES = REPO / "plugin" / "ruletag" / "data" / "rules"
SIGMA_SEED = SEED_RULES / "net_connection_win_wuauclt_network_connection.yml"
ELASTIC_SEED = SEED_RULES / "potential_wsus_abuse_for_lateral_movement.toml"

SAMPLE = DATA / "corpus"
CORRELATION = DATA / "correlation"  # Sigma correlation fixtures (test_correlation.py)

CORPUS_ENV = "RULETAG_CORPUS"
CORPUS_HOWTO = f"{CORPUS_ENV}=../shared/rules make test"


def seed_rule_files() -> list[Path]:
    """The seed rule files (the bundled folder also holds their license texts)."""
    return sorted(p for p in SEED_RULES.iterdir() if p.suffix in (".yml", ".toml"))


def _corpus_root() -> Path | None:
    value = os.environ.get(CORPUS_ENV, "").strip()
    return Path(value).expanduser().resolve() if value else None


CORPUS_ROOT = _corpus_root()

#: Marks a test that reads a whole corpus: it runs only when RULETAG_CORPUS is set.
needs_corpus = pytest.mark.skipif(
    CORPUS_ROOT is None,
    reason=f"whole-corpus test: {CORPUS_ENV} is not set (run: {CORPUS_HOWTO})",
)


def corpus(name: str) -> Path:
    """``$RULETAG_CORPUS/<name>`` (``sigma`` or ``elastic``); fails if it is not a folder."""
    assert CORPUS_ROOT is not None, f"{CORPUS_ENV} is not set"
    folder = CORPUS_ROOT / name
    assert folder.is_dir(), f"{CORPUS_ENV}={CORPUS_ROOT} has no {name}/ folder"
    return folder
