"""The adapter engine: sites, targeting, the method registry, save/load."""
