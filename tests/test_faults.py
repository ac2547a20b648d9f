"""Fault injection: every system call the walkers and writers make may fail, and must fail cleanly.

The installed hook runs (empty environment, piped state JSON, a real overlay
mount's upperdir) under `strace --inject=SYSCALL:error=ERRNO:when=N`.  Each run
asks for two archives: `a` (the method under test) and `b` (a copy, after it).
N is found, not hard-coded: a first run under `strace -f -y` traces every call,
and N is picked among the calls that touch the upperdir or a's destination
(the first call of each distinct site, the upperdir's and the destination's in
turn, and the last call), so Python's start-up and imports are never hit and
the test keeps working when they change.  Counts are per syscall and per thread (strace counts per
tracee); warnings logged before the archive work (padding annotations, outside
the hook's prefix, whose values are not strings) keep the main thread's Nth `write` away from the error line
when a compressor thread's Nth `write` is the target.

Every faulted run must end with exit 1, exactly one `level=error` line, for
archive a, naming the entry the failed call was about (the archive path where
it was the archive itself), no traceback, archive-to (and its descriptor) as
it was before, no temporary left anywhere (unless the fault hit its removal and
a log line names it), and b written as an unfaulted run writes it.  Exit 0 is accepted only where the archive still comes out equal to
an unfaulted run's (a failed reflink falls back to copying), or, for xattrs the
destination refuses, with a warning; never for fsync/syncfs.

`describe()` (the one-line cause of a log record) is also checked in-process:
it must never raise, whatever filename an OSError carries.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import importlib
import itertools
import json
import os
import posixpath
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from conftest import PREFIX, Overlay, requires_root, state_json, write_bundle
from engines import require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = requires_root

TMP_MARK = ".archive_overlay-tmp-"
RUN_TIMEOUT = 30.0
PADDING_WARNINGS = 16  # main-thread writes before the archive work (see the module's doc)
PADDING = "key=pad-"  # what the padding warnings say
MAX_PICKS = 4  # fault points per (method, scenario, kind)
PARALLEL_RUNS = 2


# --- which calls, with which errors ---------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of call: the syscalls that make it, the errors to inject, the methods making it."""

    name: str
    syscalls: tuple[str, ...]
    errnos: tuple[str, ...]
    methods: tuple[str, ...]
    must_fail: bool = False  # exit 0 is never right (a lost fsync error is silent data loss)
    fallback: bool = False  # copy_file_range fails with EXDEV throughout: sendfile is used


