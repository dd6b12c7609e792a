"""Channel ranking criteria: per-group channel order and residual-loss curve, the papers' criteria, their activation
signals."""
