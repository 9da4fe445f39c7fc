"""executor.py -- where the programs a model writes are run: a confined child process, never the
training process.

chat.py scores `fn` replies with `run_python`, and the agent loop answers the model's tool calls
with it. `run_python` runs a program in a fresh `python -I -S` child, in its own session, in a
scratch directory that is deleted afterwards.

What confines it, honestly:
  kernel-enforced   a wall-clock timeout (the whole process group is killed); rlimits on address
                    space, CPU seconds, file size, open files and core dumps, and RLIMIT_NPROC = 0
                    (which the kernel ignores for root); a seccomp filter (x86-64 and arm64) that
                    makes fork, clone, exec, socket and kill fail with EPERM, for root too; a fresh
                    network namespace where the kernel allows one (root, or unprivileged user
                    namespaces): no interface but a down loopback.
  Python-level      a PEP 578 audit hook, installed before the program starts, that refuses every
                    socket, fork/exec/spawn/subprocess, signals, ctypes, and writes, renames,
                    deletions and links outside the scratch directory.
So processes, exec and the network are stopped by the kernel; writes outside the scratch
directory only by the audit hook, which is a guard against accidents and against a 5M-parameter
model, not a sandbox: its own documentation says native code bypasses it, and a program that set
out to escape could find a way (the harness's memory is readable by the program, so a cheating
program could even fake a pass). Reads are not restricted. A real sandbox adds filesystem
isolation (Landlock, a mount namespace, a container or a VM). tests/test_executor.py shows each
containment: an infinite loop, a fork bomb (with the audit hook, and with the kernel layers
alone), writes outside the scratch directory, a network connection, a memory hog.
"""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs in the child as `python -I -S -c HARNESS`: read the job from stdin, confine the process,
# run the program, then print a verdict line that starts with a secret the program never saw on
# its stdin. The program's own output comes first; a crash or a kill leaves no verdict.
HARNESS = r'''
import json, os, resource, sys, traceback


def confine(job, scratch):
    layers = ["rlimits"]
    for name, value in (("RLIMIT_AS", job["memory"]), ("RLIMIT_CPU", job["cpu"]), ("RLIMIT_FSIZE", 1 << 20),
                        ("RLIMIT_NOFILE", 64), ("RLIMIT_NPROC", 0), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    import ctypes
    if job["netns"]:  # a network namespace of our own: no interface but a down loopback
        unshare = ctypes.CDLL(None, use_errno=True).unshare
        NEWNET, NEWUSER = 0x40000000, 0x10000000  # root may unshare the network alone; others with a user ns
        if unshare(NEWNET) == 0 or unshare(NEWUSER | NEWNET) == 0:
            layers.append("netns")
    if seccomp(ctypes):
        layers.append("seccomp")
    if job["audit"]:
        realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
        inside = lambda p: isinstance(p, int) or (realpath(fsdecode(p)) + sep).startswith(scratch + sep)
        WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
        PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.symlink", "os.link", "os.chmod",
                       "os.chown", "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree",
                       "shutil.copyfile", "shutil.move"}
        DENY = ("socket.", "ctypes.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.spawn",
                "os.posix_spawn", "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "pty.")
        NO_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess", "_multiprocessing", "socket", "_socket"}

        def hook(event, args):
            if event.startswith(DENY) or (event == "import" and args[0] in NO_IMPORT):
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "open" and args[0] is not None and args[2] & WRITE and not inside(args[0]):
                raise PermissionError(f"sandbox: writing outside the scratch directory ({args[0]})")
            if event in PATH_EVENTS and not all(inside(a) for a in args if isinstance(a, (str, bytes, os.PathLike))):
                raise PermissionError(f"sandbox: {event} outside the scratch directory")
        sys.addaudithook(hook)  # (an audit hook cannot be removed)
        layers.append("audit")
    return layers


# seccomp: a filter the kernel runs on every system call of this process from now on. These fail
# with EPERM: new processes and threads (fork, vfork, clone, clone3), exec, sockets, and signals
# (kill, tkill, tgkill). Syscall numbers of x86-64 and arm64; other machines go without it.
SECCOMP_DENY = {0xC000003E: (57, 58, 56, 435, 59, 322, 41, 62, 200, 234),  # x86-64
                0xC00000B7: (220, 435, 221, 281, 198, 129, 130, 131)}     # arm64 (no fork/vfork)


def seccomp(ctypes):
    import platform
    arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(platform.machine())
    if arch is None:
        return False
    deny = SECCOMP_DENY[arch]
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1   # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    n = len(deny)
    # [0] load arch [1] other arch: jump to EPERM [2] load nr [3] x32 numbers: EPERM, then one test per
    # denied number (a match jumps to the EPERM return), then ALLOW, EPERM
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, EPERM), (LD, 0, 0, 0), (JGE, n + 1, 0, 0x40000000)]
    prog += [(JEQ, n - i, 0, nr) for i, nr in enumerate(deny)]
    prog += [(RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    insns = (Insn * len(prog))(*[Insn(*i) for i in prog])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    return (libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) == 0 and
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(Prog(len(prog), insns)), 0, 0) == 0)


def main():  # locals, not globals of __main__, which the program can import
    job = json.loads(sys.stdin.read())
    nonce, code = job["nonce"], job["code"]
    sys.stderr.write("layers: " + ",".join(confine(job, os.path.realpath(job["scratch"]))) + "\n")
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


@dataclass
class RunResult:
    ok: bool           # the program ran to its end without an exception
    output: str        # what it printed (at most 4 KB)
    error: str         # the exception ("AssertionError at line 3: ..."), a timeout or a signal; "" if ok
    layers: list       # the confinement layers that were active ("rlimits", "netns", "audit")

    def reply(self) -> str:
        """What the model sees as the tool's turn: its output and its error, or "ok"."""
        text = "\n".join(s for s in (self.output.strip()[-200:], self.error) if s)
        return text or "ok"


def run_python(code: str, timeout: float = 2.0, memory_mb: int = 256, audit: bool = True,
               netns: bool = True) -> RunResult:
    """Run `code` in a confined child process (see part 3 of the docstring). `audit` and `netns`
    switch those layers off, so the tests can show what the kernel layers contain on their own."""
    scratch = tempfile.mkdtemp(prefix="nanok2-exec-")
    nonce = secrets.token_hex(16)
    job = {"nonce": nonce, "code": code, "scratch": scratch, "memory": memory_mb << 20,
           "cpu": int(timeout) + 1, "netns": netns, "audit": audit}
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
    try:
        with open(os.path.join(scratch, ".out"), "w+b") as out, open(os.path.join(scratch, ".err"), "w+b") as err:
            p = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", HARNESS], stdin=subprocess.PIPE,
                                 stdout=out, stderr=err, cwd=scratch, env=env, start_new_session=True)
            timed_out = False
            try:
                p.communicate(json.dumps(job).encode(), timeout=timeout)
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
    layers = stderr.split("\n", 1)[0][len("layers: "):].split(",") if stderr.startswith("layers: ") else []
    head, sep, verdict = stdout.rpartition(f"\n{nonce} ")
    if timed_out:
        return RunResult(False, stdout[:4096], f"timeout after {timeout:g} s", layers)
    if not sep:  # no verdict: the process died (a signal, a limit) before the program ended
        why = f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exit status {p.returncode}"
        return RunResult(False, stdout[:4096], f"{why}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}",
                         layers)
    error = json.loads(verdict)
    return RunResult(not error, head[:4096], error, layers)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
