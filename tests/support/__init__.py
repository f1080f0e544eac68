"""Shared test helpers, imported as `support.<module>`: tests/conftest.py puts tests/ on sys.path."""
