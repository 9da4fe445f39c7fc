"""Fault injection for the crash batteries of tests/test_checkpoint.py and tests/test_data.py.
Production code has no hooks: this module patches, in its own process, the calls that change the
filesystem, and SIGKILLs the process at one of them.

A fault point is one side of one such call: the process dies just before the call, or just after
it returns (or raises). The calls are those that checkpoint.py, data.py and DCP make:
  os.mkdir (os.makedirs goes through it), os.rmdir, os.remove, os.unlink, os.replace, os.rename,
  shutil.rmtree (and every unlink/rmdir inside it), safetensors' save_file (as checkpoint.py
  imported it), open() in a writing mode (builtins.open, and io.open, which pathlib and so DCP
  use), and the first write() and the close() of each file so opened. A kill after a file's first
  write flushes it first, so the file is left partly written. (numpy's tofile writes through the
  file descriptor, not write(): a token file's points are its open and its close.)
Calls are counted only inside a window (one save of one step, one load_dataset), from 0 in order.

For one process (modes train and data) each point gets a fresh process cheaply, by os.fork():
the child is the process at the start of the window, with its own copy of the folder the window
writes to; it arms point k and dies there (fork_points). The first child that finishes without
reaching its point ran the window cleanly: that is the count K, and every point 0..K-1, before
and after, has been tried. Two ranks cannot fork mid-run (the process group does not survive a
fork), so each of their points is a whole 2-rank run (mode ranks2).

Entry points, `python tests/faults.py MODE SPEC.json [train.py flags...]`:
  train   train.py run as __main__ (runpy), one process. At the save of each step in
          spec["fork_steps"], before the save runs, one forked child per fault point saves into a
          copy of --out-dir and dies at its point; then the process saves for real and trains on:
          it is the uninterrupted reference run.
  ranks2  two ranks of train.py, forked from this process with the environment torchrun gives
          them (RANK, WORLD_SIZE, MASTER_ADDR/PORT; when one rank dies the other gets SIGTERM, as
          torchrun stops a job), so that torch is imported once, not three times per run: an
          uninterrupted reference run that also lists each rank's calls in the save of
          spec["step"], then one run per chosen point (rank, k, before/after), each in its own
          --out-dir, then a 2-rank --resume of each distinct result.
  data    data.load_dataset on a cold cache (the tokenizer is trained, then the corpus encoded),
          one forked child per point, each with its own cache folder; the one that finishes is
          the uninterrupted build.
  enospc  not a kill but a full disk: the write at one point of a save fails with ENOSPC (as
          safetensors or the OS raise it), train.py handles it as a user would see it, and then
          --resume runs; one forked child per write of the saves of spec["steps"].
Each writes spec["results"] (JSON); the tests judge the outcomes.
"""
import builtins
import contextlib
import errno
import gc
import hashlib
import io
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAIN = os.path.join(ROOT, "train.py")
NOT_REACHED = 3  # exit status of a child that ran its whole window without reaching its point
WRITE_MODES = set("wax+")


