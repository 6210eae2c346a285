"""Training library: the loop both tasks share and the tasks (NextStep, the VAE), optimizer, train state and
step, checkpoints, metrics, multi-host set-up."""
