"""Low-level file helpers shared by every package that writes (checkpoints, data builds, images)."""
