"""The casp version, in a module of its own so that any module can import it without
importing the package's public API (which imports most of casp)."""
__version__ = "0.1.0"
