"""The lab: data, training step, checkpoints, sharding and evaluation for length extrapolation."""
