"""atoms: find the atoms of large language models (Atom Theory) and measure them.

One subpackage per stage, in the order of the data flow; a stage imports only the ones before
it, and only the ``ray_*`` modules use Ray:

    core → store → extract → aip → sae → evaluate → train → study
"""

__version__ = "0.1.0"
