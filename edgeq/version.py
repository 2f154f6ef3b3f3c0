"""The package version, in a module of its own so that edgeq's modules can name it without importing edgeq."""

__version__ = "0.1.0"
