"""The pipeline config: ``model`` (frozen dataclasses, every default) and ``load`` (YAML file,
mapping or ``serve`` flags to a ``Config``; every error names its key path)."""
