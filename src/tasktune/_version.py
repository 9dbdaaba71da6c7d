"""The version, in a leaf module (the package's __init__ imports the API, which imports the pipeline)."""

__version__ = "0.1.0"
