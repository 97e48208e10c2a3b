"""Detection rules: front-ends (Sigma, EQL) to IR, and the compiled pattern table."""
