"""A running relay: ``relay`` (build from a config, run, stop), ``reload`` (the live rule
filter and its hot reload), ``metrics`` (/metrics, /health), ``rulecost`` (sampled per-rule
cost), ``workers`` (N processes), ``logs``."""
