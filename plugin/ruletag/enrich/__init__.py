"""The rule stage: ``filter`` (scan a chunk, annotate matched records, re-tag) and
``annotate`` (the ``detections`` objects). Synchronous and pure: no I/O."""
