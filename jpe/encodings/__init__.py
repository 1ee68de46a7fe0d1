"""Pure functions: encoding tables, rotations, attention biases and positions."""
