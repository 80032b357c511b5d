"""pick."""
