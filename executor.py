"""executor.py -- where the programs a model writes are run: a confined child process, never the
training process.

chat.py scores `fn` replies with `run_python`, and the agent loop answers the model's tool calls
with it. `run_python` runs a program in a fresh `python -I -S` child, in its own session, in a
scratch directory that is deleted afterwards. Before the program starts, the child confines itself
in layers, in this order; RunResult.layers names those applied, and `describe()` says which ones
this kernel allows (a refused layer is reported with its reason, and the others still apply).

  layer         enforced by  what it stops
  (timeout)     the parent   a program that runs too long: its whole process group is killed
  rlimits       the kernel   memory (address space), CPU seconds, file size, open files, core dumps;
                             RLIMIT_NPROC = 0 stops new processes, once the uid is not root
  netns         the kernel   the network: a namespace with no interface but a down loopback
  mountns       the kernel   the filesystem: the root is an empty read-only tmpfs with read-only binds
                             of the stdlib and the shared libraries, and the scratch directory, the
                             one writable place; the project, /home and the rest of /etc and /tmp
                             are absent
  landlock      the kernel   the filesystem again, by path: read beneath the stdlib and the shared
                             libraries, anything beneath the scratch directory, nothing elsewhere;
                             signals and abstract unix sockets out of the sandbox (ABI >= 6)
  landlock-net  the kernel   TCP bind and connect (ABI >= 4)
  nonroot       the kernel   root's powers: uid and gid 65534, no groups, no capabilities (a user
                             that is not root stays itself, without the capabilities its namespaces
                             gave it)
  seccomp       the kernel   fork, clone, exec, sockets, signals, ptrace, mounts and namespaces, bpf,
                             io_uring, keys, modules: EPERM, for root too (x86-64 and arm64)
  audit         Python       a PEP 578 hook: no sockets, subprocesses, signals or ctypes; no opening
                             or listing outside the scratch directory and the stdlib, no writes,
                             renames or deletions outside the scratch directory
The layers overlap on purpose. tests/test_executor.py runs each escape (a write to the project, a
read of the project and of a secret, a TCP connection, a fork, a memory hog, an endless loop)
with no layer, to show that it works, then under each layer alone, to show which layers stop it.

Not contained: reads of the stdlib and the shared libraries; CPU, memory and scratch files within
the limits; the kernel itself (a bug reachable through the system calls left open escapes all of
this; a VM is the next step); and the harness, which shares the process: a program that set out to
cheat could find the verdict's secret in the harness's memory and fake a pass.
"""
import functools
import json
import marshal
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

LAYERS = ("rlimits", "netns", "mountns", "landlock", "landlock-net", "nonroot", "seccomp", "audit")  # in the order applied

