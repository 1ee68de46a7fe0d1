"""jpe: Transformer positional encodings for JAX, and a lab for length extrapolation."""
