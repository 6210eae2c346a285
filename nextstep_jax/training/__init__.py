"""Training library: optimizer, train state and step, checkpoints, metrics, multi-host set-up."""