ALL = ("copy", "tar.gz", "oci-layer")
TAR = ("tar", "tar.gz", "oci-layer")  # plain tar copies file data kernel-side, as copy does
COPY = ("copy",)
KERNEL_COPY = ("copy", "tar")
KINDS = [
    Kind("openat", ("openat", "open"), ("EACCES", "EIO", "ENOSPC", "EDQUOT"), ("tar", *ALL)),
    Kind("stat", ("newfstatat", "statx", "fstat", "lstat", "stat"), ("EIO", "EACCES"), ALL),
    Kind("getdents64", ("getdents64",), ("EIO",), ALL),
    Kind("listxattr", ("llistxattr", "listxattr", "flistxattr"), ("EIO", "EACCES"), ALL),
    Kind("getxattr", ("lgetxattr", "getxattr", "fgetxattr"), ("EIO", "EACCES"), ALL),
    Kind("readlink", ("readlinkat", "readlink"), ("EIO", "EACCES"), ALL),
    Kind("lseek", ("lseek",), ("EIO",), ALL),
    Kind("flock", ("flock",), ("ENOLCK",), ALL),
    Kind("read", ("read", "readv", "pread64", "preadv", "preadv2"), ("EIO",), TAR),
    Kind("write", ("write", "writev", "pwrite64", "pwritev"), ("ENOSPC", "EIO", "EDQUOT"), TAR),
    Kind("fsync", ("fsync", "fdatasync"), ("EIO", "ENOSPC"), ("tar", *ALL), must_fail=True),
    Kind("rename", ("renameat2", "renameat", "rename"), ("EIO", "ENOSPC", "EACCES"), ("tar", *ALL)),
    Kind("unlink", ("unlinkat", "unlink", "rmdir"), ("EIO", "EACCES"), ("copy", "oci-layer")),
    Kind("ioctl", ("ioctl",), ("EIO", "ENOSPC"), COPY),
    Kind("copy_file_range", ("copy_file_range",), ("EIO", "ENOSPC", "EDQUOT"), KERNEL_COPY),
    Kind("sendfile", ("sendfile",), ("EIO", "ENOSPC"), KERNEL_COPY, fallback=True),
    Kind("sync_file_range", ("sync_file_range",), ("EIO",), COPY),
    Kind("mkdir", ("mkdirat", "mkdir"), ("ENOSPC", "EDQUOT", "EACCES"), COPY),
    Kind("mknod", ("mknodat", "mknod"), ("ENOSPC", "EDQUOT", "EIO"), COPY),
    Kind("symlink", ("symlinkat", "symlink"), ("ENOSPC", "EIO"), COPY),
    Kind("link", ("linkat", "link"), ("ENOSPC", "EIO"), COPY),
    Kind(
        "setxattr",
        ("fsetxattr", "lsetxattr", "setxattr"),
        ("ENOSPC", "EIO", "EDQUOT", "EACCES"),
        COPY,
    ),
    Kind("removexattr", ("fremovexattr", "lremovexattr", "removexattr"), ("EIO", "EACCES"), COPY),
    Kind("chown", ("fchown", "fchownat", "lchown", "chown"), ("EDQUOT", "EIO"), COPY),
    Kind("chmod", ("fchmod", "fchmodat", "fchmodat2", "chmod"), ("EIO", "EACCES"), COPY),
    Kind("utimensat", ("utimensat",), ("EIO", "EACCES"), COPY),
    Kind("syncfs", ("syncfs",), ("EIO",), COPY, must_fail=True),
]
# Each kind runs with an older archive at archive-to (kept intact on failure); these also run
# with archive-to's directory missing (the hook makes it), where the calls differ.
FRESH_KINDS = ("openat", "mkdir", "rename", "fsync", "stat")


def cases() -> Iterator[tuple[str, str, Kind]]:
    for kind in KINDS:
        for method in ("tar", *ALL):
            if method in kind.methods:
                yield method, "older", kind
            if kind.name in FRESH_KINDS and method in ALL:
                yield method, "fresh", kind


# --- the world: one tmpfs holding an upperdir and every run's directories ---------------------


@dataclass
class World:
    root: Path
    ovl: Overlay

    @property
    def upper(self) -> str:
        return str(self.ovl.upper)

    @property
    def runs(self) -> Path:
        return self.root / "runs"


