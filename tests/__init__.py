"""Tests of the xai-pipeline package (a package, so that helper modules import as ``tests.<name>``)."""