# Runs in the child (`python -I -S -c BOOT` reads it, compiled, from stdin): read the job from stdin,
# confine the process, run the program, then print a verdict line that starts with a secret the
# program never saw on its stdin. The program's own output comes first; a crash or a kill leaves no
# verdict.
HARNESS = r'''
import ctypes, json, os, resource, stat, sys, traceback

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
LIBC.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
NOBODY = 65534
NEWNS, NEWNET, NEWUSER = 0x20000, 0x40000000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_NOATIME, MS_NODIRATIME = 1, 2, 4, 8, 32, 1024, 2048
MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME, ST_RELATIME = 4096, 16384, 1 << 18, 1 << 21, 4096
ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(os.uname().machine)
# what the program may read: the stdlib (sys.path), the shared libraries its C modules load, time zones
READS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/localtime", "/usr/share/zoneinfo",
         "/dev/null", "/dev/zero", "/dev/urandom")


def ok(ret, what):
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def syscall(nr, *args):  # (integers as C longs: syscall() is variadic)
    return LIBC.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in (nr, *args)])


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    ok(LIBC.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def confine(job, scratch):
    want, active, missing, state = job["layers"], [], {}, {}
    reads = sorted({p for p in READS + tuple(sys.path) if p and os.path.exists(p)})
    ok(LIBC.prctl(38, 1, None, 0, 0), "PR_SET_NO_NEW_PRIVS")  # no setuid gains from here on

    def layer(name, apply, *args):
        if name in want:
            try:
                apply(*args)
                active.append(name)
            except OSError as e:
                missing[name] = str(e)

    layer("rlimits", rlimits, job)
    layer("netns", lambda: (privileged(state), ok(LIBC.unshare(NEWNET), "unshare(CLONE_NEWNET)")))
    layer("mountns", new_root, state, scratch, reads)
    if {"landlock", "landlock-net"} & set(want):
        try:
            active += landlock("landlock" in want, "landlock-net" in want, scratch, reads, missing)
        except OSError as e:
            missing.update({k: str(e) for k in ("landlock", "landlock-net") if k in want and k not in missing})
    layer("nonroot", drop_root, state, scratch, "mountns" in active)
    layer("seccomp", seccomp)
    layer("audit", audit_hook, scratch, reads)
    return active, missing


def rlimits(job):
    for name, value in (("RLIMIT_AS", job["memory"]), ("RLIMIT_CPU", job["cpu"]), ("RLIMIT_FSIZE", 1 << 20),
                        ("RLIMIT_NOFILE", 64), ("RLIMIT_NPROC", 0), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def privileged(state):
    """Root may make namespaces; another user makes them inside a user namespace of its own,
    where it keeps its uid (mapped to itself) and gains capabilities over those namespaces only."""
    if os.geteuid() == 0 or state.get("userns"):
        return
    uid, gid = os.geteuid(), os.getegid()
    ok(LIBC.unshare(NEWUSER), "unshare(CLONE_NEWUSER)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    state["userns"] = True


def new_root(state, scratch, reads):
    """A mount namespace whose root is an empty tmpfs holding read-only binds of `reads` and a
    writable bind of the scratch directory, at their own paths; then the tmpfs goes read-only too."""
    if ARCH is None:
        raise OSError(38, f"no pivot_root number for {os.uname().machine}")
    privileged(state)
    ok(LIBC.unshare(NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back out
    root = os.path.join(scratch, ".root")
    os.mkdir(root, 0o700)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
    done = []
    for path in reads + [scratch]:
        if any(path.startswith(d + "/") for d in done):
            continue  # seen through the bind of a folder above it
        target = root + path
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        if os.path.islink(path):  # (e.g. /lib -> usr/lib: the link, whose target is bound on its own)
            os.symlink(os.readlink(path), target)
            continue
        if os.path.isdir(path):
            os.mkdir(target, 0o755)
            done.append(path)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        mount(path, target, None, MS_BIND)
        if path != scratch:
            read_only(target)
    os.chdir(root)
    ok(syscall({0xC000003E: 155, 0xC00000B7: 41}[ARCH], b".", b"."), "pivot_root")  # the old root sits on top
    ok(LIBC.umount2(b".", 2), "umount the old root")  # MNT_DETACH: and is gone
    os.chdir(scratch)
    os.rmdir(".root")  # (no longer a mount point: the tmpfs is the root now)
    read_only("/")


def read_only(target):
    """Remount a bind read-only, keeping the flags a user namespace may not drop."""
    f = os.statvfs(target).f_flag  # (statvfs's ST_ flags are the MS_ ones, but for relatime)
    keep = f & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME) | (MS_RELATIME if f & ST_RELATIME else 0)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def drop_root(state, scratch, new_root):
    if os.geteuid() != 0:  # not root: in a user namespace of our own, drop its capabilities
        if state.get("userns"):
            header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
            ok(LIBC.capset(header, data), "capset")
        return
    if not new_root:  # the real tree, where uid 65534 may not reach the stdlib (pyenv's under a 0700 /root):
        for i, path in enumerate(sys.path):  # import it through a descriptor opened while still root
            parents = ["/".join(path.split("/")[:j]) or "/" for j in range(2, path.count("/") + 1)]
            if os.path.isdir(path) and not all(os.stat(p).st_mode & stat.S_IXOTH for p in parents):
                sys.path[i] = via = f"/proc/self/fd/{os.open(path, os.O_PATH | os.O_DIRECTORY)}"
                for m in list(sys.modules.values()):  # and the packages imported already (encodings, json, ..)
                    if isinstance(getattr(m, "__path__", None), list):
                        m.__path__[:] = [via + p[len(path):] if p.startswith(path + "/") else p for p in m.__path__]
    os.chown(scratch, NOBODY, NOBODY)
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)  # from root to all non-zero: the kernel clears every capability


def landlock(fs, net, scratch, reads, missing):
    """One Landlock ruleset: the filesystem rights it handles are denied except where a rule grants
    them, and so are TCP bind and connect (no rule grants them). Returns the layers it applied."""
    abi = syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 0:
        raise OSError(ctypes.get_errno(), f"landlock: {os.strerror(ctypes.get_errno())}")
    applied = []
    if fs:
        applied.append("landlock")
    if net and abi < 4:
        missing["landlock-net"] = f"Landlock ABI {abi} < 4 has no network rules"
    elif net:
        applied.append("landlock-net")
    if not applied:
        return []
    all_fs = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1 if fs else 0  # rights known to this ABI
    attr = (ctypes.c_uint64 * 3)(all_fs, 3 if "landlock-net" in applied else 0, 3 if fs and abi >= 6 else 0)
    ruleset = ok(syscall(444, attr, 8 if abi < 4 else 16 if abi < 6 else 24, 0), "landlock_create_ruleset")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    READ, FILE_RIGHTS = 1 | 4 | 8, 1 | 2 | 4 | (1 << 14) | (1 << 15)  # execute, read file, read dir | on a file
    for path, rights in [(p, READ) for p in reads] + [(scratch, all_fs)] if fs else []:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            if not os.path.isdir(path):
                rights &= FILE_RIGHTS
            ok(syscall(445, ruleset, 1, ctypes.byref(PathBeneath(rights & all_fs, fd)), 0), f"landlock_add_rule {path}")
        finally:
            os.close(fd)
    ok(syscall(446, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return applied


# seccomp: a filter the kernel runs on every system call of this process from now on. These fail
# with EPERM: new processes and threads (fork, vfork, clone, clone3), exec, sockets, signals (kill,
# tkill, tgkill), other processes' memory (ptrace, process_vm_readv/writev), namespaces and mounts
# (unshare, setns, mount, umount2, pivot_root, chroot, open_tree, move_mount, fsopen, fsmount,
# mount_setattr), open_by_handle_at, bpf, perf_event_open, keys (add_key, request_key, keyctl),
# io_uring_setup, kernel modules (init_module, finit_module).
SECCOMP_DENY = {0xC000003E: (57, 58, 56, 435, 59, 322, 41, 62, 200, 234, 101, 310, 311, 272, 308, 165, 166, 155,
                             161, 428, 429, 430, 432, 442, 304, 321, 298, 248, 249, 250, 425, 175, 313),  # x86-64
                0xC00000B7: (220, 435, 221, 281, 198, 129, 130, 131, 117, 270, 271, 97, 268, 40, 39, 41,
                             51, 428, 429, 430, 432, 442, 265, 280, 241, 217, 218, 219, 425, 105, 273)}  # arm64


def seccomp():
    if ARCH is None:
        raise OSError(38, f"seccomp: no syscall table for {os.uname().machine}")
    deny = SECCOMP_DENY[ARCH]
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1   # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    n = len(deny)
    # [0] load arch [1] other arch: jump to EPERM [2] load nr [3] x32 numbers: EPERM, then one test per
    # denied number (a match jumps to the EPERM return), then ALLOW, EPERM
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, ARCH), (RET, 0, 0, EPERM), (LD, 0, 0, 0), (JGE, n + 1, 0, 0x40000000)]
    prog += [(JEQ, n - i, 0, nr) for i, nr in enumerate(deny)]
    prog += [(RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    insns = (Insn * len(prog))(*[Insn(*i) for i in prog])
    PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
    filt = Prog(len(prog), insns)
    ok(LIBC.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(filt), 0, 0), "seccomp")


def audit_hook(scratch, reads):
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    roots = tuple(realpath(p) + sep for p in reads)
    beneath = lambda p, places: isinstance(p, int) or (realpath(fsdecode(p)) + sep).startswith(places)
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.symlink", "os.link", "os.chmod",
                   "os.chown", "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree",
                   "shutil.copyfile", "shutil.move"}
    DENY = ("socket.", "ctypes.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.spawn",
            "os.posix_spawn", "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "pty.")
    NO_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess", "_multiprocessing", "socket", "_socket"}
    mine, readable = (scratch + sep,), (scratch + sep,) + roots

    def hook(event, args):
        if event.startswith(DENY) or (event == "import" and args[0] in NO_IMPORT):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[0] is not None:
            if args[2] & WRITE and not beneath(args[0], mine):
                raise PermissionError(f"sandbox: writing outside the scratch directory ({args[0]})")
            if not beneath(args[0], readable):
                raise PermissionError(f"sandbox: reading outside the scratch directory and the stdlib ({args[0]})")
        if event in ("os.listdir", "os.scandir") and args[0] is not None and not beneath(args[0], readable):
            raise PermissionError(f"sandbox: listing outside the scratch directory and the stdlib ({args[0]})")
        if event in PATH_EVENTS and not all(beneath(a, mine) for a in args if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"sandbox: {event} outside the scratch directory")
    sys.addaudithook(hook)  # (an audit hook cannot be removed)


def main():  # locals, not globals of __main__, which the program can import
    job = json.loads(sys.stdin.buffer.read())
    nonce, code = job["nonce"], job["code"]
    active, missing = confine(job, os.path.realpath(job["scratch"]))
    sys.stderr.write("layers: " + json.dumps({"active": active, "missing": missing}) + "\n")
    sys.stderr.flush()
    del job
    error = ""
    try:
        exec(compile(code, "<program>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        error = f"SystemExit: {e.code}: the program must run to its end"
    except BaseException as e:
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        where = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<program>"]
        if isinstance(e, AssertionError) and where:
            error = f"AssertionError at line {where[-1].lineno}: {code.splitlines()[where[-1].lineno - 1].strip()}"
    sys.stdout.write(f"\n{nonce} " + json.dumps(error) + "\n")


main()
'''
BOOT = "import marshal, sys; exec(marshal.load(sys.stdin.buffer))"  # the harness, compiled once per process


