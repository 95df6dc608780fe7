"""Small file helpers shared by every fare-moe writer: atomic writes, permissions, version records."""

from __future__ import annotations

import os
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
