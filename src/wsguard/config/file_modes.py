"""Who besides its owner can change a file the configuration trusts.

The rules of sshd's ``StrictModes`` (as Debian's OpenSSH applies them): the file must
belong to the user running wsguard or to root; neither it nor its directory may be
writable by other users, where a group that is the owner's own private group (named after
the owner, with no other members: what ``umask 002`` distributions give every user) is
not other users, and a directory with the sticky bit (``/tmp``) lets nobody replace
another's file.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path


def _private_group(info: os.stat_result) -> bool:
    """Whether the file's group is its owner's private group."""
    try:
        group = grp.getgrgid(info.st_gid)
        owner = pwd.getpwuid(info.st_uid)
    except KeyError:
        return False
    return group.gr_name == owner.pw_name and not group.gr_mem and owner.pw_gid == info.st_gid


def _writable_by_others(info: os.stat_result) -> bool:
    if info.st_mode & stat.S_IWOTH:
        return True
    return bool(info.st_mode & stat.S_IWGRP) and not _private_group(info)


def others_can_change(path: Path, fix: str = "chmod go-w") -> str | None:
    """Why users other than its owner (and root) can change *path* ("other users can
    write it (*fix*)", ...), or None. A path that cannot be examined is left to the check
    that reads it (None)."""
    try:
        info = path.stat()
        directory = path.resolve().parent
        parent = directory.stat()
    except OSError:
        return None
    if info.st_uid not in (0, os.geteuid()):
        return "it belongs to another user (chown it to the user running wsguard, or root)"
    if _writable_by_others(info):
        return f"other users can write it ({fix})"
    if _writable_by_others(parent) and not parent.st_mode & stat.S_ISVTX:
        return f"other users can replace it: its directory {directory} is writable by them"
    return None
