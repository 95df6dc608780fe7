"""Small file helpers shared by every fare-moe writer: atomic writes, permissions, version records."""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from fare_core.errors import FareError


def atomic_write(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``target``, then rename it into place.

    The result gets :func:`normal_permissions` (safetensors' ``save_file`` creates 0600 files).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        normal_permissions(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only a fallback)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions of a plain ``open``.

    Files become ``0o666 & ~umask`` and folders ``0o777 & ~umask``, as with any other output;
    libraries that create private files (safetensors: 0600) would otherwise make some outputs
    unreadable to the group where the rest are readable.
    """
    umask = current_umask()
    path = Path(path)
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        paths += [p for p in path.rglob("*") if not p.is_symlink()]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def check_writable_dir(path: str | os.PathLike, name: str) -> Path:
    """Raise FareError unless ``path`` is a directory we can write in, or one we can create.

    Meant to run before any expensive work (model loading); creates nothing. ``name`` is the
    argument the user set (for the message), e.g. ``record_routing``.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise FareError(f"{name}={str(path)!r} is a file; give a directory")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FareError(f"{name}={str(path)!r} cannot be created: {str(existing)!r} is a file; give a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".fare-write-check-"):
            pass
    except OSError as e:
        raise FareError(
            f"{name}={str(path)!r} is not writable ({e.strerror or e} in {str(existing)!r}); "
            "give a directory you can write to"
        ) from None
    return p


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent), for manifests."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>[0-9]+)$")  # atomic writers' temp / replaced siblings


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (signal 0; another user's process counts, a zombie does not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    try:  # a killed child its parent has not reaped yet is a zombie ("Z"): dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temps(folder: Path, log=None) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` siblings of ``folder`` whose process is dead.

    A ``kill -9`` during an atomic write (a pipeline stage, a compressed checkpoint) leaves them; a
    live process's (another run writing now) are kept.
    """
    folder = Path(folder)
    removed = []
    for p in sorted(folder.parent.glob(f".{glob.escape(folder.name)}.*-*")):
        m = TEMP_NAME.match(p.name)
        if m and m["name"] == folder.name and not pid_alive(int(m["pid"])):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
            if log is not None:
                log(f"[{folder.name}] removed {p.name} left by process {m['pid']}, which no longer runs")
    return removed