def tmpfs_takes_user_xattrs(path: Path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        return False
    os.removexattr(path, "user.probe")
    return True


def mount_scratch(root: Path) -> None:
    """A tmpfs on root; where tmpfs refuses user.* xattrs (kernels before 6.6, Debian 12's
    6.1) a fresh ext4 image instead, so the faults run there too."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(root)], check=True)
    if tmpfs_takes_user_xattrs(root):
        return
    subprocess.run(["umount", str(root)], check=True)
    image = root.with_name(root.name + ".ext4")
    subprocess.run(["truncate", "-s", "256M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(root)], check=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    """A tmpfs (fast fsync and syncfs, nothing shared with other tests) and an upperdir
    made through a real overlay mount: a file with an xattr and a hardlink to it, a 2 MiB
    file, a directory with a file and a symlink, a whiteout, an opaque directory and a
    file owned by another user."""
    require(shutil.which("strace") is not None, "strace is not installed")
    root = tmp_path_factory.mktemp("faults")
    mount_scratch(root)
    try:
        ovl = Overlay(root / "ovl")
        for d in (ovl.lower, ovl.upper, ovl.work, ovl.merged, root / "runs"):
            d.mkdir(parents=True)
        (ovl.lower / "gone.wh").write_text("deleted by the container\n")
        (ovl.lower / "opaque.d").mkdir()
        (ovl.lower / "opaque.d" / "old.txt").write_text("hidden by the opaque directory\n")
        ovl.mount()
        try:
            fill(ovl.merged)
        finally:
            ovl.unmount()
        assert os.getxattr(ovl.upper / "opaque.d", "trusted.overlay.opaque") == b"y"
        yield World(root, ovl)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def fill(merged: Path) -> None:
    (merged / "hello.txt").write_text("hello\n")
    os.setxattr(merged / "hello.txt", "user.note", b"kept")
    os.link(merged / "hello.txt", merged / "hard.lnk")
    (merged / "big.bin").write_bytes(os.urandom(2 << 20))
    (merged / "sub").mkdir()
    (merged / "sub" / "file.txt").write_text("in a directory\n")
    os.symlink("../hello.txt", merged / "sub" / "sym.lnk")
    (merged / "owned.txt").write_text("another owner\n")
    os.chown(merged / "owned.txt", 1234, 1234)
    (merged / "gone.wh").unlink()  # a whiteout
    shutil.rmtree(merged / "opaque.d")
    (merged / "opaque.d").mkdir()  # opaque: the lower's content stays hidden
    (merged / "opaque.d" / "new.txt").write_text("new\n")


@dataclass
class Run:
    """One hook run's directory: its bundle, a's and b's destinations."""

    root: Path
    method: str

    @property
    def archive_a(self) -> Path:
        return self.root / "dest-a" / "archive"

    @property
    def archive_b(self) -> Path:
        return self.root / "dest-b" / "archive"


def new_run(world: World, method: str, scenario: str) -> tuple[Run, str]:
    """A fresh run directory (same depth, same name length for every run) and its state."""
    run = Run(Path(tempfile.mkdtemp(prefix="run-", dir=world.runs)), method)
    annotations: dict = {f"pad-{i:02}": i for i in range(PADDING_WARNINGS)}  # each one warning
    for name, method_, archive_to in (("a", method, run.archive_a), ("b", "copy", run.archive_b)):
        annotations[f"{PREFIX}{name}.mount-point"] = "/data"
        annotations[f"{PREFIX}{name}.archive-to"] = str(archive_to)
        annotations[f"{PREFIX}{name}.method"] = method_
    if scenario == "older":
        make_older_archive(run.archive_a, method)
    bundle = write_bundle(run.root / "bundle", [world.ovl.mount_entry("/data")], annotations)
    return run, state_json(bundle)


def make_older_archive(archive_to: Path, method: str) -> None:
    archive_to.parent.mkdir()
    if method == "copy":
        archive_to.mkdir()
        (archive_to / "older.txt").write_text("an older archive\n")
    else:
        archive_to.write_text("an older archive\n")
        if method.startswith("oci-layer"):
            Path(f"{archive_to}.json").write_text('{"older": true}\n')


# --- running the hook under strace ------------------------------------------------------------


@dataclass
class HookRun:
    returncode: int
    log: str
    trace: list[Call]
    timed_out: bool = False


def run_under_strace(
    hook_bin: Path, state: str, trace_log: Path, strace_args: list[str]
) -> HookRun:
    """The installed hook, as an engine runs it, under strace; a hang is killed (its group)."""
    cmd = [shutil.which("strace") or "strace", "-f", "-qq", "-y", "-s", "64", "-o", str(trace_log),
           *strace_args, str(hook_bin)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={},
        cwd="/", start_new_session=True,
    )  # fmt: skip
    timed_out = False
    try:
        out, _ = proc.communicate(state.encode(), timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return HookRun(proc.returncode, out.decode(errors="replace"), parse_trace(trace_log), timed_out)


@dataclass
class Call:
    index: int  # position in the trace
    tracee: int  # 0 for the main thread, then threads in order of appearance
    name: str
    n: int  # this call is the tracee's nth call of `name` (strace's `when=` counts so)
    text: str  # the arguments and result, as strace printed them (-y: fds with their paths)


CALL_LINE = re.compile(r"^(\d+)\s+([a-z_0-9]+)\((.*)$")


def parse_trace(path: Path) -> list[Call]:
    tracees: dict[str, int] = {}
    counts: dict[tuple[int, str], int] = {}
    calls = []
    for line in path.read_text(errors="replace").splitlines():
        m = CALL_LINE.match(line)
        if m is None:  # "<... resumed>", signals, exits
            continue
        tracee = tracees.setdefault(m.group(1), len(tracees))
        key = (tracee, m.group(2))
        counts[key] = counts.get(key, 0) + 1
        calls.append(Call(len(calls), tracee, m.group(2), counts[key], m.group(3)))
    return calls


def touches_a(call: Call, upper: str) -> bool:
    """The call reads the upperdir or writes archive a (xattrs are read by /proc/self/fd/N/)."""
    return upper in call.text or "dest-a" in call.text or "/proc/self/fd/" in call.text


def is_warning_write(call: Call) -> bool:
    """A log line at warning level written to stderr: losing it loses nothing archived."""
    return call.name == "write" and call.text.startswith("2<") and "level=warning" in call.text


# --- the unfaulted reference run of each method and scenario ------------------------------------


@dataclass
class Reference:
    calls: list[Call]
    boundary: int  # index of the first call about archive b: a's work is before it
    a: object  # what archive a holds
    b: object


@pytest.fixture(scope="module")
def references(world: World, hook_bin: Path):
    @cache
    def reference(method: str, scenario: str, fallback: bool) -> Reference:
        run, state = new_run(world, method, scenario)
        args = fallback_args(fallback)
        result = run_under_strace(hook_bin, state, run.root / "trace", args)
        assert result.returncode == 0 and not result.timed_out, result.log
        unexpected = [line for line in result.log.splitlines()
                      if "level=warning" in line and PADDING not in line]  # fmt: skip
        assert not unexpected, result.log
        boundary = next(c.index for c in result.trace if "dest-b" in c.text)
        ref = Reference(result.trace, boundary, content(run.archive_a, method),
                        content(run.archive_b, "copy"))  # fmt: skip
        shutil.rmtree(run.root)
        return ref

    return reference


def fallback_args(fallback: bool) -> list[str]:
    return ["--inject=copy_file_range:error=EXDEV"] if fallback else []


# --- picking fault points --------------------------------------------------------------------


def candidates(ref: Reference, kind: Kind, upper: str) -> list[Call]:
    """a's calls of this kind whose `when=N` hits, in every thread, only a's calls
    (or a warning line on stderr)."""
    by_tracee: dict[tuple[int, str], list[Call]] = {}
    for call in ref.calls:
        by_tracee.setdefault((call.tracee, call.name), []).append(call)

    def harmless(call: Call) -> bool:
        return call.index < ref.boundary and (touches_a(call, upper) or is_warning_write(call))

    found = []
    for call in ref.calls[: ref.boundary]:
        if call.name not in kind.syscalls or not touches_a(call, upper):
            continue
        others = [
            calls[call.n - 1]
            for (tracee, name), calls in by_tracee.items()
            if name == call.name and tracee != call.tracee and len(calls) >= call.n
        ]
        if all(harmless(other) for other in others):
            found.append(call)
    return found


def site(call: Call, upper: str) -> tuple[str, str]:
    """Where a call comes from: the side it works on, and its name and flags."""
    side = "upper" if upper in call.text else "destination"
    shape = re.sub(r'"(?:[^"\\]|\\.)*"|<[^>]*>|\d+', "", call.text.partition(") = ")[0])
    return side, f"{call.name} {shape}"


def pick(found: list[Call], upper: str) -> list[Call]:
    """The first call of each distinct site, the upperdir's and the destination's in turn,
    then the last call: at most MAX_PICKS."""
    firsts: dict[tuple[str, str], Call] = {}
    for call in found:
        firsts.setdefault(site(call, upper), call)
    sides = [[c for (side, _), c in firsts.items() if side == s] for s in ("upper", "destination")]
    turns = [c for pair in itertools.zip_longest(*sides) for c in pair if c is not None]
    picks = sorted(turns[: MAX_PICKS - 1], key=lambda c: c.index)
    if found and found[-1] not in picks:
        picks.append(found[-1])
    return picks


# --- what the archives hold ------------------------------------------------------------------


def content(path: Path, method: str) -> object:
    """A copy: every entry's metadata and data; a tar: its uncompressed bytes' digest
    (the hook writes the same tar for the same upperdir); a layer: also its descriptor."""
    if method == "copy":
        return tree(path)
    if not path.is_file() or path.is_symlink():
        return ("not a file", tree(path))
    data = path.read_bytes()
    if method == "tar":
        return hashlib.sha256(data).hexdigest()
    try:
        tar_digest = hashlib.sha256(gzip.decompress(data)).hexdigest()
    except (OSError, EOFError) as exc:
        return ("not a gzip stream", str(exc))
    if not method.startswith("oci-layer"):
        return tar_digest
    descriptor = json.loads(Path(f"{path}.json").read_text())
    consistent = descriptor.get("digest") == "sha256:" + hashlib.sha256(data).hexdigest() and (
        descriptor.get("size") == len(data)
    )
    return tar_digest, descriptor.get("diff_id"), descriptor.get("mediaType"), consistent


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root, never following a symlink; {} when root is absent."""
    if not os.path.lexists(root):
        return {}
    entries = {".": entry(root)}
    if stat.S_ISDIR(os.lstat(root).st_mode):
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                entries[str(path.relative_to(root))] = entry(path)
    return entries


def entry(path: Path) -> tuple:
    st = os.lstat(path)
    data: object = None
    if stat.S_ISREG(st.st_mode):
        data = hashlib.sha256(path.read_bytes()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        data = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        data = st.st_rdev
    xattrs = sorted(
        (n, os.getxattr(path, n, follow_symlinks=False))
        for n in os.listxattr(path, follow_symlinks=False)
    )
    nlink = 0 if stat.S_ISDIR(st.st_mode) else st.st_nlink
    return (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, nlink, data, tuple(xattrs))


def without_xattrs(contents: object) -> object:
    if isinstance(contents, dict):
        return {k: v[:-1] for k, v in contents.items()}
    return contents


def as_it_was(run: Run) -> dict:
    """archive-to and its descriptor, as they are (absent: {})."""
    return {"archive": tree(run.archive_a), "descriptor": tree(Path(f"{run.archive_a}.json"))}


def changes(before: dict, after: dict) -> str:
    """What became of archive-to and its descriptor, in words."""
    words = []
    for what, old in before.items():
        new = after[what]
        if old != new:
            change = "replaced" if old and new else "removed" if old else "created"
            words.append(f"{what} {change}")
    return ", ".join(words)


def temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if TMP_MARK in p.name]


# --- what a fault must end with ---------------------------------------------------------------


FD_PATH = re.compile(r"\d+<([^>]*)>")
STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
AT_PAIR = re.compile(r'\d+<([^>]*)>, "((?:[^"\\]|\\.)*)"')
PROC_FD = re.compile(r"^/proc/self/fd/\d+(?:/(.*))?$")


def named_entries(call: Call, upper: str) -> set[str]:
    """The upperdir entries the call was about, as relative paths ("" for the upperdir
    itself); calls about the archive itself (its directory, temporary, descriptor) name none."""
    paths = FD_PATH.findall(call.text)
    paths += [s for s in STRING.findall(call.text) if s.startswith("/")]
    if call.name.endswith(("at", "at2")):  # *at(): a directory fd and a name
        paths += [f"{d}/{name}" for d, name in AT_PAIR.findall(call.text) if name[:1] != "/"]
    names = set()
    for path in paths:
        path = posixpath.normpath(path)
        if path == upper or path.startswith(upper + "/"):
            names.add(path[len(upper) + 1 :])
            continue
        m = PROC_FD.match(path)
        rest = m.group(1) if m else path.partition(TMP_MARK)[2].partition("/")[2]
        if (m or TMP_MARK in path) and rest and rest != ".":
            names.add(rest)  # an entry of the copy being written
    return names


def injected(result: HookRun, syscall: str) -> list[Call]:
    return [c for c in result.trace if c.name == syscall and c.text.endswith("(INJECTED)")]


def check_fault(world: World, hook_bin: Path, ref: Reference, method: str, scenario: str,
                kind: Kind, target: Call, error: str) -> list[str]:  # fmt: skip
    """Run with one fault; the problems found (none when the run ended as it must)."""
    run, state = new_run(world, method, scenario)
    before = as_it_was(run)
    traced = target.name + (",copy_file_range" if kind.fallback else "")
    args = [
        "--seccomp-bpf",
        "-e",
        f"trace={traced}",  # an injected call must be traced
        f"--inject={target.name}:error={error}:when={target.n}",
        *fallback_args(kind.fallback),
    ]
    result = run_under_strace(hook_bin, state, run.root / "trace", args)
    shown = target.text.replace(str(world.root), "$T")
    what = f"{method} ({scenario}): {target.name} -> {error} at call {target.n}: {shown}"
    problems = outcome_problems(world, ref, run, kind, target, result, before)
    shutil.rmtree(run.root)
    notes = [line for line in result.log.splitlines() if "level=error" in line or (
        "level=warning" in line and PADDING not in line)]  # fmt: skip
    if not problems:
        print(f"ok   exit {result.returncode} {what}", *notes, sep="\n  ")  # pytest -rA shows it
        return []
    report = f"FAIL {what}\n  " + "\n  ".join(problems + [f"exit {result.returncode}"] + notes)
    print(report)
    log = [line for line in result.log.splitlines() if PADDING not in line]
    return [report + "\n  log:\n" + "\n".join(log)]


def outcome_problems(world: World, ref: Reference, run: Run, kind: Kind, target: Call,
                     result: HookRun, before: dict) -> list[str]:  # fmt: skip
    upper = world.upper
    problems = []
    if result.timed_out:
        return [f"still running after {RUN_TIMEOUT} s: killed"]
    hits = injected(result, target.name)
    if not hits:
        problems.append("no call was failed (the run differs from the reference run)")
    stray = [c.text for c in hits if not (touches_a(c, upper) or is_warning_write(c))]
    if stray:
        problems.append(f"the fault also hit calls outside archive a: {stray}")
    if "Traceback" in result.log:
        problems.append("a traceback")
    if result.returncode not in (0, 1):
        problems.append(f"exit status {result.returncode}")
    errors = [line for line in result.log.splitlines() if "level=error" in line]
    warned = [line for line in result.log.splitlines() if warning(line)]
    told = [line for line in result.log.splitlines() if "level=error" in line or warning(line)]
    unsaid = [t for t in temporaries(run.root) if not any(Path(t).name in x for x in told)]
    if unsaid:  # one that cannot be removed (the fault hit its removal) must be named
        problems.append(f"temporaries left, named by no warning or error: {unsaid}")
    if content(run.archive_b, "copy") != ref.b:
        problems.append("archive b is not as an unfaulted run writes it")
    for line in errors + warned:
        if "/proc/self/fd/" in line:
            problems.append(f"a /proc/self/fd/ path instead of a real one: {line}")
    if result.returncode == 0:
        if errors:
            problems.append(f"exit 0 with error lines: {errors}")
        if kind.must_fail:
            problems.append(f"exit 0: a failed {kind.name} must fail the archive")
        got = content(run.archive_a, run.method)
        if got == ref.a:
            return problems
        if not warned or without_xattrs(got) != without_xattrs(ref.a):
            problems.append("exit 0, but archive a differs from an unfaulted run's (silent loss)")
        elif hits:  # xattrs left out, with a warning: it names the entry
            problems += naming_problems(warned[0], hits[0], upper)
        return problems
    if len(errors) != 1 or " archive=a " not in errors[0] + " ":
        problems.append(f"not exactly one error line, for archive a: {errors}")
    elif hits:
        problems += naming_problems(errors[0], hits[0], upper)
    after = as_it_was(run)
    if after != before:
        problems.append("archive-to not as it was: " + changes(before, after))
    return problems


def warning(line: str) -> bool:
    """A warning about archive a."""
    return "level=warning" in line and " archive=a " in line + " "


def naming_problems(line: str, hit: Call, upper: str) -> list[str]:
    """The line names the entry the failed call was about (archive_to= names the archive)."""
    cause = re.sub(r'archive_to=("[^"]*"|\S+)', "", line.partition(" level=")[2])
    names = named_entries(hit, upper)
    if not names:
        return []  # about the archive itself: archive_to= names it
    if any(name in cause if name else upper in cause for name in names):
        return []
    shown = sorted(n or upper for n in names)
    return [f"the error names none of {shown}: {cause}"]


@pytest.mark.parametrize(
    "method, scenario, kind",
    list(cases()),
    ids=[f"{m}-{s}-{k.name}" for m, s, k in cases()],
)
def test_fault(world, hook_bin, references, method, scenario, kind):
    ref = references(method, scenario, kind.fallback)
    found = candidates(ref, kind, world.upper)
    assert found, f"{method} ({scenario}) makes no {kind.name} call for archive a: update KINDS"
    targets = pick(found, world.upper)
    errors = [kind.errnos[i % len(kind.errnos)] for i in range(len(targets))]
    with ThreadPoolExecutor(PARALLEL_RUNS) as pool:  # each run has its own directory
        reports = pool.map(
            lambda target, error: check_fault(
                world, hook_bin, ref, method, scenario, kind, target, error
            ),
            targets,
            errors,
        )
    problems = [problem for report in reports for problem in report]
    assert not problems, "\n\n".join(problems)


# --- describe(): never raises, whatever an OSError carries --------------------------------------


@pytest.fixture(scope="module")
def describe(hook_bin):
    """archive_overlay.describe, imported from the venv the hook is installed in."""
    return importlib.import_module("archive_overlay").describe


def real_errors() -> list[OSError]:
    """OSErrors as the os module raises them: fd, bytes, str, None and two filenames."""
    made = []
    for call in (
        lambda: os.stat(987654),  # filename: an int (an fd)
        lambda: os.setxattr(987654, "user.x", b"v"),
        lambda: os.lstat(b"/nonexistent/\xff\xfe"),  # bytes, not UTF-8
        lambda: os.lstat("/nonexistent/\udcff"),  # str with a surrogate escape
        lambda: os.close(987654),  # no filename
        lambda: os.rename(b"/nonexistent/a\xff", b"/nonexistent/b\xfe"),  # filename2
        lambda: os.link("/nonexistent/a", "/nonexistent/b"),
    ):
        try:
            call()
        except OSError as exc:
            made.append(exc)
    return made


def test_describe_real_errors(describe):
    for exc in real_errors():
        text = describe(exc)
        assert isinstance(text, str) and exc.strerror in text, (exc, text)
        for name in (exc.filename, exc.filename2):
            if isinstance(name, (str, bytes)):
                assert os.fsdecode(name) in text, (exc, text)


FILENAMES = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.binary(max_size=40),
    st.text(max_size=40),
    st.binary(max_size=40).map(os.fsdecode),  # surrogate escapes
    st.builds(Path, st.text(min_size=1, max_size=20)),
)


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    code=st.sampled_from(sorted(errno.errorcode)),
    filename=FILENAMES,
    filename2=FILENAMES,
    with_strerror=st.booleans(),
)
def test_describe_never_raises(describe, code, filename, filename2, with_strerror):
    if with_strerror:
        exc = OSError(code, os.strerror(code), filename, None, filename2)
    else:
        exc = OSError(code)
        exc.filename = filename
    text = describe(exc)
    assert isinstance(text, str) and text
