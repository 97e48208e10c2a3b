"""Helpers shared by the test modules (``tests/`` is on ``sys.path``, so ``import support``).

- ``paths``: where the data lives (captures, seed rules, corpus sample, ``RULETAG_CORPUS``).
- ``seeds``: the seed rules' ids, expected IR and a record that fires the Sigma seed.
- ``codec``: captures, in-memory replay and a client/server link for the sans-IO codec.
- ``peers``: ``Sink`` and ``Source`` forward peers, chunk builders, ``eventually``.
- ``servers``: an in-process relay, a fast ``Forwarder``, ``ruletag serve`` subprocesses, the
  console script, certificates; ``require`` fails (never skips) when a peer is missing.
- ``reliability``: the figures the reliability tests report.
- ``strategies``: hypothesis strategies for arbitrary msgpack values.
"""
