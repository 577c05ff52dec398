"""Crash-safe output helpers.

Every result file is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written file that looks complete. Sweeps rely on a final marker file (`DONE_MARKER`) to know a run
finished. The temporary file gets the mode an ordinary `open()` would give (0o666 less the umask), not
mkstemp's private 0o600, so colleagues on shared storage can read results as they can any other file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from molft.files import DONE_MARKER  # noqa: E402,F401  re-exported

_PROC_STATUS = Path("/proc/self/status")
_umask_lock = threading.Lock()
_swapped_umask: int | None = None


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (Linux >= 4.7).

    Elsewhere it is read once per process by setting and restoring it, because that briefly changes the
    umask for every thread.
    """
    global _swapped_umask
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        if _swapped_umask is None:
            _swapped_umask = os.umask(0o022)
            os.umask(_swapped_umask)
        return _swapped_umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | os.PathLike, frame: Any, **kwargs: Any) -> None:
    """Write a pandas DataFrame atomically (index off unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def save_figure(path: str | os.PathLike, fig: Any, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically; the format comes from the target's suffix."""
    path = Path(path)
    kwargs.setdefault("dpi", 150)
    kwargs.setdefault("bbox_inches", "tight")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def mark_done(output_dir: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
    """Write the completion marker; call it last, after every other output exists."""
    write_json(Path(output_dir) / DONE_MARKER, info or {})


def is_done(output_dir: str | os.PathLike) -> bool:
    return (Path(output_dir) / DONE_MARKER).is_file()


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and paths turn up in metrics and manifests
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool, what: str) -> Path:
    """Refuse to silently redo a finished step; drop a stale marker before overwriting one.

    `what` names the step's result in the message, e.g. "influence scores".
    """
    output_dir = Path(output_dir)
    if is_done(output_dir):
        if not overwrite:
            raise ValueError(
                f"{output_dir} already holds complete {what} ({DONE_MARKER}); pass --overwrite_output_dir to redo it."
            )
        (output_dir / DONE_MARKER).unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir
