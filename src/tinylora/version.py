"""The package version, written into every adapter file and pack."""

__version__ = "0.1.0"
