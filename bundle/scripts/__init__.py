"""IRIS in-context segmentation: the Python package that the bundle's configs import as ``scripts``."""

from .errors import install

install()  # user errors end a command with their message, not a config traceback (see errors.py)
