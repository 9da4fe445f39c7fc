"""disk.py: a full disk is one line, and leaves nothing half-written.

A write that fails for want of space (ENOSPC, EDQUOT) or with an I/O error (EIO), in a checkpoint
save (checkpoint.py), the token cache (data.py), metrics.jsonl (train.py) or `hf.py export`, ends
as DiskFull: one line naming the folder, the bytes the write needed and those free. Each writer
removes what it left unfinished first (see removed_on_error). Checked by the ENOSPC battery
(tests/faults.py enospc, tests/test_checkpoint.py) and tests/test_bad_input.py's full-disk rows.
"""
import contextlib
import errno
import os
import re
import shutil


@contextlib.contextmanager
def removed_on_error(*paths):
    """Files the block writes, removed if it fails (or is interrupted): none left half-written."""
    try:
        yield
    except BaseException:
        for p in paths:
            with contextlib.suppress(OSError):
                os.remove(p)
        raise


def atomic_write(path: str, data: bytes) -> None:
    # Write under a temporary name, then rename: a crash (or a second process doing the same work
    # at the same time) can never leave a half-written file under the real name; a failed write
    # (a full disk) leaves none at all.
    tmp = f"{path}.tmp{os.getpid()}"
    with removed_on_error(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


class DiskFull(ValueError):
    """A ValueError, so that every command line prints it as its one `error:` line."""

    def __init__(self, message, errno_: int):
        super().__init__(message)
        self.errno = errno_


def full_errno(e: BaseException | None) -> int | None:
    """ENOSPC, EDQUOT or EIO if that is what made `e` fail, else None. Found in e's causes, in DCP's
    CheckpointException (the failure of each rank) and in safetensors' text ("os error 28")."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFull) or isinstance(e, OSError) and e.errno in FULL_DISK:
            return e.errno
        found = re.search(r"os error (\d+)", str(e))
        if found and int(found.group(1)) in FULL_DISK:
            return int(found.group(1))
        for failure in (getattr(e, "failures", None) or {}).values():  # CheckpointException
            n = full_errno(failure[0] if isinstance(failure, tuple) else failure)
            if n:
                return n
        e = e.__cause__ or e.__context__
    return None


def error(n: int, folder: str, needed: int, what: str, kept: str = "") -> DiskFull:
    """The one line: errno n's text while `what` in `folder`, the bytes needed and those free."""
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes are"
    except OSError:
        free = "less is"
    return DiskFull(f"{os.strerror(n)} while {what} in {folder!r}: it needs about {needed:,} bytes "
                    f"free there, {free}; nothing half-written is left{kept}: free some space, or "
                    f"write elsewhere, and run again", n)


@contextlib.contextmanager
def full_is_one_line(folder: str, needed, what: str, kept: str = ""):
    """Turn a full disk inside the block into DiskFull; `needed()`: the bytes the block writes."""
    try:
        yield
    except BaseException as e:
        n = full_errno(e)
        if n is None or isinstance(e, DiskFull):
            raise
        raise error(n, folder, needed(), what, kept) from None