class Faults:
    """Counts the filesystem calls made inside window() and SIGKILLs at the armed one."""

    def __init__(self):
        self.active, self.count, self.armed, self.ops, self.report = False, 0, None, [], None
        self.installed = False

    @contextlib.contextmanager
    def window(self):
        self.active, self.count, self.ops = True, 0, []
        try:
            yield self
        finally:
            self.active = False

    def point(self, k, when, op):
        if (k, when) == self.armed:
            if self.report:  # os.open/os.write: not hooked
                fd = os.open(self.report, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.write(fd, json.dumps({"k": k, "when": when, "op": op}).encode())
                os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

    def call(self, op, real, *args, **kwargs):
        if not self.active:
            return real(*args, **kwargs)
        k = self.count
        self.count += 1
        self.ops.append(op)
        if self.armed == (k, "enospc"):  # a full disk at this write (mode enospc): it fails
            if op.startswith("close("):  # (a close that fails to flush still closes the file)
                real(*args, **kwargs)
            raise full_disk_error(op)
        self.point(k, "before", op)
        try:
            return real(*args, **kwargs)
        finally:
            self.point(k, "after", op)

    def install(self):
        """Patch the calls (once per process). Outside a window they behave exactly as before."""
        if self.installed:
            return
        self.installed = True
        for name in ("mkdir", "rmdir", "remove", "unlink", "replace", "rename"):
            self._hook(os, name)
        self._hook(shutil, "rmtree")
        real_open = builtins.open

        def hooked_open(file, mode="r", *args, **kwargs):
            if not self.active or not WRITE_MODES & set(mode):
                return real_open(file, mode, *args, **kwargs)
            name = _short(file)
            f = self.call(f"open({name!r}, {mode!r})", real_open, file, mode, *args, **kwargs)
            self._hook_file(f, name)
            return f
        builtins.open = io.open = hooked_open
        import checkpoint  # its save_file: safetensors writes the file natively
        self._hook(checkpoint, "save_file")

    def _hook(self, module, name):
        real = getattr(module, name)

        def hooked(*args, **kwargs):
            # (makedirs(exist_ok=True) calls mkdir on a folder that exists: EEXIST, whatever the space)
            what = "mkdir of an existing folder" if name == "mkdir" and os.path.isdir(args[0]) else name
            return self.call(f"{what}({', '.join(_short(a) for a in args)})", real, *args, **kwargs)
        setattr(module, name, hooked)

    def _hook_file(self, f, name):
        real_write, real_close, first = f.write, f.close, [True]

        def write(data):
            if not (self.active and first[0]):
                return real_write(data)
            first[0] = False

            def write_and_flush(d):  # what a kill right after it leaves on disk: the first bytes
                n = real_write(d)
                f.flush()
                return n
            return self.call(f"first write({name!r})", write_and_flush, data)

        def close():
            if not self.active or f.closed:
                return real_close()
            return self.call(f"close({name!r})", real_close)
        f.write, f.close = write, close


FAULTS = Faults()
WRITES = ("open(", "first write(", "close(", "save_file(", "mkdir(")  # the calls a full disk fails


def full_disk_error(op) -> Exception:
    """What a full disk raises at this call: safetensors' own error type from its writer (the text
    it gives, seen on a full tmpfs), an OSError from the others."""
    if op.startswith("save_file("):
        from safetensors import SafetensorError
        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _short(x):
    """A path as the tests read it: relative to the run's folder (the last three parts)."""
    if not isinstance(x, (str, os.PathLike)):
        return type(x).__name__ if isinstance(x, (dict, list, tuple)) else repr(x)
    return "/".join(os.fspath(x).split(os.sep)[-3:])


def _flush():
    sys.stdout.flush()
    sys.stderr.flush()


def tree_hash(folder) -> str:
    """Names and contents of every file under folder: two folders with the same hash are the same
    input to whatever reads them next, so their outcome needs to be computed once."""
    h = hashlib.sha1()
    for d, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        h.update(f"D {os.path.relpath(d, folder)}\n".encode())
        for f in sorted(files):
            h.update(f"F {f}\n".encode())
            with open(os.path.join(d, f), "rb") as fh:
                h.update(hashlib.sha1(fh.read()).digest())
    return h.hexdigest()


def fork_points(prepare, action, report_dir):
    """For k = 0, 1, ... and when in (before, after): target = prepare(name); a forked child arms
    (k, when) and runs action(target), which opens the window; it dies at the point, or exits
    NOT_REACHED when the window ran to its end without reaching it. Stops at the first child that
    finishes: returns (faults [{k, when, op, dir}], ops of the clean run, the clean run's target)."""
    faults = []
    k = 0
    while True:
        for when in ("before", "after"):
            name = f"{k:03d}-{when}"
            target = prepare(name)
            report = os.path.join(report_dir, f"{name}.json")
            def child():
                FAULTS.armed, FAULTS.report = (k, when), report
                action(target)
                with open(report, "w") as f:
                    json.dump({"ops": FAULTS.ops}, f)

            status = _run_forked(child, NOT_REACHED)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                with open(report) as f:
                    faults.append({**json.load(f), "dir": str(target)})
            elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == NOT_REACHED:
                if when == "after":
                    raise AssertionError(f"point {k} was reached before the call but not after it")
                with open(report) as f:
                    return faults, json.load(f)["ops"], target
            else:
                raise AssertionError(f"fault child {name} ended with status {status}, "
                                     f"not at its point: see its output above")
        k += 1


def run_train_script(argv, on_save):
    """train.py as a script (runpy, __main__) with checkpoint.save_checkpoint wrapped: on_save(
    real_save, *args) runs in its place. train.py imports save_checkpoint when it starts, so the
    wrapper is set before. Returns the script's exit status."""
    import checkpoint
    real_save = checkpoint.save_checkpoint
    checkpoint.save_checkpoint = lambda *args: on_save(real_save, *args)
    sys.argv = [TRAIN, *argv]
    try:
        runpy.run_path(TRAIN, run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        checkpoint.save_checkpoint = real_save


# ----------------------------------------------------------------------------- modes

def mode_train(spec, argv):
    """One rank: the reference run, with every point of the saves of spec["fork_steps"] tried in
    forked copies of the process (see the module docstring)."""
    FAULTS.install()
    results = {"faults": [], "ops": {}}

    def on_save(real_save, out_dir, model, optimizer, step, *rest):
        if step in spec["fork_steps"]:
            def prepare(name):
                target = os.path.join(spec["root"], f"s{step}-{name}")
                shutil.copytree(out_dir, target)  # --out-dir as this save finds it
                return target

            def action(target):
                with FAULTS.window():
                    real_save(target, model, optimizer, step, *rest)
            faults, ops, clean = fork_points(prepare, action, spec["root"])
            shutil.rmtree(clean)
            results["faults"] += [{**f, "step": step} for f in faults]
            results["ops"][step] = ops
        return real_save(out_dir, model, optimizer, step, *rest)

    results["exit"] = run_train_script(argv, on_save)
    with open(spec["results"], "w") as f:
        json.dump(results, f, indent=1)


def mode_data(spec, argv):
    """A cold token-cache build (tokenizer training, then encoding), killed at every point."""
    import data
    FAULTS.install()

    def prepare(name):
        return os.path.join(spec["root"], name)

    def action(cache):
        with FAULTS.window():
            data.load_dataset(spec["corpus"], cache_dir=cache, vocab_size=spec["vocab_size"],
                              verbose=False)
    faults, ops, clean = fork_points(prepare, action, spec["root"])
    with open(spec["results"], "w") as f:
        json.dump({"faults": faults, "ops": ops, "clean": clean}, f, indent=1)


def _to_files(stdout, stderr):
    for path, fd in ((stdout, 1), (stderr, 2)):
        _flush()
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)


def _state_after(out_dir) -> dict:
    """What a failed save left in out_dir: every path, the committed checkpoint's step, the steps
    in metrics.jsonl."""
    import checkpoint
    paths = sorted(os.path.relpath(os.path.join(d, n), out_dir) for d, dirs, files in os.walk(out_dir)
                   for n in dirs + files)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    steps = [json.loads(line)["step"] for line in open(metrics)] if os.path.exists(metrics) else None
    return {"paths": paths, "committed": checkpoint.committed_step(out_dir), "metrics_steps": steps}


def mode_enospc(spec, argv):
    """A full disk (ENOSPC) at each write of the saves of spec["steps"] (WRITES: open for writing,
    the first write and the close of such a file, safetensors' save_file, mkdir). Each fault is
    a forked child that runs train.py (runpy, as __main__) into its own --out-dir with the write
    failing, records the exit status, stderr and what is left on disk, then runs --resume there.
    The reference run (a child too, no fault) lists the calls of each save."""
    import torch
    torch.set_num_threads(1)
    __import__("train")
    FAULTS.install()
    gc.freeze()
    root, steps = spec["root"], spec["steps"]
    ref = os.path.join(root, "ref")
    out = lambda d: [*argv, "--out-dir", d]  # noqa: E731

    def record_ops():
        ops = {}

        def on_save(real_save, out_dir, model, optimizer, step, *rest):
            with FAULTS.window():
                real_save(out_dir, model, optimizer, step, *rest)
            ops[step] = FAULTS.ops
        code = run_train_script(out(ref), on_save)
        with open(os.path.join(root, "ops.json"), "w") as f:
            json.dump({"ops": ops, "exit": code}, f)
    _forked(record_ops)
    with open(os.path.join(root, "ops.json")) as f:
        reference = json.load(f)
    results = {"ref": ref, "ref_exit": reference["exit"], "ops": reference["ops"], "faults": []}
    for step in steps:
        for k, op in enumerate(reference["ops"][str(step)]):
            if not op.startswith(WRITES):
                continue
            d = os.path.join(root, f"s{step}-{k:03d}")

            def child():
                def on_save(real_save, out_dir, model, optimizer, s, *rest):
                    if s != step:
                        return real_save(out_dir, model, optimizer, s, *rest)
                    FAULTS.armed = (k, "enospc")
                    with FAULTS.window():
                        real_save(out_dir, model, optimizer, s, *rest)
                _to_files(d + ".out", d + ".err")
                fault = {"step": step, "k": k, "when": "ENOSPC", "op": op, "dir": d, "exit": run_train_script(out(d), on_save)}
                _flush()
                fault.update(_state_after(d), stderr=open(d + ".err").read())
                _to_files(d + ".resume.out", d + ".resume.err")
                FAULTS.armed = None
                fault["resume_exit"] = run_train_script(out(d) + ["--resume"], lambda real, *a: real(*a))
                _flush()
                fault["resume_log"], fault["resume_err"] = open(d + ".resume.out").read(), open(d + ".resume.err").read()
                with open(d + ".json", "w") as f:
                    json.dump(fault, f)
            if _forked(child) != 0:
                raise AssertionError(f"fault child {d} failed: see {d}.err and {d}.resume.err")
            with open(d + ".json") as f:
                results["faults"].append(json.load(f))
    gc.unfreeze()
    with open(spec["results"], "w") as f:
        json.dump(results, f, indent=1)


def _run_forked(fn, returned: int = 0) -> int:
    """fn() in a forked child, which exits with `returned` if fn returns and 1 if it raises (or is
    killed); the child's raw wait status."""
    _flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = returned
        except BaseException:
            traceback.print_exc()
        finally:
            _flush()
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _forked(fn) -> int:
    """fn() in a forked child; its exit status (0: it returned)."""
    status = _run_forked(fn)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_child(rank, port, log, argv, arm_step, arm, ops_file):
    """One rank of a 2-rank run, in a forked child: the environment torchrun would give it."""
    code = 1
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                          LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)

        def on_save(real_save, out_dir, model, optimizer, step, *rest):
            if step != arm_step:
                return real_save(out_dir, model, optimizer, step, *rest)
            FAULTS.armed = arm
            with FAULTS.window():
                real_save(out_dir, model, optimizer, step, *rest)
            if ops_file:
                with open(ops_file, "w") as f:
                    json.dump(FAULTS.ops, f)
        code = run_train_script(argv, on_save)
    except BaseException:
        traceback.print_exc()
    finally:
        _flush()
        os._exit(code)


