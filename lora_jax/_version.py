"""The library version, in its own module so lower floors can record it without a cycle."""

__version__ = "0.1.0"
