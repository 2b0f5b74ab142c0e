"""dre_hpc: brute-force galaxy shape fits (DRE) at survey scale."""

__version__ = "0.1.0"
