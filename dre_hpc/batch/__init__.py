"""dre-batch: chunked runs of the tile workflow on SLURM, PBS or the local machine.

`config` reads and validates the run config, `chunking` splits a tile's objects into chunks
and derives per-object random seeds that do not depend on the chunking.
"""
