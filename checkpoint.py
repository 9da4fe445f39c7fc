"""Checkpoints: a model's weights for generate.py, and a training run's state for --resume.

Two kinds, both free of pickles (loading one can never run code):
  weights      model.safetensors + config.json: save_pretrained / load_pretrained. What
               generate.py and bench.py read, and what a run leaves behind.
  train state  the optimizer tensors and the RNG, saved with DCP (torch.distributed.checkpoint)
               as one safetensors shard per rank, plus train_state.json. A checkpoint saved by N
               ranks resumes with any number of ranks: DCP reshards on load.

A training run's --out-dir after a save:
  model.safetensors   full weights (+ router biases)    config.json     model args + run flags
  tokenizer.json/bpe.tiktoken   the tokenizer            train_state/    optimizer tensors + RNG
  train_state.json    step, sampler position, size of each file --resume reads (written last:
                      it marks a complete checkpoint)
  metrics.jsonl       one JSON object per step (step_report; MetricsLog: replayed after a resume)
Nothing is lost to a crash: every part is first written whole into checkpoint.tmp/, then moved in
(commit_staged), the marker last; --resume finishes a commit that a crash cut short. The fault
battery in tests/test_checkpoint.py kills a run at every filesystem call of a save, before and
after it (2 ranks: a sample of them), and checks that --resume continues exactly or refuses clearly.
"""
import contextlib
import json
import os
import re
import shutil
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

import data
import disk
from model import ModelArgs, Transformer, build_model
from parallel import Dist

STAGE, MARKER = "checkpoint.tmp", "train_state.json"  # the staging folder; a complete checkpoint's marker

# DCP works without a process group too (one process); it warns about that on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


# ----------------------------------------------------------------------------- weights

def save_pretrained(model: Transformer, folder: str, extra_config: dict | None = None,
                    state_dict: dict | None = None):
    """`model.safetensors` + `config.json`, each written to a temporary name and renamed.
    safetensors holds only tensors: loading it can never run code (unlike a pickle).
    `state_dict`: full tensors to write instead of model.state_dict() (e.g. gathered from shards)."""
    os.makedirs(folder, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = os.path.join(folder, "model.safetensors.tmp")
    save_file(state, tmp)
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    config = {"model_args": asdict(model.args), **(extra_config or {})}
    data.atomic_write(os.path.join(folder, "config.json"), json.dumps(config, indent=1, allow_nan=False).encode())


def load_pretrained(folder: str, device="cpu") -> Transformer:
    """The model in `folder`. A missing, corrupt or mismatched file is a clear error, never a
    half-loaded model: FileNotFoundError when nothing is there, ValueError otherwise."""
    weights, config = os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")
    if not (os.path.exists(weights) and os.path.exists(config)):
        raise FileNotFoundError(f"no checkpoint in {folder!r} (model.safetensors + config.json); "
                                f"run `python train.py` first, or pass the folder it wrote to")
    if os.path.isdir(config) or os.path.isdir(weights):
        raise ValueError(f"{config if os.path.isdir(config) else weights} is a folder, not a file; restore "
                         f"the checkpoint's files, or point at a folder written by train.py")
    try:
        with open(config) as f:
            saved = json.load(f)["model_args"]
    except (ValueError, KeyError, TypeError) as e:  # not JSON, no model_args
        raise ValueError(f"{config} is not a nanoK2 model config ({type(e).__name__}: {e}); "
                         f"point at a folder written by train.py") from e
    args = ModelArgs.from_config(saved_model_args(saved), f"{config}: ")  # every field there, each valid
    try:
        state = load_file(weights, device=str(device))
    except Exception as e:  # safetensors raises its own error type for a truncated/garbled file
        raise ValueError(f"{weights} is not a readable safetensors file ({e}); it is truncated or "
                         f"corrupt: restore it, or train again") from e
    model = build_model(args, device)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing/unexpected keys or wrong shapes
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{weights} does not match {config} ({first}); the two files come from "
                         f"different models: restore the pair written together") from e
    return model


