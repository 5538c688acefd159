"""IRIS in-context segmentation: the Python package that the bundle's configs import as ``scripts``."""
