"""ruletag: inline Sigma / Elastic EQL detection tagging for Fluent forward-protocol pipelines."""

__version__ = "0.1.0"
__all__ = ["__version__"]
