"""The package version (one place; read by the package, the file writers and the CLI)."""

__version__ = "0.1.0"
