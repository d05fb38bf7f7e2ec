"""Training: optimizer, train state, the jitted step, metrics and the loop."""
