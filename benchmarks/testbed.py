"""bench.py testbed: a small model that uses long context, built once and cached, for `bench.py kv`.

What it measures: the validation loss of the testbed model by position in a 1024-token window
(buckets of 128 positions), on files it never trained on (data.py's val split, split by file).
The claim it checks: the loss falls with position, also in the second half of the window. Only a
model that gains from distant context can rank KV-cache policies: on one that does not, dropping
old entries costs nothing and StreamingLLM (sinks + recent window) looks as good as the full cache.

The build is train.py's own loop (train.main): the tiny preset at --max-seq-len 1024 --seq-len 1024
with a fixed seed and step count, written to out/testbed/<hash of the train flags>/.

Why a copy task. Using distant context means, first of all, induction: "the last time this token
came, that one followed". Transformers learn it in a sudden phase change, but on natural text only
after far more tokens than 25 CPU minutes see. Measured here: a 300-step build on plain stdlib
windows ends with a flat loss by position. After 240 steps in which spans of each window were also
copied further on (up to ~40% of the tokens), and after 360 steps with half the rows a copy task of
16-512-token runs at lr 1e-2, a passage of 400-512 tokens repeated verbatim was predicted no better
the second time. Probes on rows of 64 tokens written twice (32 rows, Muon): the second copy's loss
collapses at ~180 steps at lr 1e-2 (none within 300 at 3e-3) on a 2-layer model, at ~150 on the
tiny preset; but with the copy always 64 back, a head that attends 64 positions back does that
without induction. So the testbed trains in two stages: first the copy task alone (COPY_STEPS
steps of 32 rows of 128 tokens of data.copy_task_row: unigram-sampled runs of 16-96 tokens, each
written twice, only the repeats scored, so the offset varies; Muon lr 1e-2, no weight decay, no lr
decay), then DEFAULT_STEPS steps of stdlib windows of 1024 tokens from its weights (train.py
--init-from; lr 1e-2, train.py's default is 3e-3). What is reported is measured on natural
held-out files. Whether the copy stage is long enough is what `bench.py testbed` prints (the
README has the result).

A folder whose
testbed.json holds the same flags and whose train_state.json is at the last step is reused as is;
one left unfinished (Ctrl-C, a crash) resumes with --resume, so no step is trained twice.

CPU budget: at most 25 minutes on an idle 2-core machine: DEFAULT_STEPS x DEFAULT_BATCH sequences of
1024 tokens (~2.9M tokens; two thirds of them stdlib windows, ~2/3 of a pass over its train split), ~20 minutes
plus the final eval (see SECONDS_PER_SEQUENCE for how). On a machine with CUDA, train.py trains in
bf16 instead; the folder's hash covers the flags, not the device.
"""
import hashlib
import json
import math
import os
import shlex
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
from checkpoint import load_pretrained

CONTEXT = 1024
DEFAULT_STEPS = 480          # the main stage: the stdlib, 4 x 1024 tokens per step
DEFAULT_BATCH = 4
COPY_STEPS, COPY_BATCH, COPY_LEN = 300, 32, 128   # the copy stage: 32 x 128 tokens per step
DEFAULT_ROOT = "out/testbed"
LR = 1e-2
# Seconds one 1024-token training sequence of the tiny preset takes on an idle 2-core CPU (forward,
# backward, its share of the MuonClip step): train.py's own step times, 1.58 to 1.75 s per step of
# 4 x 1024 tokens (~2,450 tok/s), measured over 12 steps in a moment when this machine was idle.
# 480 x 4 x 1024 + 300 x 32 x 128 tokens: ~19 min, + about a minute for the evals and the saves.
SECONDS_PER_SEQUENCE = 0.42


# ----------------------------------------------------------------------------- build (cached)

def train_flags(steps=DEFAULT_STEPS, batch=DEFAULT_BATCH, context=CONTEXT, data_path=None,
                seed=1337, model_flags="", copy_steps=COPY_STEPS) -> list[str]:
    """train.py's flags for the testbed's main stage: everything the weights depend on (the hash
    covers them). With copy_steps > 0 they start from the copy stage's weights: `--init-from
    copy-task:STEPSxBATCHxLEN` names it, and build_testbed trains it first (copy_stage_flags).
    model_flags: extra train.py flags, e.g. a smaller model for tests ("--dim 32 --n-layers 2")."""
    flags = ["--preset", "tiny", "--max-seq-len", str(context), "--seq-len", str(context),
             "--batch-size", str(batch), "--max-steps", str(steps), "--seed", str(seed), "--lr", str(LR)]
    if copy_steps:
        flags += ["--init-from", f"copy-task:{copy_steps}x{COPY_BATCH}x{min(COPY_LEN, context)}"]
    if data_path is not None:
        flags += ["--data", os.path.abspath(data_path)]
    return flags + shlex.split(model_flags)


