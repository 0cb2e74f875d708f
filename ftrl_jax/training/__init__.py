"""Training machinery shared by SFT and RL: train state, optimizer, checkpoints, token log-probs, the
supervised step, the oracle-trajectory warm start, metrics logging."""
