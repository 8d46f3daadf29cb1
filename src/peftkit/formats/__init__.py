"""Foreign adapter formats."""
