"""IRIS in-context segmentation: the Python package that the bundle's configs import as ``scripts``.

Importing it changes nothing global: the entry points (the configs' run lists, ``scripts/segment.py``, the MONAI Label
app) switch on the one-line error messages of :func:`scripts.errors.install` themselves.
"""
