"""Content digests: of JSON values, files, and whole directory trees."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def json_digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TreeDigest:
    sha256: str
    files: int
    bytes: int


def tree_digest(root: Path) -> TreeDigest:
    """Digest of a directory tree: every entry's relative path, type, mode, owner, and the
    content of regular files (or the target of symlinks). Hard links are read once."""
    digest = hashlib.sha256()
    seen_inodes: dict[tuple[int, int], str] = {}
    files = 0
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            header = f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0"
            if stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                content = seen_inodes.get(key)
                if content is None:
                    content = file_digest(Path(path))
                    seen_inodes[key] = content
                    total += st.st_size
                files += 1
                header += content
            elif stat.S_ISLNK(st.st_mode):
                header += os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                header += f"{st.st_rdev}"
            digest.update(header.encode("utf-8", "surrogateescape") + b"\n")
    return TreeDigest(sha256=digest.hexdigest(), files=files, bytes=total)
