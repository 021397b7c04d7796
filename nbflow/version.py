"""nbflow's version: the one place it is written (pyproject.toml reads it; the ledger records it).

Imports nothing, so any module may import it without importing the package's face.
"""

__version__ = "0.1.0"
