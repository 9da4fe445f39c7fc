"""The benchmarks behind `python bench.py NAME`, one module per topic: train, optim, kv, kernels, dist.
Shared helpers (JSON output, tables, FLOP counts) are in common.py. The modules import the
repository's top-level modules absolutely (`import train` is train.py, not benchmarks/train.py)."""
