"""Benchmarks (not tests): each prints a table and writes JSON to out/bench/<name>.json.

    python bench.py train     tokens/s of a tiny-preset training step, eager vs compiled, and MFU
    python bench.py optim     AdamW vs MuonClip at equal tokens; the QK-Clip demonstration
    python bench.py optim-match   tokens (and step seconds) MuonClip needs to reach AdamW's loss
    python bench.py optim-clip    QK-Clip's cost: val loss with and without the clip, paired by seed
    python bench.py quickstart    train.py settings at equal wall time (real runs, --time-budget), by val bpb
    python bench.py kv        KeepKV and baselines on the latent cache at equal bytes; decode speed, memory
    python bench.py kv --model smollm2   the same policies on SmolLM2-135M (a model that uses its context)
    python bench.py testbed   builds (once) the long-context model `bench.py kv` uses; loss by position
    python bench.py kernels   Triton kernels vs their torch references (GPU; interpreter on CPU)
    python bench.py dist      tokens/s with 1 and 2 processes (FSDP2), optimizer and communication share
    python bench.py rl        RL sampling: replies/s with the executor's runs one by one vs side by side

Each lives in benchmarks/<name>.py, which adds its own subcommand and flags (add_parser) and says
what it measures; `bench.py dist-worker` is one rank of `bench.py dist`, launched by it, and
optim-match and optim-clip live together in benchmarks/optim_claims.py; train and kernels live in
benchmarks/train_speed.py and kernel_speed.py (apart from the top-level train.py and kernels.py), and
`kv --model smollm2` in benchmarks/kv_smollm2.py.
Machines are noisy: every ratio here is measured side by side within one run.
"""
import argparse
import sys

import benchmarks.dist
import benchmarks.kernel_speed
import benchmarks.kv
import benchmarks.optim
import benchmarks.optim_claims
import benchmarks.quickstart
import benchmarks.rl_speed
import benchmarks.testbed
import benchmarks.train_speed
from config import DefaultsHelpFormatter

# in the order `--help` lists them; benchmarks.dist adds both dist and dist-worker
MODULES = (benchmarks.train_speed, benchmarks.optim, benchmarks.optim_claims, benchmarks.quickstart, benchmarks.kv,
           benchmarks.testbed, benchmarks.kernel_speed, benchmarks.dist, benchmarks.rl_speed)


def main(argv=None):
    """Run one benchmark. Bad input (a flag out of range, a missing or corrupt file: each benchmark
    checks its flags before any work) is one line on stderr and exit status 2, not a traceback."""
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for module in MODULES:
        module.add_parser(sub)
    for parser in (p, *sub.choices.values()):  # one line, no usage block; --help with the defaults
        parser.error = lambda message, q=parser: q.exit(2, f"error: {message} (see: python {q.prog} --help)\n")
        parser.formatter_class = DefaultsHelpFormatter
    a = p.parse_args(argv)
    try:
        a.fn(a)
    except (ValueError, FileNotFoundError, ImportError) as e:  # the message names the fix
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