@dataclass
class RunResult:
    ok: bool           # the program ran to its end without an exception
    output: str        # what it printed (at most 4 KB)
    error: str         # the exception ("AssertionError at line 3: ..."), a timeout or a signal; "" if ok
    layers: list       # the confinement layers that were active (names from LAYERS)
    missing: dict = field(default_factory=dict)  # layer -> why the kernel refused it

    def reply(self) -> str:
        """What the model sees as the tool's turn: its output and its error, or "ok"."""
        text = "\n".join(s for s in (self.output.strip()[-200:], self.error) if s)
        return text or "ok"


def run_python(code: str, timeout: float = 2.0, memory_mb: int = 256, layers=LAYERS) -> RunResult:
    """Run `code` in a confined child process. `layers` picks the confinement layers (all by
    default); the tests switch some off to show what each one stops on its own."""
    if unknown := set(layers) - set(LAYERS):
        raise ValueError(f"unknown executor layers {sorted(unknown)}; known: {', '.join(LAYERS)}")
    scratch = tempfile.mkdtemp(prefix="nanok2-exec-")
    nonce = secrets.token_hex(16)
    job = {"nonce": nonce, "code": code, "scratch": scratch, "memory": memory_mb << 20,
           "cpu": int(timeout) + 1, "layers": list(layers)}
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
    try:
        with open(os.path.join(scratch, ".out"), "w+b") as out, open(os.path.join(scratch, ".err"), "w+b") as err:
            p = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", BOOT], stdin=subprocess.PIPE,
                                 stdout=out, stderr=err, cwd=scratch, env=env, start_new_session=True)
            timed_out = False
            try:
                p.communicate(_harness() + json.dumps(job).encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(p.pid)  # the child and anything it started, done or not
                p.wait()
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(1 << 16).decode(errors="replace"), err.read(1 << 16).decode(errors="replace")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    head, _, rest = stderr.partition("\n")
    report = json.loads(head[len("layers: "):]) if head.startswith("layers: ") else {"active": [], "missing": {}}
    layers, missing = report["active"], report["missing"]
    stderr = rest if head.startswith("layers: ") else stderr
    head, sep, verdict = stdout.rpartition(f"\n{nonce} ")
    if timed_out:
        return RunResult(False, stdout[:4096], f"timeout after {timeout:g} s", layers, missing)
    if not sep:  # no verdict: the process died (a signal, a limit) before the program ended
        why = f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exit status {p.returncode}"
        return RunResult(False, stdout[:4096], f"{why}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}",
                         layers, missing)
    error = json.loads(verdict)
    return RunResult(not error, head[:4096], error, layers, missing)


@functools.cache
def _harness() -> bytes:
    return marshal.dumps(compile(HARNESS, "<executor harness>", "exec"))


@functools.cache
def available() -> RunResult:
    """The layers this machine allows (a trivial program, run once per process with all of them)."""
    return run_python("pass")


def describe() -> str:
    """One line for a run's log: which layers contain model-written code here, and which are missing."""
    r = available()
    missing = "; ".join(f"{k}: {v}" for k, v in r.missing.items())
    if not set(r.layers) - {"rlimits", "audit"}:
        return (f"executor: this kernel allows none of its containment layers ({missing}); model-written code "
                f"runs under {' and '.join(r.layers) or 'no layer'} only (the audit hook is not a sandbox)")
    return f"executor: contained by {', '.join(r.layers)}" + (f"; missing: {missing}" if missing else "")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
