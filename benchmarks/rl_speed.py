"""bench.py rl: how many replies per second RL's sampling makes, with the executor's runs one by one
against side by side (chat.CachedRunner.prefetch), on the same tasks from the same seed.

An RL step samples 8 replies to each of 8 prompts from the absorbed latent cache; fn replies call
the executor and are then checked by it. Each executor run is a child Python that mostly waits
(its start, the kernel's limits), while the sampler holds one core: run side by side, the children
use the other. The two arms alternate round by round within one run, each with a fresh cache of
programs, so both pay for every run and the machine's noise falls on both. The replies are the
same in both arms (checked): only the time differs.
"""
import random
import time

import torch

import chat
import data
from benchmarks.common import check_flags, print_table, write_json
from checkpoint import load_pretrained


def sample_round(model, c, tasks, group: int, seed: int, workers: int):
    """One RL step's sampling and scoring (rollout + the fn checks) -> (seconds, episodes, scores)."""
    runner = chat.CachedRunner(workers=workers)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    eps = chat.rollout(model, c, [t for t in tasks for _ in range(group)], 1.0, gen, runner)
    chat.prefetch_scores(eps, runner)
    scores = [chat.score(e.task, e.reply, runner) for e in eps]
    return time.perf_counter() - t0, eps, scores


def bench_rl(a):
    check_flags(a, at_least={"rounds": 1, "prompts": 1, "group": 1, "workers": 2, "seed": 0})
    torch.set_num_threads(1)  # as posttrain.py runs (--threads 1)
    model = load_pretrained(a.ckpt, "cpu")
    c = chat.Chat(data.load_encoding(a.ckpt))
    arms = {"one by one": 1, f"side by side ({a.workers} threads)": a.workers}
    totals = {name: [0.0, 0] for name in arms}
    for r in range(a.rounds):
        rng = random.Random(a.seed + r)
        tasks = [chat.make_task(k, rng, "train", {}) for k in ("add", "copy", "reverse", "fn") * (a.prompts // 4 + 1)]
        tasks = tasks[:a.prompts]
        replies = None
        for name, workers in (arms.items() if r % 2 == 0 else reversed(arms.items())):
            dt, eps, scores = sample_round(model, c, tasks, a.group, a.seed + r, workers)
            if replies is not None and replies != ([e.ids for e in eps], scores):
                raise RuntimeError("the two arms sampled different replies: the comparison is void")
            replies = ([e.ids for e in eps], scores)
            totals[name][0] += dt
            totals[name][1] += len(eps)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {t[1] / t[0]:.1f} replies/s" for n, t in totals.items()),
              flush=True)
    rows = [{"executor runs": name, "replies": n, "seconds": round(t, 2), "replies/s": round(n / t, 1)}
            for name, (t, n) in totals.items()]
    base = rows[0]["replies/s"]
    for row in rows:
        row["vs one by one"] = f"{row['replies/s'] / base:.2f}x"
    print_table(rows, ["executor runs", "replies", "seconds", "replies/s", "vs one by one"])
    write_json("rl", {"ckpt": a.ckpt, "rounds": a.rounds, "prompts": a.prompts, "group": a.group, "rows": rows})


def add_parser(sub):
    p = sub.add_parser("rl", help="RL sampling: replies/s with the executor's runs one by one vs side by side")
    p.add_argument("--ckpt", default="out/sft", help="a chat checkpoint (posttrain.py sft's)")
    p.add_argument("--rounds", type=int, default=6, help="sampling rounds per arm (alternating)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per round (kinds add, copy, reverse, fn in turn)")
    p.add_argument("--group", type=int, default=8, help="replies per prompt")
    p.add_argument("--workers", type=int, default=4, help="threads for the side-by-side arm")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=bench_rl)