def saved_model_args(saved: dict) -> dict:
    """A config.json's model_args, completed with the fields added since it was written, as the
    code that wrote it behaved. `yarn`: before the switch, YaRN was on iff max_seq_len > original_seq_len."""
    if isinstance(saved, dict) and "yarn" not in saved:
        lengths = saved.get("max_seq_len"), saved.get("original_seq_len")
        if all(isinstance(n, int) for n in lengths):  # (anything else: ModelArgs or the resume check refuses)
            saved = {**saved, "yarn": lengths[0] > lengths[1]}
    return saved


def init_weights_from(model: Transformer, folder: str, margs: ModelArgs, d: Dist) -> None:
    """train.py --init-from: a fresh run (new optimizer, step 0) starting from the weights in
    `folder` (a save_pretrained folder, e.g. an earlier run's out-dir) instead of random ones. The
    architecture must match; sharded models get their rows from rank 0's full copy."""
    src = load_pretrained(folder, "cpu")   # clear errors for a missing or corrupt folder
    if asdict(src.args) != asdict(margs):
        diff = {k: (v, getattr(margs, k)) for k, v in asdict(src.args).items() if getattr(margs, k) != v}
        raise ValueError(f"--init-from {folder!r}: its model differs from this run's ({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in diff.items())}); use the same preset and overrides")
    full = src.state_dict() if d.main else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=d.enabled))


# ----------------------------------------------------------------------------- train state

RUN_KEYS = ("batch_size", "seq_len", "optimizer", "seed", "grad_accum", "copy_rows", "copy_steps",
            "short_seq_len", "short_seq_frac")  # must match to resume
# what a checkpoint that predates a key ran with
RUN_DEFAULTS = {"copy_rows": 0, "copy_steps": 0, "short_seq_frac": 0.0}


def optimizer_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """The optimizer state as a flat dict named after the parameters ("layers.0.attn.wq.weight.
    momentum_buffer"): DTensor shards under FSDP2, so DCP can reshard them for any rank count."""
    names = {p: n for n, p in model.named_parameters()}
    return {f"{names[p]}.{k}": v for p, state in optimizer.state.items()
            for k, v in state.items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def init_optimizer_state(optimizer):
    """Create the (lazily built) optimizer state so a checkpoint can be loaded into it: one step
    with zero gradients at lr 0, which changes no weight; the loaded state then replaces it."""
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def save_checkpoint(out_dir, model, optimizer, step, sampler, args, enc, d: Dist):
    """All ranks call this. Every part is first written whole into out_dir/checkpoint.tmp/:
    full weights + config (what generate.py reads), tokenizer, the sharded training state. Only
    then are the parts moved over the previous checkpoint's, train_state.json (the marker of a
    complete checkpoint) last, so a crash while writing leaves the previous checkpoint intact.
    A full disk (disk.FULL_DISK) on any rank: the partial stage is removed, and every rank raises
    disk.DiskFull, one line naming the folder and the bytes needed; the previous checkpoint stays."""
    stage = os.path.join(out_dir, STAGE)
    try:
        _save_staged(out_dir, stage, model, optimizer, step, sampler, args, enc, d)
    except BaseException as e:
        n = disk.full_errno(e)
        if n is None:
            raise
        if d.main and not os.path.exists(os.path.join(stage, MARKER)):  # (a complete one: --resume commits it)
            shutil.rmtree(stage, ignore_errors=True)
        prior = committed_step(out_dir)
        kept = f"; the step-{prior} checkpoint there is untouched" if prior else ""
        raise disk.error(n, out_dir, checkpoint_bytes(model, optimizer, enc), f"saving the step-{step} checkpoint",
                             kept) from None


def _save_staged(out_dir, stage, model, optimizer, step, sampler, args, enc, d: Dist):
    run = {k: getattr(args, k) for k in RUN_KEYS}
    full = (get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if d.enabled else None)  # gathered onto rank 0 (others get {})
    device = next(model.parameters()).device
    with _agreed(d, device):  # rank 0 writes; the barrier after it also tells every rank if it failed
        if d.main:
            shutil.rmtree(stage, ignore_errors=True)  # left by a crash during an earlier save
            save_pretrained(model, stage, extra_config={"run": run, "step": step}, state_dict=full)
            data.save_encoding(enc, stage)
    # every rank writes its own shards, as safetensors with the offsets in its JSON header (a failure
    # on any rank fails dcp.save on all of them)
    state = {**optimizer_tensors(model, optimizer), "rng_cpu": torch.get_rng_state()}
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(os.path.join(stage, "train_state"),
                                                            save_distributed=True))
    d.barrier()
    with _agreed(d, device):
        if d.main:
            # the marker also records the size of each file --resume reads: a file truncated or
            # swapped after the save is then named by the resume, not found by DCP mid-load
            shards = sorted(os.listdir(os.path.join(stage, "train_state")))
            files = {name: os.path.getsize(os.path.join(stage, *name.split("/")))
                     for name in ["config.json", "model.safetensors", *(f"train_state/{f}" for f in shards)]}
            state = {"step": step, "sampler": sampler.state_dict(), "world_size": d.world, "files": files}
            data.atomic_write(os.path.join(stage, MARKER), json.dumps(state).encode())
            commit_staged(out_dir)


