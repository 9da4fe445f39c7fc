"""bench.py testbed: a small model that uses long context, built once and cached, for `bench.py kv`.

What it measures, on files the model never trained on (data.py's val split, split by file), in
1024-token windows and buckets of 128 positions:
  - the loss by position: printed, but not the test. Buckets hold different text, so on ~100 windows
    their means move by ~0.1 nats for reasons of content alone;
  - the gain from distant context, the test: the same tokens scored again with only the last 128-255
    tokens visible, minus their loss with the whole window (position_nll). Paired token by token,
    so the content cancels out; its standard error is ~0.005 nats.
The claim it checks: in every bucket of the window's second half, the gain is >= 0.01 nats/token and
>= 3 standard errors. Only a model that gains from distant context can rank KV-cache policies: on
one that does not, dropping old entries costs nothing and StreamingLLM (sinks + recent window) looks
as good as the full cache.

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
held-out files.

What that gives on 2 CPU cores: not enough. The 25-minute build reaches val 3.66 nats, but its gain
from tokens more than 128 back is within +-0.005 nats in every bucket (the README has the table):
it uses ~200 tokens of context. A probe of the induction task itself (2 layers, dim 128, rope dims
32, runs of 8-32 tokens drawn uniformly from 256 ids, written twice, 16 rows of 128, Muon lr 1e-2)
fell smoothly from 5.55 to 4.45 nats in 775 steps (1.6M tokens), the level that a bag of the
tokens seen recently gives, with no collapse: no induction yet. That is in line with the fit of
Aoyama et al. (2025, arXiv 2511.16893), if it carries over to this model: induction heads form after
~10^5.7 * sqrt(batch * context) training tokens, whatever the model size, i.e. ~2x10^7 at 16 x 128
and ~3x10^7 at 4 x 1024, while 25 CPU minutes train ~3x10^6. So the CPU
recipe is the best this budget gave, not a testbed that passes; RECIPES["cuda"] is the one sized
for induction, for a machine with a GPU.

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
from benchmarks.common import check_flags
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

# On a GPU the token count that content-based induction needs is minutes away, not hours: there the
# copy stage runs ~30x as many tokens (32x10^6, Aoyama et al.'s estimate for 32 x 128 per step) and
# the stdlib stage ~5x (about 3 passes over its train split). Written for the first GPU session to
# run; not yet run (no GPU was lent to the sessions that wrote it).
RECIPES = {"cpu": dict(steps=DEFAULT_STEPS, batch=DEFAULT_BATCH, copy_steps=COPY_STEPS),
           "cuda": dict(steps=600, batch=16, copy_steps=8000)}


def default_recipe(device) -> dict:
    """train_flags' steps, batch and copy_steps for the testbed built on `device`."""
    return RECIPES["cuda" if str(device).startswith("cuda") else "cpu"]


# train.py's defaults when the testbed was built, before the quickstart's changed (every step at full
# context; the 8192-token BPE). First, so that the flags may override them, and outside the hashed
# flags, so that testbeds built before keep their folders.
BUILT_WITH = ["--short-seq-frac", "0", "--vocab-size", "8192"]


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
    final = train.main(BUILT_WITH + flags + run + (["--resume"] if state is not None else []))
    state = _read_json(os.path.join(folder, "train_state.json"))
    if final is None or state is None or state.get("step") != steps:  # stopped early (Ctrl-C, --stop-at)
        raise RuntimeError(f"testbed training in {folder} stopped before its last step; run again "
                           f"to resume it")
    return final


def build_testbed(flags: list[str], root: str = DEFAULT_ROOT, cache_dir: str | None = None,
                  log=print) -> str:
    """The folder of the testbed trained with `flags`: reused when finished, else trained (or
    resumed) now with train.main. cache_dir: data.py's token cache (not part of the hash)."""
    import train
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
def position_nll(model, tokens, context, windows, batch, device="cpu", near=128, bucket=128):
    """Per-token NLL on `windows` fixed val windows (data.eval_batches: spread evenly), twice.
    full [windows, context]: each token sees the whole window before it.
    cut [windows, context]: each token sees at most near + bucket - 1 tokens before it: bucket by
    bucket, the window's tokens from (bucket start - near) on are run alone. The first buckets,
    which see no more than that anyway, are copied from full.
    Same tokens, same model: cut - full is what the distant context is worth, token by token."""
    model.eval()
    full, cut = [], []
    for x, y in data.eval_batches(tokens, batch, context, math.ceil(windows / batch)):
        x, y = x.to(device), y.to(device)
        nll = lambda xs, ys: F.cross_entropy(model(xs).transpose(1, 2).float(), ys, reduction="none")  # noqa: E731
        f = nll(x, y)
        c = f.clone()
        for s in range(-(-near // bucket) * bucket, context, bucket):   # bucket starts >= near
            c[:, s:s + bucket] = nll(x[:, s - near:s + bucket], y[:, s - near:s + bucket])[:, near:]
        full.append(f.cpu()), cut.append(c.cpu())
    return torch.cat(full)[:windows], torch.cat(cut)[:windows]


def bucket_means(nll: torch.Tensor, bucket: int) -> list[dict]:
    """Mean NLL over windows and over each run of `bucket` positions (the last run may be short)."""
    T = nll.shape[1]
    idx = torch.arange(T) // bucket
    n = int(idx[-1]) + 1
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, nll.double().sum(0))
    counts = torch.bincount(idx, minlength=n).double() * nll.shape[0]
    return [{"start": b * bucket, "end": min(T, (b + 1) * bucket) - 1, "nll": (sums[b] / counts[b]).item()}
            for b in range(n)]


def context_gain(full: torch.Tensor, cut: torch.Tensor, bucket: int) -> list[dict]:
    """Per bucket: the mean of cut - full (nats/token) and its standard error over windows (each
    window's mean is one sample: tokens of one window are not independent)."""
    out = []
    for s in range(0, full.shape[1], bucket):
        d = (cut[:, s:s + bucket] - full[:, s:s + bucket]).double().mean(1)
        se = d.std().item() / math.sqrt(len(d)) if len(d) > 1 else float("inf")
        out.append({"gain": d.mean().item(), "se": se})
    return out


def uses_context(buckets: list[dict]) -> bool:
    """The raw curve: the loss falls over the window, and still falls over its second half.
    Printed, not trusted alone: the buckets hold different text, so on ~100 windows their means
    differ by ~0.1 nats for reasons of content (measured on the session-4 build: raw buckets
    moved by up to 0.13 while its paired gains stayed within 0.005)."""
    nll = [b["nll"] for b in buckets]
    return len(nll) >= 3 and nll[-1] < nll[len(nll) // 2] < nll[0]


def uses_distant_context(gains: list[dict], min_gain: float = 0.01) -> bool:
    """The claim the testbed exists for: in every bucket of the window's second half, the tokens
    more than `near` back lower the loss by at least min_gain nats/token and by 3 standard errors."""
    half = gains[len(gains) // 2:]
    return len(gains) >= 2 and all(g["gain"] >= max(min_gain, 3 * g["se"]) for g in half)


# ----------------------------------------------------------------------------- the command

def add_parser(sub):
    p = sub.add_parser("testbed", help="build (once) the long-context model for `bench.py kv`; loss by position")
    p.add_argument("--tb-steps", type=int, default=None,
                   help=f"steps of the main (stdlib) stage (default {DEFAULT_STEPS}; on CUDA {RECIPES['cuda']['steps']})")
    p.add_argument("--tb-copy-steps", type=int, default=None, help=f"steps of the copy stage, 0: none "
                   f"(default {COPY_STEPS}; on CUDA {RECIPES['cuda']['copy_steps']})")
    p.add_argument("--tb-batch", type=int, default=None, help=f"sequences per step of the main stage "
                   f"(default {DEFAULT_BATCH}; on CUDA {RECIPES['cuda']['batch']})")
    p.add_argument("--tb-context", type=int, default=CONTEXT, help="training and evaluation window")
    p.add_argument("--tb-data", default=None, help="corpus (default: the Python stdlib)")
    p.add_argument("--tb-model-flags", default="", help="extra train.py flags, e.g. a smaller model")
    p.add_argument("--tb-root", default=DEFAULT_ROOT, help="cache folder; one subfolder per flags hash")
    p.add_argument("--tb-cache-dir", default=None, help="data.py's token cache (default: .cache)")
    p.add_argument("--tb-windows", type=int, default=10**6,
                   help="val windows for the loss by position, at most (the stdlib's val split has 123)")
    p.add_argument("--tb-bucket", type=int, default=128, help="positions per bucket")
    p.add_argument("--tb-near", type=int, default=128,
                   help="the gain column: each bucket again, seeing only the last NEAR tokens before it")
    p.add_argument("--tb-out", default="out/bench/testbed.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(fn=bench_testbed)
    return p


def bench_testbed(a, log=print):
    t0 = time.time()
    recipe = default_recipe(a.device)
    for k in ("steps", "batch", "copy_steps"):   # unset flags take the device's recipe
        if getattr(a, f"tb_{k}") is None:
            setattr(a, f"tb_{k}", recipe[k])
    flags = train_flags(a.tb_steps, a.tb_batch, a.tb_context, a.tb_data, model_flags=a.tb_model_flags,
                        copy_steps=a.tb_copy_steps)
    check_flags(a, at_least={"tb_steps": 1, "tb_copy_steps": 0, "tb_batch": 1, "tb_context": 1, "tb_windows": 1,
                             "tb_bucket": 1, "tb_near": 1})
    if a.tb_data is not None and not os.path.exists(a.tb_data):
        raise FileNotFoundError(f"--tb-data {a.tb_data!r} does not exist; pass a text file or folder, or omit "
                                f"it for the stdlib")
    import train
    for stage in filter(None, (copy_stage_flags(flags), flags)):  # --tb-model-flags too, before any file is written
        try:
            train.check_args(train.parse_args(BUILT_WITH + stage))  # as _train_stage runs it
        except ValueError as e:
            raise ValueError(f"the testbed's train.py flags (--tb-* and --tb-model-flags): {e}") from None
    folder = build_testbed(flags, a.tb_root, a.tb_cache_dir, log)
    model = load_pretrained(folder, a.device)
    tokens = val_tokens(data.load_encoding(folder), a.tb_data)
    near = min(a.tb_near, a.tb_context)
    nll, cut = position_nll(model, tokens, a.tb_context, a.tb_windows, 4, a.device, near, a.tb_bucket)
    buckets, gains = bucket_means(nll, a.tb_bucket), context_gain(nll, cut, a.tb_bucket)
    for b, g in zip(buckets, gains):
        b.update(gain=g["gain"], gain_se=g["se"])
    falls, distant = uses_context(buckets), uses_distant_context(gains)
    log(f"\ntestbed {folder}: val loss by position, {nll.shape[0]} held-out windows of {a.tb_context}. "
        f"Gain: the loss of the same tokens when the model sees only the last {near}-{near + a.tb_bucket - 1} "
        f"tokens, minus the loss with the whole window (+- one standard error over windows)")
    log(f"| positions | loss (nats/token) | gain from tokens > {near} back |\n|---|---|---|")
    for b in buckets:
        log(f"| {b['start']}-{b['end']} | {b['nll']:.3f} | {b['gain']:+.4f} +- {b['gain_se']:.4f} |")
    log(f"loss falls with position, also over the window's second half: {'yes' if falls else 'no'} "
        f"(bucket means also differ by content: the gain column is the paired measure)")
    log(f"claim (distant context pays: gain >= 0.01 and >= 3 standard errors in every bucket of the second "
        f"half): {'holds' if distant else 'FAILS: this model does not use long context; do not rank KV policies on it'}")
    res = {"folder": os.path.abspath(folder), "flags": flags, "windows": nll.shape[0],
           "context": a.tb_context, "bucket": a.tb_bucket, "near": near, "buckets": buckets,
           "mean_nll": nll.mean().item(), "loss_falls": falls, "uses_context": distant,
           "build": _read_json(os.path.join(folder, "testbed.json")), "seconds": time.time() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(a.tb_out)), exist_ok=True)
    with open(a.tb_out, "w") as f:
        json.dump(res, f, indent=1)
    log(f"testbed: wrote {a.tb_out}")
    return res
