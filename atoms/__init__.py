"""atoms: find the atoms of large language models (Atom Theory) and measure them."""

__version__ = "0.1.0"
