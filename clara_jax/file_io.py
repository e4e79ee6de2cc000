"""The package's shared file helpers: the cache root, sha256 of a file, and writes a crash cannot
tear (a file, or a whole directory, is there complete or not at all).

A file is written beside its target under a hidden temporary name, fsynced, renamed over the
target, and then its directory is fsynced so that the rename itself survives a power cut.

A directory whose files only make sense together (WORKDIR/model: weights + clara.json) is built
complete in a hidden sibling (`staging_dir`) and swapped in by `replace_dir` with two renames:

    model -> .model.old      (the previous copy steps aside)
    .model.new.PID -> model  (the new copy takes its place)
    rm -r .model.old

A crash between the two renames leaves no `model`, only `.model.old` (complete): `live_dir` sends
readers there, and the next `replace_dir` keeps it until the new copy is in place. So at every
instant a reader finds exactly the old copy or the new one, never a mix.

A cache directory that several processes may build at once (a converted GGUF, a tokenizer) is
built by `build_dir_once`: each builder works in its own temporary sibling and renames it in; the
first complete copy wins and the others keep it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models and tokenizers are cached: `cache_dir`, else $CLARA_JAX_CACHE, else
    ~/.cache/clara_jax."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("CLARA_JAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "clara_jax"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (a multi-GB GGUF never sits in memory whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and creations inside `path` durable (a no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str | os.PathLike) -> str:
    """The hidden per-process temporary name `write_bytes_atomic` writes `path` under."""
    path = os.fspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp.{os.getpid()}")


def remove_temps(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files a killed writer of `path` left behind; returns what was removed."""
    path = os.fspath(path)
    pattern = os.path.join(
        glob.escape(os.path.dirname(path)), f".{glob.escape(os.path.basename(path))}.tmp.*"
    )
    removed = []
    for stale in glob.glob(pattern):
        try:
            os.remove(stale)
            removed.append(stale)
        except FileNotFoundError:
            pass
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield the temporary name to write `path` under (`temp_path`); when the block ends without
    an error, the file is fsynced and renamed over `path`, and the directory fsynced. On an error
    the temporary file is removed and `path` is left as it was.

    For writers that take a file name (e.g. a C++ record writer) rather than bytes."""
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, obj, *, ensure_ascii: bool = True) -> None:
    """`obj` as indented JSON (with a final newline), atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=ensure_ascii) + "\n").encode())


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file, then every directory (deepest first), under `root`."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(directory)


def _sibling(target: str, role: str) -> str:
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}.{role}")


def staging_dir(target: str | os.PathLike) -> str:
    """A fresh, empty hidden sibling of `target` to build its next copy in.

    Half-built copies a killed writer left (`.NAME.new.*`) are removed first: one directory has
    one writer at a time.
    """
    target = os.path.abspath(os.fspath(target))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    for stale in glob.glob(glob.escape(_sibling(target, "new")) + ".*"):
        shutil.rmtree(stale, ignore_errors=True)
    path = f"{_sibling(target, 'new')}.{os.getpid()}"
    os.makedirs(path)
    return path


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Swap the complete directory `staging` in as `target` (see the module docstring)."""
    staging, target = os.path.abspath(os.fspath(staging)), os.path.abspath(os.fspath(target))
    parent, old = os.path.dirname(target), _sibling(target, "old")
    fsync_tree(staging)
    fsync_dir(parent)
    if os.path.isdir(target):
        if os.path.lexists(old):  # left by a swap that had finished its renames: `target` is complete
            shutil.rmtree(old)
        os.rename(target, old)
        fsync_dir(parent)
    # else: a crash fell between the renames of an earlier swap and `old` is the complete copy;
    # it stays (readers use it) until the new copy is in place.
    os.rename(staging, target)
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def live_dir(target: str | os.PathLike) -> str:
    """The directory holding `target`'s complete copy: `target` itself, or `.NAME.old` when a
    crash fell between `replace_dir`'s two renames (then `target` does not exist)."""
    target = os.fspath(target)
    if os.path.isdir(target):
        return target
    old = _sibling(target, "old")
    return old if os.path.isdir(old) else target


def build_dir_once(
    target: str | os.PathLike,
    build: Callable[[Path], None],
    is_complete: Callable[[Path], bool],
) -> str:
    """`target` as a complete directory, built by `build(tmp)` only if `is_complete(target)` is
    false; returns `str(target)`.

    For caches that several processes may fill at once. Each builder writes into its own
    temporary sibling (`build` should write whatever `is_complete` checks, e.g. a stamp, last),
    which is then renamed in, so a reader never sees half a directory. If another process put a
    complete copy in place meanwhile, that copy is kept and ours is dropped; an incomplete or
    stale `target` is moved aside first. The directory gets the usual umask permissions (not
    mkdtemp's 0700), so a shared cache stays readable to other users.
    """
    target = Path(target)
    if is_complete(target):
        return str(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build.", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        build(tmp)
        if os.path.lexists(target):
            if is_complete(target):  # another process finished first: keep theirs
                return str(target)
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=parent))
            try:
                os.rename(target, stale / "old")
            except OSError:  # another process moved it first
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):  # lost the race to a complete copy: fine; anything else: raise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
    """`gs://bucket/x`, `s3://…`, `https://…`: a path the os module would take for a local folder
    named `gs:` (os.path.abspath keeps the scheme as a directory)."""
    return bool(_URL.match(os.fspath(path)))


def url_refusal(what: str, path: str | os.PathLike) -> str:
    """The message for an object-store URL where only local paths work yet (issue #20)."""
    return (
        f"{what} {os.fspath(path)}: object-store URLs are not supported yet, and nothing was written "
        "(neither there nor in a local folder). On a pod slice, mount the bucket on every host (e.g. "
        "gcsfuse) and pass the mount's local path."
    )
