"""The benchmarks behind `python bench.py NAME`, one module per topic: train_speed, optim, kv, kernel_speed, dist,
testbed, smollm2. Shared helpers (JSON output, tables, FLOP counts) are in common.py."""