def run_pair(argv, log_prefix, arm_step=None, arm_rank=None, arm=None, ops_prefix=None,
             timeout=300):
    """Both ranks of train.py, forked. When one ends in failure, the other gets SIGTERM (what
    torchrun does to the rest of a job). Returns each rank's status: an exit code, or -signal.
    A rendezvous port taken by another process between _free_port() and rank 0's bind: again."""
    for attempt in range(3):
        status = _pair_once(argv, log_prefix, arm_step, arm_rank, arm, ops_prefix, timeout)
        with open(f"{log_prefix}.rank0.log") as f:
            if "process group could not start" not in f.read():
                break
    return status


def _pair_once(argv, log_prefix, arm_step, arm_rank, arm, ops_prefix, timeout):
    port, pids, status = _free_port(), {}, {"seconds": time.time()}
    _flush()
    for rank in (0, 1):
        pid = os.fork()
        if pid == 0:
            _rank_child(rank, port, f"{log_prefix}.rank{rank}.log", argv, arm_step,
                        arm if rank == arm_rank else None,
                        ops_prefix and f"{ops_prefix}.rank{rank}.json")
        pids[pid] = rank
    signal.signal(signal.SIGALRM, lambda *_: [os.kill(p, signal.SIGKILL) for p in pids])
    signal.alarm(timeout)  # a hang is a failure, not a stuck test
    try:
        while pids:
            pid, st = os.wait()
            rank = pids.pop(pid)
            status[rank] = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
            if status[rank] != 0:
                for p in pids:
                    os.kill(p, signal.SIGTERM)
    finally:
        signal.alarm(0)
    status["seconds"] = round(time.time() - status["seconds"], 2)
    return status


