"""File names read from untrusted JSON (index manifests, weight maps, clara.json) stay inside their directory.

A downloaded index or model directory names its own files; if those names could be absolute or
climb out with `..`, opening the directory would read any file on the machine.
"""

from __future__ import annotations

import os


def contained_path(directory: str | os.PathLike, name, *, source: str, field: str) -> str:
    """`directory/name`, after checking that `name` is a relative path that stays inside `directory`.

    `source` (the JSON file) and `field` name where `name` came from, for the error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: field {field} must be a non-empty file name, got {name!r}")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ValueError(
            f"{source}: field {field} is an absolute path ({name!r}); expected a name inside {directory}"
        )
    if any(part in ("..", "") for part in parts) or "\0" in name:
        raise ValueError(
            f"{source}: field {field} ({name!r}) is not a plain relative path inside {directory} "
            "('..' and empty components are refused)"
        )
    return os.path.join(os.fspath(directory), *parts)


def plain_file_name(directory: str | os.PathLike, name, *, source: str, field: str) -> str:
    """Like `contained_path`, for a name that must be a file directly in `directory` (no sub-directory)."""
    path = contained_path(directory, name, source=source, field=field)
    if "/" in name or "\\" in name:
        raise ValueError(f"{source}: field {field} ({name!r}) must be a file name in {directory}, not a path")
    return path
