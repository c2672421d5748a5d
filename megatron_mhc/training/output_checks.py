"""The directories a launch writes into, checked before anything is set up or written.

Megatron creates `--save` only at the first checkpoint and `--tensorboard-dir` when it sets up
its writer; a path it cannot create (under a file, on a read-only file system, without
permission) then fails with a traceback after setup, or after hours of training at the first
save. `check_output_directories` finds the same problem at launch without creating anything:
for each directory, it or its nearest existing ancestor must be a directory this process may
write into.
"""

import os
from argparse import Namespace
from pathlib import Path

OUTPUT_DIRECTORY_FLAGS = ("save", "tensorboard_dir")


def check_output_directories(args: Namespace) -> None:
    """ValueError naming the flag, the path and the obstacle, for the first directory of
    OUTPUT_DIRECTORY_FLAGS this launch could not create or write into."""
    for name in OUTPUT_DIRECTORY_FLAGS:
        path = getattr(args, name)
        if path is not None:
            _check_writable_directory(f"--{name.replace('_', '-')}", path)


def _check_writable_directory(flag: str, path: str) -> None:
    target = Path(path).absolute()
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"{flag} {path}: is a file, expected a directory (or a new path)")
        if not os.access(target, os.W_OK | os.X_OK):
            raise ValueError(
                f"{flag} {path}: the directory is not writable by this process (permissions or "
                "a read-only file system)"
            )
        return
    # Path.exists is False for a path under a file, so the first existing ancestor is the
    # obstacle or the place where the directory will be created.
    ancestor = next(parent for parent in target.parents if parent.exists())
    if not ancestor.is_dir():
        raise ValueError(
            f"{flag} {path}: cannot be created, {ancestor} is a file, not a directory; give a "
            "path in a writable directory"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag} {path}: cannot be created, {ancestor} is not writable by this process "
            "(permissions or a read-only file system)"
        )