def mode_ranks2(spec, argv):
    """Two ranks: the reference run, one run per chosen point, then a 2-rank --resume of each
    distinct result (see the module docstring). spec: root, step, results, and stride: {rank:
    n}, to try only every n-th of that rank's points (default: every point)."""
    import torch
    torch.set_num_threads(1)
    # imported once here, before forking, so no child pays for it: train and what it imports,
    # and torch._dynamo, which torch imports lazily at the first init on the meta device (1 s)
    __import__("train")
    __import__("torch._dynamo")
    FAULTS.install()
    gc.freeze()  # the children's garbage collections skip everything inherited (0.4 s each)
    root, step = spec["root"], spec["step"]
    ref = os.path.join(root, "ref")
    flag = lambda argv, out: [*argv, "--out-dir", out]  # noqa: E731
    results = {"ref": ref, "faults": [], "resumes": {}}
    results["ref_status"] = run_pair(flag(argv, ref), os.path.join(root, "ref"), arm_step=step,
                                     ops_prefix=os.path.join(root, "ops"))
    if any(results["ref_status"][r] for r in (0, 1)):
        raise AssertionError(f"reference run failed: {results['ref_status']}")
    ops = {r: json.load(open(os.path.join(root, f"ops.rank{r}.json"))) for r in (0, 1)}
    results["ops"] = ops
    stride = spec.get("stride", {})  # rank -> try every n-th of its points (default: all)
    points = [(r, k, when) for r in (0, 1)
              for i, (k, when) in enumerate((k, w) for k in range(len(ops[r])) for w in ("before", "after"))
              if i % stride.get(str(r), 1) == 0]
    for r, k, when in points:
        name = f"r{r}-{k:03d}-{when}"
        out = os.path.join(root, name)
        st = run_pair(flag(argv, out), os.path.join(root, name), arm_step=step, arm_rank=r,
                      arm=(k, when))
        if st.get(r) != -signal.SIGKILL:
            raise AssertionError(f"{name}: rank {r} was not killed at its point: {st}")
        results["faults"].append({"rank": r, "k": k, "when": when, "op": ops[r][k], "dir": out,
                                  "kill_status": st})
    seen = {}
    for f in results["faults"]:
        h = tree_hash(f["dir"])
        f["tree"] = h
        if h in seen:
            continue
        seen[h] = f["dir"]
        log = f["dir"] + ".resume"
        st = run_pair(flag(argv, f["dir"]) + ["--resume"], log)
        logs = {r: open(f"{log}.rank{r}.log").read() for r in (0, 1)}
        results["resumes"][h] = {"status": st, "logs": logs}
    with open(spec["results"], "w") as fh:
        json.dump(results, fh, indent=1)
    gc.unfreeze()


# ----------------------------------------------------------------------------- for the tests

def run(mode, spec, argv, timeout=900):
    """`python tests/faults.py MODE` in a fresh process, one thread (as the tests' one_thread
    fixture: the same arithmetic as the in-process runs it is compared with). Returns its results."""
    spec_path = spec["results"] + ".spec.json"
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), mode, spec_path, *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    with open(spec["results"]) as f:
        return json.load(f)


def report(base_dir, name, counts):
    """Add one battery's counts to base_dir/fault_battery.json (pytest's base temp folder)."""
    path = os.path.join(base_dir, "fault_battery.json")
    everything = {}
    if os.path.exists(path):
        with open(path) as f:
            everything = json.load(f)
    everything[name] = counts
    with open(path, "w") as f:
        json.dump(everything, f, indent=1)
    print(f"\nfault battery, {name}: {counts} (all batteries: {path})")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # as when train.py itself is the script
    mode, spec_path, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(spec_path) as f:
        spec = json.load(f)
    {"train": mode_train, "data": mode_data, "ranks2": mode_ranks2, "enospc": mode_enospc}[mode](spec, rest)
