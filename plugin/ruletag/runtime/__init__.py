"""A running relay: ``relay`` (build from a config, run, stop), ``reload`` (the live rule
filter and its hot reload), ``metrics`` (/metrics, /health), ``workers`` (N processes), ``logs``."""
