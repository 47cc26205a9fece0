"""Imported at start-up by the cluster tests' job processes (on their PYTHONPATH): see tests/launching/layout.py."""
from tests.launching.layout import install

install()