def copy_stage_flags(flags: list[str]) -> list[str] | None:
    """The copy stage of a testbed's flags (None if it has none): the same model, seed, lr and
    data, trained on data.copy_task_row rows only (--copy-rows = --batch-size for every step)."""
    marker = flags[flags.index("--init-from") + 1] if "--init-from" in flags else ""
    if not marker.startswith("copy-task:"):
        return None
    steps, batch, length = marker.split(":")[1].split("x")
    out = list(flags)
    i = out.index("--init-from")
    del out[i:i + 2]
    for name, value in (("--seq-len", length), ("--batch-size", batch), ("--max-steps", steps)):
        out[out.index(name) + 1] = value
    # no weight decay and no lr decay: the phase change comes late in the stage, at full lr
    return out + ["--copy-rows", batch, "--copy-steps", steps, "--weight-decay", "0", "--decay-frac", "0"]


def folder_for(root: str, flags: list[str]) -> str:
    return os.path.join(root, hashlib.sha1(json.dumps(flags).encode()).hexdigest()[:12])


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_finished(folder: str, flags: list[str]) -> bool:
    """A complete testbed of exactly these flags: testbed.json records them, and train.py's
    train_state.json (written last by every save) is at the final step."""
    info, state = _read_json(os.path.join(folder, "testbed.json")), _read_json(
        os.path.join(folder, "train_state.json"))
    steps = int(flags[flags.index("--max-steps") + 1])
    return (info is not None and info.get("flags") == flags and state is not None
            and state.get("step") == steps and os.path.exists(os.path.join(folder, "model.safetensors")))


def estimate_minutes(flags: list[str]) -> float:
    get = lambda f, name: int(f[f.index(name) + 1])  # noqa: E731
    stages = [f for f in (copy_stage_flags(flags), flags) if f is not None]
    return sum(get(f, "--max-steps") * get(f, "--batch-size") * get(f, "--seq-len") for f in stages) \
        / CONTEXT * SECONDS_PER_SEQUENCE / 60


