"""One strict comparison of trees, for every test that says two trees are equal.

A tree is described entry by entry, by path relative to its root ("." for the root):
type, mode (setuid, setgid, sticky included), owner, mtime to the nanosecond, size and
content (a digest), symlink target, device numbers, every xattr (POSIX ACLs included),
and apart from the entries, the hardlink groups (paths that are one inode). Directory
order plays no part (tmpfs lists a directory newest first).

What a format or a reader cannot keep is said by name, with a narrow exemption
(`but=`: those below, or a test's own), never by leaving fields out of the
comparison.

Directories are walked relative to directory file descriptors, so that trees deeper
than PATH_MAX are read too; a tar archive is read with Python's tarfile (not ours).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
         stat.S_IFSOCK: "socket"}  # fmt: skip
BLOCK = 4096


class Tree:
    """entries: {relative path: description}; links: the hardlink groups, as sets of paths
    (whiteouts aside: the kernel makes all of an overlay's whiteouts one inode)."""

    def __init__(self, entries: dict[str, dict], links: Iterable[Iterable[str]] = ()) -> None:
        self.entries = entries
        self.links = frozenset(frozenset(group) for group in links)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tree) and (self.entries, self.links) == (other.entries,
                                                                          other.links)  # fmt: skip

    def __repr__(self) -> str:
        return f"Tree({len(self.entries)} entries, {len(self.links)} hardlink groups)"

    def __getitem__(self, rel: str) -> dict:
        return self.entries[rel]

    def __contains__(self, rel: str) -> bool:
        return rel in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def without(self, leave_out: Callable[[str], bool]) -> Tree:
        """The tree less the paths leave_out names (their hardlink group keeps the others)."""
        entries = {rel: info for rel, info in self.entries.items() if not leave_out(rel)}
        groups = [{rel for rel in group if not leave_out(rel)} for group in self.links]
        return Tree(entries, [g for g in groups if len(g) > 1])


# --- describing what is on disk ----------------------------------------------------------------


class Digest:
    """sha256 over (offset, block) of the non-zero 4 KiB blocks, and the size: equal digests,
    equal content, whether its zeros are holes or data."""

    def __init__(self, size: int) -> None:
        self.hash = hashlib.sha256(b"%d;" % size)

    def update(self, offset: int, data: bytes) -> None:
        for pos in range(0, len(data), BLOCK):
            block = data[pos : pos + BLOCK]
            if block.strip(b"\0"):
                self.hash.update(b"%d:" % (offset + pos) + block)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


def content_digest(fd: int, size: int) -> str:
    """The Digest of a file, reading only its data segments (a 2 GiB sparse file costs its
    data)."""
    digest = Digest(size)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        start -= start % BLOCK
        for pos in range(start, end, 1 << 20):
            digest.update(pos, os.pread(fd, min(1 << 20, end - pos), pos))
        offset = end
    return digest.hexdigest()


def read_xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        names = []
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def describe_at(dir_fd: int, name: str) -> tuple[dict, os.stat_result]:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    kind = stat.S_IFMT(st.st_mode)
    info: dict = {"type": TYPES[kind], "mode": oct(stat.S_IMODE(st.st_mode)),
                  "owner": (st.st_uid, st.st_gid), "mtime_ns": st.st_mtime_ns}  # fmt: skip
    if kind == stat.S_IFREG:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            info["size"], info["content"] = st.st_size, content_digest(fd, st.st_size)
        finally:
            os.close(fd)
    elif kind == stat.S_IFLNK:
        info["target"] = os.readlink(name, dir_fd=dir_fd)
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    info["xattrs"] = read_xattrs(f"/proc/self/fd/{dir_fd}/{name}")  # short, whatever the depth
    return info, st


def is_linked(st: os.stat_result) -> bool:
    """One of several names of an inode, whiteouts (char 0/0) aside."""
    whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    return st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and not whiteout


def snapshot(root: Path) -> Tree:
    """Every entry under root (root itself as "."), never following a symlink; an absent
    root is the empty tree."""
    if not os.path.lexists(root):
        return Tree({})
    entries: dict[str, dict] = {}
    inodes: dict[tuple[int, int], set[str]] = {}

    def add(dir_fd: int, name: str, rel: str) -> bool:
        entries[rel], st = describe_at(dir_fd, name)
        if is_linked(st):
            inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
        return stat.S_ISDIR(st.st_mode)

    parent = os.open(root.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not add(parent, root.name, "."):
            return Tree(entries)
        stack = [(os.open(root.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                          dir_fd=parent), "")]  # fmt: skip
    finally:
        os.close(parent)
    while stack:
        fd, prefix = stack.pop()
        try:
            for name in sorted(os.listdir(fd)):
                if add(fd, name, prefix + name):
                    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                    stack.append((child, prefix + name + "/"))
        finally:
            os.close(fd)
    return Tree(entries, [g for g in inodes.values() if len(g) > 1])


# --- describing what a tar archive holds ---------------------------------------------------------


TAR_TYPES = {tarfile.REGTYPE: "file", tarfile.SYMTYPE: "symlink", tarfile.DIRTYPE: "dir",
             tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}  # fmt: skip


def pax_mtime_ns(member: tarfile.TarInfo) -> int:
    """A member's mtime to the nanosecond: its PAX record, else the header's seconds."""
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * 10**9
    negative = text.startswith("-")
    seconds, _, fraction = text.lstrip("-").partition(".")
    ns = int(seconds) * 10**9 + int((fraction + "0" * 9)[:9])
    return -ns if negative else ns


def pax_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    """SCHILY.xattr records, names unescaped as GNU tar does ("%3D" is "=", "%25" is "%")."""
    found = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :].replace("%3D", "=").replace("%25", "%")
            found[name] = value.encode("utf-8", "surrogateescape")
    return dict(sorted(found.items()))


