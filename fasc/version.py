"""The package version (its own module, so that submodules read it without importing `fasc`)."""

__version__ = "0.1.0"
