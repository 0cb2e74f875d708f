"""Analyses of checkpoints: where and how much training changed the parameters (layer_deltas)."""