@contextlib.contextmanager
def _agreed(d: Dist, device):
    """Run the block (rank 0's writing), then a barrier at which the ranks also learn whether the
    block failed: rank 0 raises its error, the others an OSError with its errno (a full disk: each
    rank's DiskFull is then the same line), instead of waiting at the next barrier for ever."""
    error = None
    try:
        yield
    except BaseException as e:
        error = e
    if d.enabled:
        code = 0 if error is None else disk.full_errno(error) or -1
        code = int(d.all_reduce(torch.tensor([float(code)], device=device), dist.ReduceOp.MAX).item())
        if error is None and code:
            error = OSError(code, os.strerror(code)) if code > 0 else RuntimeError("rank 0 failed while saving")
    if error is not None:
        raise error


def checkpoint_bytes(model, optimizer, enc) -> int:
    """About the bytes one checkpoint takes: weights and optimizer tensors (all ranks together),
    the tokenizer's ranks (~16 bytes a token), the JSON files and headers."""
    tensors = [*model.state_dict().values(), *optimizer_tensors(model, optimizer).values()]
    return sum(t.numel() * t.element_size() for t in tensors) + 16 * enc.n_vocab + (1 << 14)


def exists(out_dir) -> bool:
    """A checkpoint for --resume in out_dir: a complete one, one whose commit a crash cut short
    (load_checkpoint finishes it), or one in the older format (load_checkpoint names it)."""
    return any(os.path.exists(os.path.join(out_dir, *f)) for f in ([MARKER], [STAGE, MARKER], ["train_state.pt"]))


def check_start(out_dir, resume: bool, init_from: str | None) -> None:
    """train.py's --resume and --init-from, before any work: the checkpoint each names is there,
    or a FileNotFoundError that says so and how to go on."""
    if resume and not exists(out_dir):
        raise _nothing_to_resume(out_dir)
    if init_from and not resume and not all(
            os.path.isfile(os.path.join(init_from, f)) for f in ("model.safetensors", "config.json")):
        raise FileNotFoundError(f"--init-from {init_from!r}: no checkpoint there (model.safetensors + "
                                f"config.json); pass a folder written by train.py")


