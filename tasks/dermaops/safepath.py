"""Turning a name someone else chose (an S3 key, a zip member, a manifest entry) into a local path.

Keys and member names are data, not paths: `predin//tmp/x` relative to the prefix `predin/` is the
absolute `/tmp/x`, a manifest may list `../../.bashrc`, and `a//b` or `a/./b` land on the same file as
`a/b`. `local_path` is the one place that maps such a name under a local folder, and it refuses, in
one line naming the name and where it came from, anything that is not a plain relative path whose every
segment is a real name and that stays inside the folder once symlinks are resolved. It is called BEFORE
anything is written, so a refused name leaves no file behind.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from dermaops.errors import StageError

# A Windows drive ("C:") or UNC start ("\\host") is absolute on the machines that would honour it.
_DRIVE = re.compile(r"^[A-Za-z]:")


def unsafe_reason(name: str) -> str | None:
    """Why `name` is not a safe relative path ("absolute", "'..' segment", ...), or None when it is."""
    if not isinstance(name, str) or not name:
        return "empty"
    if "\x00" in name:
        return "NUL byte"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "absolute path"
    segments = re.split(r"[/\\]", name)
    if ".." in segments:
        return "'..' segment"
    if any(s in ("", ".") for s in segments):
        # Not harmful by itself, but `a//b` and `a/./b` would overwrite the file of `a/b`.
        return "empty or '.' segment"
    return None


def local_path(root: Path, name: str, what: str) -> Path:
    """`root / name`, checked: StageError naming `what` (e.g. "--images s3://b/p: object s3://b/p//tmp/x")
    when `name` is absolute, has a `..`, empty or `.` segment, or resolves outside `root`."""
    reason = unsafe_reason(name)
    if reason is None:
        base = root.resolve()
        target = (base / PurePosixPath(name)).resolve()
        if target != base and base not in target.parents:
            reason = "resolves outside its folder"
    if reason is not None:
        raise StageError(f"{what}: refusing the name {name!r} as a local file name ({reason}); nothing was written")
    return root / PurePosixPath(name)
