"""Detection rules: front-ends (Sigma; Elastic EQL, KQL, ES|QL) to IR, rule selection, the
compiled pattern table (``compiler``) and its runtime matcher (``matcher``)."""