def committed_step(out_dir) -> int | None:
    """The step of the complete checkpoint in out_dir, None if there is none (or it is unreadable)."""
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_partial(out_dir) -> None:
    """At a run's start (rank 0): what a save cut short by a crash or a full disk left behind: a
    staging folder without its marker, and the temporary files of disk.atomic_write."""
    if not os.path.exists(os.path.join(out_dir, STAGE, MARKER)):
        shutil.rmtree(os.path.join(out_dir, STAGE), ignore_errors=True)
    for name in os.listdir(out_dir):
        if re.fullmatch(r".+\.tmp\d+", name) and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def check_folder(path, what: str) -> None:
    """A folder to write (or read) given on a command line is a folder, or can be made one: a
    ValueError naming `what` (e.g. "--out-dir") before any work, not a NotADirectoryError after it."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)  # the nearest part of the path that exists
    if not os.path.isdir(p):
        where = "is a file" if p == os.path.abspath(path) else f"lies under {p!r}, which is a file"
        raise ValueError(f"{what} {path!r} {where}, not a folder; pass a folder")


def save_when_due(out_dir, step: int, last_step: int, every: int, interrupted, save, log) -> bool:
    """The training loops' save rule: every `every` steps, at the last step, and when interrupted
    (Ctrl-C, --stop-at), after which the loop stops. `save()` writes the checkpoint. True: stop now."""
    if step % every == 0 or step == last_step or interrupted:
        save()
    if interrupted:
        log(f"stopped at step {step}; checkpoint saved in {out_dir} (continue with --resume)")
    return bool(interrupted)


def commit_staged(out_dir):
    """Move a complete staged checkpoint (its train_state.json is written) over the current one.
    The old marker is removed first and the new one moved last: a crash in between leaves a mix
    of parts but no marker in out_dir, and a complete stage that the next --resume finishes."""
    stage = os.path.join(out_dir, STAGE)
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    for name in sorted(os.listdir(stage), key=lambda n: n == MARKER):
        target = os.path.join(out_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(stage, name), target)
    os.rmdir(stage)


def load_checkpoint(out_dir, model, optimizer, sampler, args, margs, d: Dist) -> int:
    """Check that the checkpoint is complete and matches this run, then load weights, optimizer
    state and RNG. Each rank reads just its own rows (DCP); any saved rank count works.
    Whatever is wrong with the folder (a missing, truncated, corrupt or swapped file, another
    model's config) is one ValueError (FileNotFoundError: no checkpoint at all) that names the
    file and the fix, raised alike on every rank, never a traceback from DCP or safetensors."""
    if d.main and os.path.exists(os.path.join(out_dir, STAGE, MARKER)):
        commit_staged(out_dir)  # a save that was complete but cut short while moving in
    d.barrier()
    state_json = os.path.join(out_dir, MARKER)
    if not os.path.exists(state_json):
        if os.path.exists(os.path.join(out_dir, "train_state.pt")):
            raise ValueError(f"--resume: {out_dir!r} holds a checkpoint in the older single-file "
                             f"format (train_state.pt), which this version cannot resume; its "
                             f"weights still load in generate.py; start a new run in a new --out-dir")
        raise _nothing_to_resume(out_dir)
    stray = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors") and f != "model.safetensors")
    if stray:  # DCP's reader would merge every *.safetensors file of the folder into the weights
        raise ValueError(f"--resume: {out_dir!r} holds other safetensors files beside "
                         f"model.safetensors ({', '.join(stray)}); move them elsewhere and rerun")
    state = _read_json(state_json, {"step": int, "sampler": dict})
    train_dir = os.path.join(out_dir, "train_state")
    if "files" in state:  # (checkpoints saved before the sizes were recorded skip this check)
        _check_files(out_dir, state["files"], state_json)
    config = _read_json(os.path.join(out_dir, "config.json"), {"model_args": dict, "run": dict, "step": int})
    saved = saved_model_args(config["model_args"])
    for k, v in asdict(margs).items():
        if saved.get(k) != v:
            raise ValueError(f"--resume: checkpoint model field {k}={saved.get(k)!r} but this run has "
                             f"{k}={v!r}; use the same preset/overrides or a new --out-dir")
    for k in RUN_KEYS:
        if k == "short_seq_len" and args.short_seq_frac == 0:
            continue  # no short windows (as before the key existed): their length is moot
        ran = config["run"].get(k, RUN_DEFAULTS.get(k))
        if ran != getattr(args, k):
            raise ValueError(f"--resume: checkpoint was trained with --{k.replace('_', '-')} "
                             f"{ran!r}, this run has {getattr(args, k)!r}")
    if config["step"] != state["step"] or not os.path.isdir(train_dir):
        raise ValueError(f"--resume: checkpoint in {out_dir!r} is incomplete (weights at step "
                         f"{config['step']}, state at step {state['step']}); it was interrupted while saving")
    weights = model.state_dict()  # plain tensors, or this rank's DTensor shards: filled in place
    with _named_errors(out_dir, ["model.safetensors"]):
        dcp.load(weights, storage_reader=HuggingFaceStorageReader(out_dir))  # reads model.safetensors
    model.load_state_dict(weights)
    init_optimizer_state(optimizer)
    tensors = {**optimizer_tensors(model, optimizer), "rng_cpu": torch.get_rng_state()}
    with _named_errors(train_dir, sorted(f for f in os.listdir(train_dir) if f.endswith(".safetensors"))):
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(train_dir))
    torch.set_rng_state(tensors["rng_cpu"])
    sampler.load_state_dict(state["sampler"])
    return state["step"]


_FIX = "restore the checkpoint's files as the save left them, or start a new run in a new --out-dir"


def _nothing_to_resume(out_dir) -> FileNotFoundError:
    return FileNotFoundError(f"--resume: no checkpoint in {out_dir!r} ({MARKER} missing); "
                             f"drop --resume to start a new run")


def _read_json(path, keys: dict) -> dict:
    """A JSON file of the checkpoint, with `keys` of the given types, or a ValueError naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--resume: {path} is missing; {_FIX}") from None
    except ValueError as e:  # not JSON, not UTF-8: truncated or garbled
        raise ValueError(f"--resume: {path} is not readable JSON ({e}); it is truncated or "
                         f"corrupt: {_FIX}") from None
    bad = [k for k, t in keys.items() if not (isinstance(obj, dict) and isinstance(obj.get(k), t))]
    if bad:
        raise ValueError(f"--resume: {path} is not a checkpoint file written by train.py (no valid "
                         f"{', '.join(bad)}); it comes from another program or model: {_FIX}")
    return obj


def _check_files(out_dir, recorded: dict, state_json):
    """Each file --resume reads has the size the save recorded; train_state/ holds no other shard."""
    if not (isinstance(recorded, dict) and all(isinstance(v, int) for v in recorded.values())):
        raise ValueError(f"--resume: {state_json} is not a checkpoint file written by train.py "
                         f"(its files entry is not a list of sizes): {_FIX}")
    for name, size in recorded.items():
        path = os.path.join(out_dir, *name.split("/"))
        have = os.path.getsize(path) if os.path.isfile(path) else None
        if have != size:
            what = "is missing" if have is None else f"has {have:,} bytes"
            raise ValueError(f"--resume: {path} {what}, but the checkpoint saved {size:,}: it was "
                             f"truncated or replaced after the save; {_FIX}")
    train_dir = os.path.join(out_dir, "train_state")
    extra = sorted(f for f in os.listdir(train_dir) if f"train_state/{f}" not in recorded
                   and f.endswith(".safetensors")) if os.path.isdir(train_dir) else []
    if extra:  # DCP's reader would merge them into the optimizer state
        raise ValueError(f"--resume: {train_dir} holds shards this checkpoint did not write "
                         f"({', '.join(extra)}); move them elsewhere and rerun")


@contextlib.contextmanager
def _named_errors(folder, files: list[str]):
    """Read safetensors `files` of `folder` with DCP, or fail with one ValueError that names the
    file. Each file's header is checked first: DCP would log a traceback for an unreadable one
    before failing. What DCP itself then raises (tensors of another model, missing keys) comes
    wrapped in CheckpointException, a BaseException: caught by name."""
    if not files:
        raise ValueError(f"--resume: {folder} holds no .safetensors shard; {_FIX}")
    for name in files:
        path = os.path.join(folder, name)
        try:
            with safe_open(path, "pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error type for a truncated/garbled file
            raise ValueError(f"--resume: {path} is not a readable safetensors file ({e}); it is "
                             f"truncated or corrupt: {_FIX}") from None
    try:
        yield
    except (Exception, CheckpointException) as e:
        cause = e
        if isinstance(e, CheckpointException) and e.failures:
            cause = next(iter(e.failures.values()))[0]  # (exception, traceback) of the first rank
        first_line = (str(cause).strip().splitlines() or [""])[0]
        where = os.path.join(folder, files[0]) if len(files) == 1 else f"the shards in {folder}"
        raise ValueError(f"--resume: the tensors in {where} do not fit this model "
                         f"({type(cause).__name__}: {first_line}); they come from another model "
                         f"or run: {_FIX}") from None


# ----------------------------------------------------------------------------- metrics.jsonl

class MetricsLog:
    """metrics.jsonl, one JSON line per logged step (rank 0's; other ranks' log writes nothing),
    kept in step with the checkpoints. Opening it keeps the lines up to the checkpoint's step: the
    later ones are logged again, the same, as a resumed run replays them. `commit()` after a save
    marks what that checkpoint covers. A full disk inside the `with` (a save, or a line of the log)
    cuts the file back to that mark (removed if there is none) and becomes disk.DiskFull's line."""

    def __init__(self, out_dir, step: int, main: bool):
        path = os.path.join(out_dir, "metrics.jsonl")
        self.out_dir, self.committed = out_dir, _keep_metrics_up_to(path, step) if main else 0
        self.file = open(path, "ab", buffering=0) if main else None

    def write(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        while self.file and line:  # unbuffered: a failed write leaves nothing to flush later
            line = line[self.file.write(line):]

    def commit(self) -> None:
        self.committed = self.file.tell() if self.file else 0

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        try:
            n = None if error is None else disk.full_errno(error)
            if n is not None and self.file:
                self.file.truncate(self.committed)
                if not self.committed:
                    os.remove(self.file.name)
            if n is not None and not isinstance(error, disk.DiskFull):
                raise disk.error(n, self.out_dir, 1 << 16, "writing metrics.jsonl") from None
        finally:
            if self.file:
                self.file.close()


def _keep_metrics_up_to(path, step) -> int:
    """Cut metrics.jsonl after the line of `step`, and a last line cut short by a kill, in place
    (one truncate: a kill cannot lose the history, and a full disk cannot stop it). Returns the
    bytes kept."""
    if not os.path.exists(path):
        return 0
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if json.loads(line)["step"] > step or not line.endswith(b"\n"):
                    break
            except ValueError:  # a partial line: written when the process was killed
                break
            keep += len(line)
    if keep < os.path.getsize(path):
        os.truncate(path, keep)
    return keep


def step_report(step, max_steps, loss, lr, dt, t_opt, clip_stats, optimizer, val, eta, args) -> tuple[dict, str]:
    """A step's record for metrics.jsonl and its log line, from the same numbers. max_steps: the
    run's length (--time-budget: the plan); clip_stats: QK-Clip's (MuonClip only); val:
    train.validation_loss's, on eval steps; eta: seconds left."""
    tokens = args.batch_size * args.seq_len
    rec = {"step": step, "loss": loss, "lr": lr, "ms": round(dt * 1000, 1), "opt_ms": round(t_opt * 1000, 1),
           "tok_s": round(tokens / dt)}
    line = (f"step {step:5d}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:6.0f} ms | "
            f"{tokens / dt:7.0f} tok/s | ETA {_fmt_time(eta)}")
    if clip_stats:
        rec.update(max_logit=round(clip_stats["max_logit"], 3), heads_clipped=clip_stats["heads_clipped"],
                   update_rms=optimizer.last_stats["update_rms"])
        line += (f" | max logit {clip_stats['max_logit']:.1f} ({clip_stats['heads_clipped']} clipped)"
                 f" | upd rms {rec['update_rms']:.1e}")
    if val:
        rec.update(val)
        line += f" | val {rec['val_loss']:.4f} ({rec['val_bpb']:.3f} bpb)"
    return rec, line


def _fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"
