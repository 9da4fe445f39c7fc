"""bench.py dist: tokens/s of a training step with one process and with FSDP2 (CPU: 1 and 2 gloo
ranks of one thread each, against 1 process with 1 and 2 threads; one GPU: plain vs FSDP2 on 1
rank), and the share of the step spent in the optimizer and in communication. The claim it checks:
what FSDP2 and the sharded MuonClip cost and gain over one process on the same cores. Each
configuration is a separate process running `bench.py dist-worker` (under torchrun for FSDP2)."""
import json
import os
import sys
import time

import numpy as np
import torch

import data
from benchmarks.common import (GPU_BF16_PEAK, _sync, check_flags, check_preset, print_table,
                               train_flops_per_token, write_json)

# the entry point the workers run: `bench.py dist-worker ...` calls dist_worker below
BENCH_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")

# what a training step calls (not barrier: the bench's own step-start barrier is outside the timing)
COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_reduce", "all_to_all_single", "broadcast")


class BlockingCollectives:
    """Time every torch.distributed collective by making it blocking: each call (FSDP2's
    all-gathers and reduce-scatters, Muon's all_to_all, train.py's all-reduces) waits for its
    result before returning, and the wait is added to `seconds`. This removes any overlap of
    communication with compute, so the share it gives is what communication would cost unhidden."""

    def __init__(self, device):
        self.device, self.seconds, self.saved = device, 0.0, {}

    def __enter__(self):
        import torch.distributed as dist
        for name in COLLECTIVES:
            orig = self.saved[name] = getattr(dist, name)

            def timed(*args, _orig=orig, **kw):
                _sync(self.device)
                t0 = time.perf_counter()
                work = _orig(*args, **kw)
                if work is not None and hasattr(work, "wait"):
                    work.wait()
                _sync(self.device)
                self.seconds += time.perf_counter() - t0
                return work
            setattr(dist, name, timed)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        for name, orig in self.saved.items():
            setattr(dist, name, orig)


def dist_worker(a):
    """One rank of `bench.py dist` (launched by it, under torchrun or alone): timed train.py steps
    on random tokens, then the same steps with collectives made blocking and timed."""
    import config
    import parallel
    import train
    _check(a)
    args = train.parse_args(["--preset", a.preset, "--batch-size", str(a.batch_size),
                             "--seq-len", str(a.seq_len), "--grad-clip", "1.0"])
    d, device = parallel.setup_distributed(args)
    use_compile = device.type == "cuda"
    margs = config.args_from_flags(args, 8192)
    model = parallel.make_model(margs, d, device, args.seed, use_compile)
    optimizer = train.build_optimizer(model, args)
    model.set_record_max_logits(True)
    tokens = np.random.default_rng(0).integers(0, 8192, 1_000_000).astype(np.uint16)
    sampler = data.BatchSampler(tokens, args.batch_size, args.seq_len, seed=0, rank=d.rank, world_size=d.world)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run(first, n):
        total = opt = 0.0
        for i in range(first, first + n):
            d.barrier()
            _sync(device)
            t0 = time.perf_counter()
            x, y = sampler.get_batch(i)
            train.forward_backward(model, x, y, args, device, autocast, d)
            opt += train.optimizer_step(model, optimizer, args, d)[1]
            _sync(device)
            total += time.perf_counter() - t0
        return total / n, opt / n

    run(0, a.warmup)
    step_s, opt_s = run(a.warmup, a.steps)
    with BlockingCollectives(device) as comm:
        blocking_s, _ = run(a.warmup + a.steps, a.steps)
    if d.main:
        row = {"ms_per_step": step_s * 1e3, "tok_s": args.batch_size * args.seq_len / step_s,
               "opt_frac": opt_s / step_s, "comm_frac": comm.seconds / a.steps / blocking_s,
               "blocking_ms": blocking_s * 1e3}
        if device.type == "cuda":
            peak = next((v for k, v in GPU_BF16_PEAK.items() if k in torch.cuda.get_device_name()), None)
            flops = train_flops_per_token(margs, args.seq_len) * row["tok_s"]
            row["mfu_vs_bf16_peak"] = flops / peak if peak else None
        with open(a.json, "w") as f:
            json.dump(row, f)
    d.close()


def bench_dist(a):
    """Tokens/s of a training step with 1 process and with FSDP2 over 1 and 2 ranks (CPU: gloo,
    one thread per process; the 2-thread single process is the same cores used the other way),
    the share of the step in the optimizer, and in communication (collectives made blocking)."""
    import subprocess
    import tempfile
    _check(a)
    cuda = torch.cuda.is_available()
    if not cuda and a.batch_size % 2:
        raise ValueError(f"--batch-size must be even on a CPU (the batch is split over 2 ranks), got {a.batch_size}")
    if cuda:  # one GPU here: the single-GPU numbers, and FSDP2's overhead on one rank
        configs = [("1 GPU, no FSDP", 0, None), ("FSDP2, 1 rank", 1, None)]
    else:
        configs = [("1 process, 1 thread", 0, 1), ("1 process, 2 threads", 0, 2),
                   ("FSDP2, 1 rank x 1 thread", 1, 1), ("FSDP2, 2 ranks x 1 thread", 2, 1)]
    worker = ["dist-worker", "--preset", a.preset, "--batch-size", str(a.batch_size),
              "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, nproc, threads in configs:
            out = os.path.join(tmp, f"{len(rows)}.json")
            launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={nproc}"] if nproc else [sys.executable])
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            print(f"running: {name} ...", flush=True)
            r = subprocess.run([*launch, BENCH_PY, *worker, "--json", out], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            with open(out) as f:
                rows.append({"config": name, **json.load(f)})
    base = rows[0]["tok_s"]
    for r in rows:
        r["vs_first"] = r["tok_s"] / base
    print(f"\n{a.preset} preset, MuonClip, global batch {a.batch_size} x {a.seq_len}, "
          f"{a.steps} timed steps after {a.warmup}")
    print_table(rows, list(rows[-1]) if not cuda else list(rows[0]))
    write_json("dist", {"preset": a.preset, "batch_size": a.batch_size, "seq_len": a.seq_len,
                        "steps": a.steps, "rows": rows})



def _check(a):
    check_flags(a, at_least={"batch_size": 1, "seq_len": 1, "steps": 1, "warmup": 0})
    check_preset(a.preset, a.seq_len)


def add_parser(sub):
    for name, fn in (("dist", bench_dist), ("dist-worker", dist_worker)):
        dd = sub.add_parser(name, help=fn.__doc__.split("\n")[0])
        dd.add_argument("--preset", default="tiny")
        dd.add_argument("--batch-size", type=int, default=8)
        dd.add_argument("--seq-len", type=int, default=256)
        dd.add_argument("--steps", type=int, default=10)
        dd.add_argument("--warmup", type=int, default=3)
        if name == "dist-worker":
            dd.add_argument("--json", required=True)
        dd.set_defaults(fn=fn)
