"""Test helpers shared across test folders (importable because pytest runs with ``pythonpath = ["tests"]``)."""
