"""Latency predictors: LPNet (a differentiable layer-level network) and scikit-learn baselines."""