def _train_stage(train, flags, folder, cache_dir, log):
    """train.main on `flags` into `folder`, resumed if a save of the same run is there."""
    steps = int(flags[flags.index("--max-steps") + 1])
    state = _read_json(os.path.join(folder, "train_state.json"))
    if state is not None and state.get("step") == steps:
        return None
    run = ["--out-dir", folder, "--eval-every", str(steps), "--save-every", str(max(1, steps // 6)),
           "--log-every", str(max(1, steps // 30))] + (["--cache-dir", cache_dir] if cache_dir else [])
    if state is not None:
        log(f"testbed: resuming {folder} from step {state.get('step')}")
    final = train.main(flags + run + (["--resume"] if state is not None else []))
    state = _read_json(os.path.join(folder, "train_state.json"))
    if final is None or state is None or state.get("step") != steps:  # stopped early (Ctrl-C, --stop-at)
        raise RuntimeError(f"testbed training in {folder} stopped before its last step; run again "
                           f"to resume it")
    return final


def build_testbed(flags: list[str], root: str = DEFAULT_ROOT, cache_dir: str | None = None,
                  log=print) -> str:
    """The folder of the testbed trained with `flags`: reused when finished, else trained (or
    resumed) now with train.main. cache_dir: data.py's token cache (not part of the hash)."""
    import train  # the top-level train.py (benchmarks/train.py is benchmarks.train)
    folder = folder_for(root, flags)
    if is_finished(folder, flags):
        log(f"testbed: reusing {folder} (finished, same flags)")
        return folder
    resume = (os.path.exists(os.path.join(folder, "train_state.json"))
              and (_read_json(os.path.join(folder, "testbed.json")) or {}).get("flags") == flags)
    log(f"testbed: {'resuming' if resume else 'training'} the long-context testbed in {folder}: "
        f"{' '.join(flags)}\ntestbed: about {estimate_minutes(flags):.1f} min on an idle 2-core CPU "
        f"(once; later runs reuse it). Ctrl-C saves; the next run resumes.")
    os.makedirs(folder, exist_ok=True)
    if not resume:
        with open(os.path.join(folder, "testbed.json"), "w") as f:
            json.dump({"flags": flags}, f, indent=1)
    t0 = time.time()
    main = list(flags)
    copy = copy_stage_flags(flags)
    if copy is not None:   # first the copy task, into a subfolder; the main stage starts from it
        log(f"testbed: stage 1, the copy task: {' '.join(copy)}")
        _train_stage(train, copy, os.path.join(folder, "copy-task"), cache_dir, log)
        main[main.index("--init-from") + 1] = os.path.join(folder, "copy-task")
        log("testbed: stage 2, the stdlib")
    final = _train_stage(train, main, folder, cache_dir, log)
    with open(os.path.join(folder, "testbed.json"), "w") as f:
        json.dump({"flags": flags, "train_minutes": round((time.time() - t0) / 60, 2),
                   "final": final}, f, indent=1)
    return folder


# ----------------------------------------------------------------------------- held-out tokens

def val_tokens(enc, data_path, val_frac=0.05):
    """The validation split (files the model never trained on: data.py splits by file), encoded
    with the checkpoint's own tokenizer, documents joined by EOT as in training."""
    root, rel = data.list_files(data_path)
    _, val_docs = data.read_splits(root, rel, val_frac)
    ids = []
    for i, doc in enumerate(enc.encode_ordinary_batch(val_docs)):
        ids += ([enc.eot_token] if i else []) + doc
    return np.asarray(ids, dtype=np.int64)


# ----------------------------------------------------------------------------- loss by position

@torch.no_grad()
def position_nll(model, tokens, context, windows, batch, device="cpu") -> torch.Tensor:
    """Per-token NLL [N, context] on N fixed val windows (data.eval_batches: spread evenly)."""
    model.eval()
    out = []
    for x, y in data.eval_batches(tokens, batch, context, math.ceil(windows / batch)):
        logits = model(x.to(device))
        out.append(F.cross_entropy(logits.transpose(1, 2).float(), y.to(device), reduction="none").cpu())
    return torch.cat(out)[:windows]


def bucket_means(nll: torch.Tensor, bucket: int) -> list[dict]:
    """Mean NLL over windows and over each run of `bucket` positions (the last run may be short)."""
    T = nll.shape[1]
    idx = torch.arange(T) // bucket
    n = int(idx[-1]) + 1
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, nll.double().sum(0))
    counts = torch.bincount(idx, minlength=n).double() * nll.shape[0]
    return [{"start": b * bucket, "end": min(T, (b + 1) * bucket) - 1, "nll": (sums[b] / counts[b]).item()}
            for b in range(n)]


def uses_context(buckets: list[dict]) -> bool:
    """The claim: the loss falls over the window, and still falls over its second half."""
    nll = [b["nll"] for b in buckets]
    return len(nll) >= 3 and nll[-1] < nll[len(nll) // 2] < nll[0]


# ----------------------------------------------------------------------------- the command

def add_parser(sub):
    p = sub.add_parser("testbed", help="build (once) the long-context model for `bench.py kv`; loss by position")
    p.add_argument("--tb-steps", type=int, default=DEFAULT_STEPS, help="steps of the main (stdlib) stage")
    p.add_argument("--tb-copy-steps", type=int, default=COPY_STEPS, help="steps of the copy stage (0: none)")
    p.add_argument("--tb-batch", type=int, default=DEFAULT_BATCH, help="sequences per step")
    p.add_argument("--tb-context", type=int, default=CONTEXT, help="training and evaluation window")
    p.add_argument("--tb-data", default=None, help="corpus (default: the Python stdlib)")
    p.add_argument("--tb-model-flags", default="", help="extra train.py flags, e.g. a smaller model")
    p.add_argument("--tb-root", default=DEFAULT_ROOT, help="cache folder; one subfolder per flags hash")
    p.add_argument("--tb-cache-dir", default=None, help="data.py's token cache (default: .cache)")
    p.add_argument("--tb-windows", type=int, default=10**6,
                   help="val windows for the loss by position (default: all, 123 on the stdlib's val split)")
    p.add_argument("--tb-bucket", type=int, default=128, help="positions per bucket")
    p.add_argument("--tb-out", default="out/bench/testbed.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(fn=bench_testbed)
    return p


def bench_testbed(a, log=print):
    t0 = time.time()
    flags = train_flags(a.tb_steps, a.tb_batch, a.tb_context, a.tb_data, model_flags=a.tb_model_flags,
                        copy_steps=a.tb_copy_steps)
    folder = build_testbed(flags, a.tb_root, a.tb_cache_dir, log)
    model = load_pretrained(folder, a.device)
    tokens = val_tokens(data.load_encoding(folder), a.tb_data)
    nll = position_nll(model, tokens, a.tb_context, a.tb_windows, 4, a.device)
    buckets = bucket_means(nll, a.tb_bucket)
    ok = uses_context(buckets)
    log(f"\ntestbed {folder}: val loss by position, {nll.shape[0]} held-out windows of {a.tb_context}")
    log("| positions | loss (nats/token) |\n|---|---|")
    for b in buckets:
        log(f"| {b['start']}-{b['end']} | {b['nll']:.3f} |")
    log(f"claim (loss falls with position, also over the window's second half): "
        f"{'holds' if ok else 'FAILS: this model does not use long context; do not rank KV policies on it'}")
    res = {"folder": os.path.abspath(folder), "flags": flags, "windows": nll.shape[0],
           "context": a.tb_context, "bucket": a.tb_bucket, "buckets": buckets, "mean_nll": nll.mean().item(),
           "uses_context": ok, "build": _read_json(os.path.join(folder, "testbed.json")),
           "seconds": time.time() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(a.tb_out)), exist_ok=True)
    with open(a.tb_out, "w") as f:
        json.dump(res, f, indent=1)
    log(f"testbed: wrote {a.tb_out}")
    return res
