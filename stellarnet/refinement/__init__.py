"""refinement."""
