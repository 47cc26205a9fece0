"""xai-pipeline: saliency maps for image classifiers, computed and scored at cluster scale.

The public entry points are the subpackages :mod:`pipeline.methods` and
:mod:`pipeline.metrics`, the run helpers below and the ``xai-pipeline`` command.
"""
__version__ = "0.1.0"

__all__ = ["__version__"]