def describe_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict:
    info: dict = {"type": TAR_TYPES[member.type], "mode": oct(member.mode),
                  "owner": (member.uid, member.gid), "mtime_ns": pax_mtime_ns(member)}  # fmt: skip
    if member.isreg():
        data = tar.extractfile(member)
        assert data is not None
        digest, offset = Digest(member.size), 0
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(offset, block)
            offset += len(block)
        info["size"], info["content"] = member.size, digest.hexdigest()
    elif member.issym():
        info["target"] = member.linkname
    elif member.ischr() or member.isblk():
        info["rdev"] = (member.devmajor, member.devminor)
    info["xattrs"] = pax_xattrs(member)
    return info


def tar_snapshot(archive: Path) -> Tree:
    """What a tar archive (any compression tarfile reads) holds, described as snapshot
    describes a directory: a hardlink member by the member it links to."""
    entries: dict[str, dict] = {}
    groups: dict[str, set[str]] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            assert member.name == "." or member.name.startswith("./"), member.name
            rel = os.path.normpath(member.name)
            if member.islnk():
                first = os.path.normpath(member.linkname)
                entries[rel] = entries[first]
                groups.setdefault(first, {first}).add(rel)
            else:
                entries[rel] = describe_member(tar, member)
    return Tree(entries, groups.values())


# --- comparing ----------------------------------------------------------------------------------

# An exemption is a function (path, description) -> description (None: no such entry), applied
# to both sides, its name shown with any difference. Add one only where a format or a reader
# cannot keep a field.
Exemption = Callable[[str, dict], "dict | None"]


def root_mtime(rel: str, info: dict) -> dict:
    """bsdtar 3.6 leaves the mtime of the directory it extracts into (the member "./") alone,
    where GNU tar sets it."""
    return _without(info, "mtime_ns") if rel == "." else info


def dir_mtimes(rel: str, info: dict) -> dict:
    """Directories where temporaries came and went: their own mtimes changed (which entries
    they hold is compared all the same)."""
    return _without(info, "mtime_ns") if info["type"] == "dir" else info


def sockets(rel: str, info: dict) -> dict | None:
    """tar has no member type for a socket: the hook leaves sockets out, with a warning."""
    return None if info["type"] == "socket" else info


def _without(info: dict, *keys: str) -> dict:
    return {k: v for k, v in info.items() if k not in keys}


def seen_through(tree: Tree, but: tuple[Exemption, ...]) -> Tree:
    """The tree as the exemptions leave it."""
    entries = {}
    for rel, info in tree.entries.items():
        kept: dict | None = info
        for exemption in but:
            if kept is not None:
                kept = exemption(rel, kept)
        if kept is not None:
            entries[rel] = kept
    return Tree(entries, tree.links).without(lambda rel: rel not in entries)


def field_differences(want: dict, have: dict) -> str:
    """The fields that differ, xattrs by name."""
    shown = []
    for key in sorted(want.keys() | have.keys()):
        a, b = want.get(key), have.get(key)
        if a == b:
            continue
        if key == "xattrs" and a is not None and b is not None:
            names = sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))
            shown += [f"xattr {n} {a.get(n)!r:.80} != {b.get(n)!r:.80}" for n in names]
        else:
            shown.append(f"{key} {a!r:.200} != {b!r:.200}")
    return ", ".join(shown)


def differences(expected: Tree, got: Tree, but: tuple[Exemption, ...] = ()) -> list[str]:
    want, have = seen_through(expected, but), seen_through(got, but)
    problems = []
    for rel in sorted(want.entries.keys() | have.entries.keys()):
        a, b = want.entries.get(rel), have.entries.get(rel)
        if a is None or b is None:
            problems.append(f"{rel[-120:]}: expected {a}, got {b}")
        elif a != b:
            problems.append(f"{rel[-120:]}: {field_differences(a, b)}")
    for group in sorted(want.links ^ have.links, key=sorted):
        side = "expected only" if group in want.links else "got only"
        problems.append(f"hardlink group {sorted(group)}: {side}")
    return problems


def assert_same_tree(expected: Tree, got: Tree, what: str, diag: str = "",
                     but: tuple[Exemption, ...] = ()) -> None:  # fmt: skip
    """got equals expected, entry by entry and hardlink group by group, but for the named
    exemptions."""
    problems = differences(expected, got, but)
    excepted = f" (but for {', '.join(e.__name__ for e in but)})" if but else ""
    assert not problems, f"{what} differs{excepted}:\n" + "\n".join(problems[:40]) + diag
