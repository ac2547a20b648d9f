"""archive_overlay: an OCI poststop hook that archives overlay upperdirs.

When a container stops, the runtime (runc, crun) or the engine (podman) runs
this hook with the container's OCI state JSON on stdin.  The hook reads the
bundle's config.json, finds the overlay mounts named by annotations
``com.launchplatform.oci-hooks.archive-overlay.<NAME>.<arg>``, and archives
each mount's upperdir (the container's changes) to a path on the host, as a
directory copy or a tar stream.

The module reads top to bottom: start-up (load only what a run uses), inputs
(state, config, annotations), finding upperdirs, walking an upperdir, the
destination (safe and atomic), the writers, then the command.
"""

from __future__ import annotations

import gc

GC_WAS_ENABLED = gc.isenabled()
gc.disable()  # until the imports are done (see Start-up below)

import contextlib
import errno
import fcntl
import grp
import importlib.machinery
import importlib.util
import json
import os
import posixpath
import pwd
import signal
import stat
import struct
import sys
import threading
import time
import types
import zlib
from collections.abc import Iterable, Iterator
from functools import cache
from typing import BinaryIO, Callable, NoReturn

# ---------------------------------------------------------------------------
# Start-up.  Every container stop waits for this process, so a run loads only
# what it uses: a module that click, structlog or this hook imports but a run
# may never call gets a stand-in in sys.modules, and its code runs when one of
# its names is first used.  tests/test_startup.py checks what a run loads.
# What the imports make lives until exit, so the garbage collector is paused
# while they run (it would find no cycles) and, in the hook's own process,
# told to leave those objects alone for good.
# ---------------------------------------------------------------------------

DEFERRED_LOCK = threading.RLock()


class DeferredModule(types.ModuleType):
    """A module not run yet: the first name asked of it that it lacks runs it, in place.

    A package's __path__ is among those names, so importing one of its submodules runs it.
    """

    def __getattr__(self, name: str) -> object:
        with DEFERRED_LOCK:
            if type(self) is DeferredModule:  # another thread may have run it meanwhile
                self.__class__ = types.ModuleType
                if self.__spec__.submodule_search_locations is not None:
                    self.__path__ = self.__spec__.submodule_search_locations
                try:
                    self.__spec__.loader.exec_module(self)
                except BaseException:
                    sys.modules.pop(self.__name__, None)  # as a failed import leaves it
                    raise
        return getattr(self, name)


def defer_imports(*names: str) -> None:
    """Stand-ins for these modules, unless imported already or not installed."""
    for name in names:
        spec = None if name in sys.modules else spec_without_running(name)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            continue  # a plain import will load it, or tell what is wrong
        module = importlib.util.module_from_spec(spec)
        module.__dict__.pop("__path__", None)  # set again when it runs
        module.__class__ = DeferredModule
        sys.modules[name] = module


def spec_without_running(name: str) -> importlib.machinery.ModuleSpec | None:
    """Where a module is, found without running its package's __init__."""
    parent, _, _ = name.rpartition(".")
    if not parent:
        return importlib.util.find_spec(name)
    package = importlib.util.find_spec(parent)
    if package is None or not package.submodule_search_locations:
        return None
    return importlib.machinery.PathFinder.find_spec(name, package.submodule_search_locations)


def started_as_the_hook() -> bool:
    """Whether this process is the hook (its console script, or this file run as one),
    not a program that imports it."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return os.path.basename(main_file) in ("archive_overlay", "archive_overlay.py")


defer_imports(
    "asyncio",  # structlog's async log methods: the hook logs synchronously
    "copy",  # structlog's and dataclasses' copying of loggers and instances: not done here
    "linecache",  # traceback's and inspect's, for source lines: the hook logs one line
    "logging",  # structlog's bridge to stdlib logging: not used
    "textwrap",  # traceback's, for printing tracebacks: the hook logs one line instead
    "tokenize",  # linecache's and inspect's, for reading source files: not done here
    "structlog.stdlib",  # imported by structlog's package, used by nobody here
    "structlog.threadlocal",  # deprecated, imported by structlog's package
    "ctypes",  # glibc calls: only when an archive is committed
    "hashlib",  # oci-layer digests only
    "shutil",  # removing an old directory archive only
)

# After defer_imports, which must run first:
import ctypes
import hashlib
import shutil
from dataclasses import dataclass

import click
import structlog

if GC_WAS_ENABLED:
    if started_as_the_hook():
        gc.freeze()  # what start-up made lives until exit: never look for cycles in it
    gc.enable()

__version__ = "3.0.0"

ANNOTATION_PREFIX = "com.launchplatform.oci-hooks.archive-overlay."
ARGS = ("mount-point", "archive-to", "success", "method", "tar-content-owner", "compression-level")
DEFAULT_MOUNT_PROGRAM = "/usr/bin/fuse-overlayfs"

EXIT_OK, EXIT_ARCHIVE_FAILED, EXIT_BAD_INPUT = 0, 1, 2

log = structlog.get_logger()


class InputError(Exception):
    """The hook's input is unusable: exit status 2."""


class ArchiveError(Exception):
    """One archive cannot be written: it fails, the others go on."""


class Terminated(BaseException):
    """SIGTERM arrived (a runtime's hook timeout): stop, clean up, exit."""


# ---------------------------------------------------------------------------
# Logging: structlog, one logfmt line per event, to stderr and optionally a
# log file and syslog.  The Go hook's level names are accepted.
# ---------------------------------------------------------------------------

LOG_LEVELS = {
    "trace": 5,
    "debug": 10,
    "info": 20,
    "warn": 30,
    "warning": 30,
    "error": 40,
    "fatal": 50,
    "panic": 50,
}
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


class LogSink:
    """structlog's logger: writes each rendered line to every destination."""

    def __init__(self, files: list, use_syslog: bool) -> None:
        self.files = files
        self.syslog = None
        if use_syslog:
            import syslog  # imported only where asked for

            syslog.openlog("archive_overlay", syslog.LOG_PID, syslog.LOG_DAEMON)
            self.syslog = syslog

    def _write(self, method: str, line: str) -> None:
        for f in self.files:
            with contextlib.suppress(OSError, ValueError):
                f.write(line + "\n")
                f.flush()
        if self.syslog is not None:
            self.syslog.syslog(SYSLOG_PRIORITY.get(method, 6), line)

    def __getattr__(self, method: str) -> Callable[[str], None]:
        return lambda line: self._write(method, line)


def configure_logging(level: str, use_syslog: bool, log_file: str | None) -> None:
    files: list = [sys.stderr]
    problems = []
    if log_file:
        try:
            # Open for the whole run; line-buffered writes, flushed per record.
            log_to = open(log_file, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
            files.append(log_to)
        except OSError as exc:
            problems.append(("cannot open log file", {"path": log_file, "error": describe(exc)}))
    if use_syslog and not is_socket("/dev/log"):
        problems.append(("no syslog socket at /dev/log: logging to stderr only", {}))
        use_syslog = False
    sink = LogSink(files, use_syslog)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            one_line_values,
            structlog.processors.LogfmtRenderer(
                key_order=["timestamp", "level", "event"], drop_missing=True
            ),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(max(LOG_LEVELS[level], 10)),
        logger_factory=lambda *args: sink,
        cache_logger_on_first_use=False,
    )
    for event, fields in problems:
        log.warning(event, **fields)


def one_line_values(logger: object, method: str, event_dict: dict) -> dict:
    """Names from a container may hold newlines, NULs or bytes that are not UTF-8:
    escape them, so that each record stays one readable line."""
    for key, value in event_dict.items():
        if isinstance(value, str) and not value.isprintable():
            event_dict[key] = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
    return event_dict


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def describe(exc: BaseException) -> str:
    """A one-line cause for a log record, without a traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {os.fsdecode(exc.filename)}" if exc.filename is not None else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------
# Inputs: the state JSON, the bundle's config.json, and the annotations.
# ---------------------------------------------------------------------------


def load_json_object(data: bytes, what: str) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise InputError(f"{what} is not a JSON object")
    return value


def read_state(data: bytes) -> dict:
    if not data.strip():
        raise InputError("no OCI state JSON on stdin")
    state = load_json_object(data, "the OCI state on stdin")
    bundle = state.get("bundle")
    if not isinstance(bundle, str) or not bundle:
        raise InputError("the OCI state has no bundle path")
    return state


def read_config(bundle: str) -> dict:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the bundle's config.json {path}: {describe(exc)}") from None
    return load_json_object(data, f"config.json {path}")


def string_map(value: object, where: str) -> dict[str, str]:
    """The string entries of an annotations map; anything else is warned about."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        log.warning("annotations are not a JSON object: ignored", where=where)
        return {}
    good = {k: v for k, v in value.items() if isinstance(v, str)}
    for key in value.keys() - good.keys():
        log.warning("annotation value is not a string: ignored", where=where, key=key)
    return good


def merged_annotations(state: dict, config: dict) -> dict[str, str]:
    # runtime-spec says the state carries the config's annotations; podman and
    # runc do, a hand-written state may not.  The state's win on conflict.
    annotations = string_map(config.get("annotations"), "config.json")
    annotations.update(string_map(state.get("annotations"), "state"))
    return annotations


ARCHIVE_METHODS = ("copy", "tar", "tar.gz", "tar.zst", "oci-layer", "oci-layer+zstd")
COMPRESSION_LEVELS = {"gzip": range(4), "zstd": range(1, 23)}


class Archive:
    """One archive asked for by annotations (a plain class: a dataclass costs start-up)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mount_point = ""
        self.archive_to = ""
        self.success = ""
        self.method = "copy"
        self.owner: tuple[int, int] | None = None
        self.compression_level: int | None = None

    @property
    def compressor(self) -> str | None:
        if self.method in ("tar.gz", "oci-layer"):
            return "gzip"
        if self.method in ("tar.zst", "oci-layer+zstd"):
            return "zstd"
        return None


MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to chown


def parse_owner(value: str) -> tuple[int, int] | None:
    """`UID` or `UID:GID`, decimal integers only; a bare UID means gid 0."""
    parts = value.split(":")
    if len(parts) > 2 or not all(p.isascii() and p.isdigit() and len(p) <= 10 for p in parts):
        return None
    ids = [int(p) for p in parts] + [0]
    if max(ids) > MAX_ID:
        return None
    return ids[0], ids[1]


def apply_arg(archive: Archive, arg: str, value: str) -> None:
    if arg == "mount-point":
        archive.mount_point = value
    elif arg == "archive-to":
        archive.archive_to = value
    elif arg == "success":
        archive.success = value
    elif arg == "method":
        archive.method = value
    elif arg == "tar-content-owner":
        archive.owner = parse_owner(value)
        if archive.owner is None:
            log.warning("invalid tar-content-owner ignored", archive=archive.name, value=value)
    elif arg == "compression-level":
        try:
            archive.compression_level = int(value)
        except ValueError:
            log.warning("invalid compression-level ignored", archive=archive.name, value=value)


def parse_archives(annotations: dict[str, str]) -> list[Archive]:
    archives: dict[str, Archive] = {}
    for key in sorted(annotations):
        if not key.startswith(ANNOTATION_PREFIX):
            continue
        value = annotations[key]
        name, dot, arg = key[len(ANNOTATION_PREFIX) :].partition(".")
        if not dot or not name or "." in arg:
            log.warning("annotation is not <prefix><NAME>.<arg>: ignored", key=key)
            continue
        if arg not in ARGS:
            log.warning("unknown archive argument ignored", archive=name, arg=arg)
            continue
        apply_arg(archives.setdefault(name, Archive(name)), arg, value)
    return [a for a in archives.values() if is_complete(a)]


def is_complete(archive: Archive) -> bool:
    if not archive.mount_point or not archive.archive_to:
        missing = "mount-point" if not archive.mount_point else "archive-to"
        log.warning("archive skipped: no " + missing, archive=archive.name)
        return False
    if archive.method not in ARCHIVE_METHODS:
        log.warning(
            "archive skipped: unknown method",
            archive=archive.name,
            method=archive.method,
            known=",".join(ARCHIVE_METHODS),
        )
        return False
    level, compressor = archive.compression_level, archive.compressor
    if level is not None and (compressor is None or level not in COMPRESSION_LEVELS[compressor]):
        log.warning(
            "compression-level out of range for the method: default used",
            archive=archive.name,
            method=archive.method,
            value=level,
        )
        archive.compression_level = None
    return True


# ---------------------------------------------------------------------------
# Finding the upperdir of a mount.
# ---------------------------------------------------------------------------


ESCAPED = "overlay."


class Upper:
    """An upperdir and the xattr namespaces its overlay keeps markers in."""

    def __init__(self, path: str, marker_prefixes: tuple[str, ...]) -> None:
        self.path = path
        self.marker_prefixes = marker_prefixes  # e.g. ("trusted.overlay.",)

    def marker(self, xattr: str) -> str | None:
        """The overlay marker an xattr is ("opaque", "redirect", ...), None for user data.

        Since Linux 6.7 an overlay xattr set by the container itself is stored
        escaped, as <prefix>overlay.<name>: that is user data, not a marker.
        """
        for prefix in self.marker_prefixes:
            if xattr.startswith(prefix):
                name = xattr[len(prefix) :]
                return None if name.startswith(ESCAPED) else name
        return None

    def user_xattr(self, xattr: str) -> str | None:
        """The name the container gave an xattr; None for a marker."""
        for prefix in self.marker_prefixes:
            if xattr.startswith(prefix + ESCAPED):
                return prefix + xattr[len(prefix + ESCAPED) :]
        return None if self.marker(xattr) is not None else xattr


def split_options(options: Iterable[str]) -> dict[str, str]:
    result = {}
    for option in options:
        key, _, value = option.partition("=")
        result.setdefault(key, value)
    return result


def upper_from_options(options: list[str], fuse: bool) -> Upper | None:
    opts = split_options(options)
    if not opts.get("upperdir"):
        return None
    if fuse:  # fuse-overlayfs honours user.overlay.* too, and falls back to its own
        prefixes: tuple[str, ...] = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
    elif "userxattr" in opts:
        prefixes = ("user.overlay.",)
    else:
        prefixes = ("trusted.overlay.",)
    return Upper(opts["upperdir"], prefixes)


def find_mount(mounts: object, mount_point: str) -> dict:
    if not isinstance(mounts, list):
        mounts = []
    wanted = posixpath.normpath(mount_point)
    found = [
        m
        for m in mounts
        if isinstance(m, dict)
        and isinstance(m.get("destination"), str)
        and posixpath.normpath(m["destination"]) == wanted
    ]
    if not found:
        raise ArchiveError(f"no mount at {mount_point} in config.json")
    return found[-1]  # a later mount on the same destination hides the earlier ones


def mount_program_options(mount_program: str, mount_point: str) -> list[str] | None:
    """The `-o` options of the live mount-program process serving mount_point."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        argv = process_argv(pid)
        if not argv or argv[-1] != mount_point or not is_program(pid, argv, mount_program):
            continue
        options: list[str] = []
        for i, arg in enumerate(argv):
            if arg == "-o" and i + 1 < len(argv):
                options += argv[i + 1].split(",")
            elif arg.startswith("-o") and len(arg) > 2:
                options += arg[2:].split(",")
        return options
    return None


def process_argv(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []  # gone, or not ours to read
    return [os.fsdecode(a) for a in raw.split(b"\0")[:-1]]  # zombies have an empty cmdline


def is_program(pid: str, argv: list[str], program: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe") == program
    except OSError:  # another user's process: fall back on what it says it is
        return argv[0] == program or os.path.basename(argv[0]) == os.path.basename(program)


def unescape_mountinfo(field_: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def native_overlay_options(mount_point: str) -> list[str] | None:
    """Super options of the overlay mounted at mount_point, from mountinfo."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split(" ")
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if unescape_mountinfo(fields[4]) == mount_point and fields[sep + 1] == "overlay":
            found = [unescape_mountinfo(o) for o in fields[sep + 3].split(",")]
    return found  # the last one is on top


def find_upper(mount: dict, mount_program: str) -> Upper:
    kind, source = mount.get("type"), mount.get("source")
    options = mount.get("options")
    options = [o for o in options if isinstance(o, str)] if isinstance(options, list) else []
    if kind == "overlay":
        upper = upper_from_options(options, fuse=False)
        if upper is None:
            raise ArchiveError("overlay mount has no upperdir (a read-only mount?)")
        return upper
    if kind == "bind" and isinstance(source, str):
        fuse_options = mount_program_options(mount_program, source)
        if fuse_options is not None:
            upper = upper_from_options(fuse_options, fuse=True)
            if upper is None:
                raise ArchiveError(f"{mount_program} mount {source} has no upperdir (read-only?)")
            return upper
        native = native_overlay_options(source)
        if native is not None:
            upper = upper_from_options(native, fuse=False)
            if upper is None:
                raise ArchiveError(f"overlay mounted at {source} has no upperdir (read-only?)")
            return upper
        raise ArchiveError(
            f"bind source {source} is neither served by a running {mount_program} "
            "nor an overlay mount"
        )
    raise ArchiveError(f"mount type {kind!r} is not overlay (nor a bind of one)")


# ---------------------------------------------------------------------------
# Walking an upperdir: every entry, parents before children, never following
# a symlink.  Names are bytes: a container may write names that are not UTF-8.
# ---------------------------------------------------------------------------

WHITEOUT_PREFIX = b".wh."
OPAQUE_WHITEOUT = b".wh..wh..opq"


@dataclass
class Entry:
    __slots__ = ("path", "rel", "st", "xattrs")  # one per upperdir entry: keep it light
    rel: bytes  # b"." for the root, else b"dir/name"
    path: bytes  # where to read it
    st: os.stat_result
    xattrs: dict[str, bytes]

    @property
    def is_whiteout(self) -> bool:
        return stat.S_ISCHR(self.st.st_mode) and self.st.st_rdev == 0


def read_xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    values = {}
    for name in names:
        try:
            values[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed meanwhile
                raise
    return values


def list_dir(path: bytes, rel_dir: bytes) -> Iterator[Entry]:
    """A directory's entries, sorted by name: archives of the same tree come out the same."""
    for name in sorted(os.listdir(path)):
        child = path + b"/" + name
        yield Entry(rel_dir + name, child, os.lstat(child), read_xattrs(child))


def walk(upper: Upper) -> Iterator[Entry]:
    """Every entry of the upperdir, depth first, each directory before its children."""
    top = os.fsencode(upper.path)
    try:
        st = os.lstat(top)
    except OSError as exc:
        raise ArchiveError(f"cannot read upperdir: {describe(exc)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ArchiveError(f"upperdir {upper.path} is not a directory")
    root = Entry(b".", top, st, read_xattrs(top))
    check_representable(root, upper)
    yield root
    stack = [list_dir(top, b"")]  # an explicit stack: a container may nest dirs deeply
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.xattrs:
            check_representable(entry, upper)
        yield entry
        if stat.S_ISDIR(entry.st.st_mode):
            stack.append(list_dir(entry.path, entry.rel + b"/"))


def check_representable(entry: Entry, upper: Upper) -> None:
    """Refuse entries whose data stays in the lower layers: the archive would miss it."""
    for name in entry.xattrs:
        if upper.marker(name) in ("redirect", "metacopy"):
            raise ArchiveError(
                f"{os.fsdecode(entry.rel)} has {name}: the overlay was mounted with "
                "redirect_dir or metacopy, so the upperdir alone does not hold the changes"
            )


def open_source(entry: Entry) -> int:
    """Open a regular file of the upperdir: never through a symlink, never a FIFO."""
    fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.st.st_size:
        os.close(fd)
        raise ArchiveError(f"{os.fsdecode(entry.rel)} changed while being archived")
    return fd


# ---------------------------------------------------------------------------
# The destination: archive-to and success, checked against --allow-dir, written
# under a temporary name beside archive-to and renamed into place when whole.
# ---------------------------------------------------------------------------

TMP_MARK = ".archive_overlay-tmp-"
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


@cache
def libc() -> ctypes.CDLL:
    """glibc, for the calls Python's os module lacks (renameat2, syncfs, sync_file_range)."""
    return ctypes.CDLL(None, use_errno=True)


def renameat2(dir_fd: int, old: str, new: str, flags: int) -> None:
    if libc().renameat2(dir_fd, os.fsencode(old), dir_fd, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), new)


SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Let the disk start on a file's data now, so the final sync has less left to do."""
    libc().sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), SYNC_FILE_RANGE_WRITE)


def syncfs(fd: int) -> None:
    if libc().syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def check_allowed(path: str, allow_dirs: tuple[str, ...], what: str) -> str:
    """The real path of an absolute path, refused outside --allow-dir when set.

    Only the parent is resolved: an archive-to that is itself a symlink is
    replaced, never written through.
    """
    if not path.startswith("/"):
        raise ArchiveError(f"{what} {path!r} is not an absolute path")
    parent, name = posixpath.split(path.rstrip("/") or "/")
    if name in ("", ".", ".."):
        parent, name = posixpath.split(os.path.realpath(path))
    real = posixpath.join(os.path.realpath(parent), name)
    if not name:
        raise ArchiveError(f"{what} {path} names no file")
    if allow_dirs and not any(real.startswith(d.rstrip("/") + "/") for d in allow_dirs):
        raise ArchiveError(f"{what} {path} is outside the allowed directories")
    return real


def open_dir_nofollow(path: str, create: bool) -> int:
    """Open an absolute directory one component at a time, never following a symlink.

    The path was resolved already: a symlink found now was put there since, so
    it is refused instead of followed.
    """
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in path.split("/") if p]:
            try:
                next_fd = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                next_fd = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(dir_fd: int, name: str) -> None:
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def temp_name(name: str) -> str:
    """A temporary beside `name`, recognisable as ours and as whose (the pid)."""
    return f".{name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"


def remove_stale_temporaries(dir_fd: int, name: str, shown_dir: str) -> None:
    """Temporaries for `name` left by runs killed mid-write (SIGKILL): remove them."""
    prefix = f".{name}{TMP_MARK}"
    for entry in os.listdir(dir_fd):
        if entry.startswith(prefix) and is_stale(dir_fd, entry, entry[len(prefix) :]):
            log.info("removing a stale temporary", path=posixpath.join(shown_dir, entry))
            with contextlib.suppress(OSError):
                remove_at(dir_fd, entry)


def is_stale(dir_fd: int, name: str, suffix: str) -> bool:
    """Its writer is gone: the pid in its name is dead and nobody holds its lock."""
    pid = suffix.partition("-")[0]
    if not pid.isdigit() or (int(pid) != os.getpid() and pid_alive(int(pid))):
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Destination:
    """archive-to's parent directory, held open, and a temporary beside it."""

    def __init__(self, archive_to: str, allow_dirs: tuple[str, ...]) -> None:
        real = check_allowed(archive_to, allow_dirs, "archive-to")
        self.path = archive_to
        self.parent, self.name = posixpath.split(real)
        try:
            self.dir_fd = open_dir_nofollow(self.parent, create=True)
        except OSError as exc:
            raise ArchiveError(
                f"cannot open the directory of archive-to: {describe(exc)}"
            ) from None
        self.tmp_name = temp_name(self.name)
        self.lock_fd: int | None = None

    def close(self) -> None:
        for fd in (self.lock_fd, self.dir_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.lock_fd = None

    def existing(self) -> os.stat_result | None:
        return lstat_at(self.dir_fd, self.name)

    def _lock(self, fd: int) -> int:
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.lock_fd = fd
        return fd

    def make_temp_dir(self) -> int:
        os.mkdir(self.tmp_name, 0o700, dir_fd=self.dir_fd)
        return self._lock(
            os.open(self.tmp_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=self.dir_fd)
        )  # fmt: skip

    def make_temp_file(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return self._lock(os.open(self.tmp_name, flags, 0o644, dir_fd=self.dir_fd))

    def discard_temp(self) -> None:
        with contextlib.suppress(OSError):
            remove_at(self.dir_fd, self.tmp_name)

    def commit(self, is_dir: bool) -> None:
        """Rename the finished temporary onto archive-to; the old one goes only now."""
        try:
            renameat2(self.dir_fd, self.tmp_name, self.name, RENAME_NOREPLACE)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
            if self.existing() is None:  # removed meanwhile
                return self.commit(is_dir)
            self.check_kind(is_dir)
            if is_dir:
                renameat2(self.dir_fd, self.tmp_name, self.name, RENAME_EXCHANGE)
                self.discard_temp()  # the old tree, now under the temporary name
            else:
                os.rename(self.tmp_name, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)

    def check_kind(self, is_dir: bool) -> None:
        """Fail before writing anything if archive-to is of the other kind."""
        old = self.existing()
        if old is None:
            return
        if is_dir and not stat.S_ISDIR(old.st_mode):
            raise ArchiveError(f"archive-to {self.path} exists and is not a directory")
        if not is_dir and stat.S_ISDIR(old.st_mode):
            raise ArchiveError(f"archive-to {self.path} exists and is a directory")


def write_file_at(dir_fd: int, name: str, data: bytes, shown_dir: str) -> None:
    """A small file written whole under a temporary name, fsync'd, then renamed into place."""
    remove_stale_temporaries(dir_fd, name, shown_dir)
    tmp = temp_name(name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)
    os.fsync(dir_fd)


def write_success(path: str, allow_dirs: tuple[str, ...]) -> None:
    parent, name = posixpath.split(check_allowed(path, allow_dirs, "success"))
    dir_fd = open_dir_nofollow(parent, create=True)
    try:
        write_file_at(dir_fd, name, b"", parent)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------
# Writer: copy.  archive-to becomes a directory equal to the upperdir.
# ---------------------------------------------------------------------------

FICLONE = 0x40049409
WRITEBACK_SIZE = 1 << 20


@cache
def creator() -> tuple[int, int]:
    """Who owns what the hook creates (uid 0 in a rootless podman's namespace too)."""
    return os.geteuid(), os.getegid()


COPY_CHUNK = 1 << 30


@dataclass
class Stats:
    entries: int = 0
    bytes: int = 0  # file data read from the upperdir
    archive_bytes: int = 0  # what the archive file holds (tar methods)
    descriptor: dict | None = None  # oci-layer: what <archive-to>.json says


class XattrWriter:
    """Sets xattrs on the destination; a namespace it refuses is warned about once."""

    def __init__(self, archive: str) -> None:
        self.archive = archive
        self.refused: set[str] = set()

    def set_all(self, target: bytes | int, xattrs: dict[str, bytes]) -> None:
        for name, value in xattrs.items():
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                namespace = name.partition(".")[0]
                if namespace not in self.refused:
                    self.refused.add(namespace)
                    log.warning(
                        "destination refuses xattrs: not kept",
                        archive=self.archive,
                        namespace=namespace,
                        error=describe(exc),
                    )


def copy_data(src: int, dst: int, size: int, can_clone: list[bool]) -> None:
    """Kernel-side copy: a reflink where the filesystem has them, else copy_file_range."""
    if can_clone[0]:
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return
        except OSError:
            can_clone[0] = False  # not on this filesystem pair: do not ask again
    copied = 0
    try:
        while copied < size:
            n = os.copy_file_range(src, dst, min(size - copied, COPY_CHUNK))
            if n == 0:
                raise ArchiveError("file shrank while being archived")
            copied += n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        while copied < size:
            n = os.sendfile(dst, src, copied, min(size - copied, COPY_CHUNK))
            if n == 0:
                raise ArchiveError("file shrank while being archived") from None
            copied += n


def set_metadata(target: bytes | int, st: os.stat_result, xattrs: dict[str, bytes],
                 xw: XattrWriter, mode_is_set: bool = True) -> None:  # fmt: skip
    """Owner, mode, xattrs, then times, each only where the new entry differs.

    chown clears setuid bits and capabilities, so mode and xattrs come after it.
    Entries are created with their final permissions (umask 0): chmod is needed
    only for directories (made 0700 to be filled) and setuid/setgid/sticky bits.
    """
    is_link, is_fd = stat.S_ISLNK(st.st_mode), isinstance(target, int)
    if (st.st_uid, st.st_gid) != creator():
        os.chown(target, st.st_uid, st.st_gid, follow_symlinks=is_fd)
    if not is_link and (not mode_is_set or st.st_mode & 0o7000):
        os.chmod(target, stat.S_IMODE(st.st_mode))
    if xattrs:
        xw.set_all(target, xattrs)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=not is_link)


def write_copy(entries: Iterable[Entry], root_fd: int, shown_root: str, archive: Archive) -> Stats:
    """The tree under the directory root_fd; errors name paths under shown_root."""
    base = f"/proc/self/fd/{root_fd}/".encode()
    old_umask = os.umask(0)  # entries are created with their own permissions
    try:
        return copy_entries(entries, base, archive)
    except OSError as exc:
        for attr in ("filename", "filename2"):
            name = getattr(exc, attr)
            if isinstance(name, bytes) and name.startswith(base):
                setattr(exc, attr, os.fsencode(shown_root) + b"/" + name[len(base) :])
        raise
    finally:
        os.umask(old_umask)


def copy_entries(entries: Iterable[Entry], base: bytes, archive: Archive) -> Stats:
    xw = XattrWriter(archive.name)
    links: dict[tuple[int, int], bytes] = {}
    dirs: list[tuple[bytes, Entry]] = []
    can_clone = [True]
    stats = Stats()
    for entry in entries:
        st, dst = entry.st, base + entry.rel
        stats.entries += 1
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            if entry.rel != b".":
                os.mkdir(dst, 0o700)
            dirs.append((dst, entry))
            continue
        if stat.S_ISSOCK(mode):
            log.warning("socket skipped", archive=archive.name, path=os.fsdecode(entry.path))
            continue
        if st.st_nlink > 1 and not entry.is_whiteout:
            key = (st.st_dev, st.st_ino)
            if key in links:
                os.link(links[key], dst, follow_symlinks=False)
                continue
            links[key] = dst
        if stat.S_ISREG(mode):
            copy_file(entry, dst, xw, can_clone)
            stats.bytes += st.st_size
            continue
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(entry.path), dst)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst, stat.S_IMODE(mode))
        else:  # character and block devices, whiteouts among them
            os.mknod(dst, mode, st.st_rdev)
        set_metadata(dst, st, entry.xattrs, xw)
    for dst, entry in reversed(dirs):  # children first: creating them changes a dir's mtime
        set_metadata(dst, entry.st, entry.xattrs, xw, mode_is_set=False)
    return stats


def copy_file(entry: Entry, dst: bytes, xw: XattrWriter, can_clone: list[bool]) -> None:
    src_fd = open_source(entry)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst_fd = os.open(dst, flags, stat.S_IMODE(entry.st.st_mode) & 0o777)
        try:
            if entry.st.st_size:
                copy_data(src_fd, dst_fd, entry.st.st_size, can_clone)
                if entry.st.st_size >= WRITEBACK_SIZE:
                    start_writeback(dst_fd)
            set_metadata(dst_fd, entry.st, entry.xattrs, xw)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


# ---------------------------------------------------------------------------
# Writers: tar, tar.gz, tar.zst.  ustar headers with PAX extensions (as GNU tar
# reads them: no hdrcharset), file
# data streamed (kernel-side for plain tar), compression in threads.
# ---------------------------------------------------------------------------

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default record: readers expect archives padded to it
READ_CHUNK = 1 << 20
DEFAULT_LEVELS = {"gzip": 2, "zstd": 3}
ZSTD_JOB_SIZE = 2 << 20


TYPEFLAGS = {
    stat.S_IFREG: b"0",
    stat.S_IFLNK: b"2",
    stat.S_IFCHR: b"3",
    stat.S_IFBLK: b"4",
    stat.S_IFDIR: b"5",
    stat.S_IFIFO: b"6",
}
HARDLINK = b"1"
PAX_HEADER = b"x"


USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
MAX_OCTAL_7, MAX_OCTAL_11 = 8**7 - 1, 8**11 - 1  # what 8- and 12-byte fields hold


def pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))  # the length counts its own digits
    return b"%d" % length + body


def ustar_block(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                typeflag: bytes, linkname: bytes = b"", uname: bytes = b"", gname: bytes = b"",
                devmajor: int = 0, devminor: int = 0) -> bytes:  # fmt: skip
    """One 512-byte ustar header; the caller puts what does not fit in a PAX header."""
    header = USTAR.pack(
        name, b"%07o" % mode, b"%07o" % uid, b"%07o" % gid, b"%011o" % size, b"%011o" % mtime,
        b" " * 8, typeflag, linkname, b"ustar\x0000", uname, gname,
        b"%07o" % devmajor, b"%07o" % devminor, b"",
    )  # fmt: skip
    return header[:148] + b"%06o\0 " % byte_sum(header) + header[156:]


def byte_sum(block: bytes) -> int:
    """sum(block), in C: adler32's low half is 1 + the byte sum mod 65521, and the
    sum of 256 bytes (at most 65280) never wraps.  Twice as fast per member."""
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def member_name(entry: Entry) -> bytes:
    if entry.rel == b".":
        return b"./"
    return b"./" + entry.rel + (b"/" if stat.S_ISDIR(entry.st.st_mode) else b"")


def tar_header(entry: Entry, owner: tuple[int, int] | None, link_to: bytes | None) -> bytes:
    """The header blocks of one member: a PAX header first where ustar cannot hold it all."""
    st = entry.st
    name = member_name(entry)
    if link_to is not None:
        typeflag, linkname, size = HARDLINK, link_to, 0
    else:
        typeflag = TYPEFLAGS[stat.S_IFMT(st.st_mode)]
        linkname = os.readlink(entry.path) if typeflag == b"2" else b""
        size = st.st_size if typeflag == b"0" else 0
    if owner is None:
        uid, gid = st.st_uid, st.st_gid
        uname, gname = user_name(uid), group_name(gid)
    else:
        (uid, gid), uname, gname = owner, b"", b""
    seconds, nanos = divmod(st.st_mtime_ns, 1_000_000_000)
    records = []
    if len(name) > 100:
        records.append(pax_record("path", name))
    if len(linkname) > 100:
        records.append(pax_record("linkpath", linkname))
    if uid > MAX_OCTAL_7:
        records.append(pax_record("uid", b"%d" % uid))
        uid = 0
    if gid > MAX_OCTAL_7:
        records.append(pax_record("gid", b"%d" % gid))
        gid = 0
    if size > MAX_OCTAL_11:
        records.append(pax_record("size", b"%d" % size))
    if nanos or not 0 <= seconds <= MAX_OCTAL_11:
        records.append(pax_record("mtime", b"%d.%09d" % (seconds, nanos)))
        seconds = min(max(seconds, 0), MAX_OCTAL_11)
    if len(uname) > 32:
        records.append(pax_record("uname", uname))
    if len(gname) > 32:
        records.append(pax_record("gname", gname))
    for key, value in entry.xattrs.items():
        records.append(pax_record("SCHILY.xattr." + key, value))
    is_device = typeflag in (b"3", b"4")
    block = ustar_block(
        name, stat.S_IMODE(st.st_mode), uid, gid, min(size, MAX_OCTAL_11), seconds, typeflag,
        linkname, uname, gname,
        os.major(st.st_rdev) if is_device else 0, os.minor(st.st_rdev) if is_device else 0,
    )  # fmt: skip
    if not records:
        return block
    data = b"".join(records)
    return pax_block(len(data)) + data + bytes(-len(data) % BLOCK) + block


@cache
def pax_block(size: int) -> bytes:
    """The header of a PAX extended header: only its size varies, so it is made once."""
    return ustar_block(b"././@PaxHeader", 0o644, 0, 0, size, 0, PAX_HEADER)


@cache
def user_name(uid: int) -> bytes:
    try:
        return pwd.getpwuid(uid).pw_name.encode()
    except (KeyError, OverflowError):
        return b""


@cache
def group_name(gid: int) -> bytes:
    try:
        return grp.getgrgid(gid).gr_name.encode()
    except (KeyError, OverflowError):
        return b""


class OutputFile:
    """The archive file as a compressor sees it: counts what it gets, hashes it if asked."""

    def __init__(self, fd: int, hashing: bool) -> None:
        self.fd = fd
        self.raw = open(fd, "wb", buffering=READ_CHUNK, closefd=False)  # noqa: SIM115
        self.digest = hashlib.sha256() if hashing else None
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        if self.digest is not None:
            self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def copy_from(self, src: int, size: int) -> None:
        """Kernel-side copy of file data straight into the archive (plain tar)."""
        self.raw.flush()
        copy_data(src, self.fd, size, [False])
        self.size += size


class TarSink:
    """Where tar bytes go: the archive file, or a compressor (in threads) writing to it."""

    def __init__(self, fd: int, archive: Archive, hashing: bool = False) -> None:
        self.out = OutputFile(fd, hashing)
        self.stream: BinaryIO | OutputFile = self.out
        level = archive.compression_level
        if archive.compressor == "gzip":
            from isal import igzip_threaded  # imported where used: copy needs neither

            level = DEFAULT_LEVELS["gzip"] if level is None else level
            self.stream = igzip_threaded.open(self.out, "wb", compresslevel=level, threads=2)
        elif archive.compressor == "zstd":
            import zstandard

            level = DEFAULT_LEVELS["zstd"] if level is None else level
            # Small jobs keep both threads' buffers (and peak RSS) within bounds.
            params = zstandard.ZstdCompressionParameters.from_level(
                level, threads=2, job_size=ZSTD_JOB_SIZE
            )
            cctx = zstandard.ZstdCompressor(compression_params=params)
            self.stream = cctx.stream_writer(self.out, closefd=False)
        self.written = 0  # uncompressed tar bytes
        self.tar_digest = hashlib.sha256() if hashing else None
        self.buffer = bytearray(READ_CHUNK)

    def write(self, data: bytes | memoryview) -> None:
        self.stream.write(data)
        self.written += len(data)
        if self.tar_digest is not None:
            self.tar_digest.update(data)

    def write_file(self, entry: Entry) -> None:
        """A regular file's data, padded to a whole block."""
        size = entry.st.st_size
        src = open_source(entry)
        try:
            if self.stream is self.out and self.tar_digest is None:
                self.out.copy_from(src, size)
                self.written += size
            else:
                self.copy_through(src, size)
        finally:
            os.close(src)
        if size % BLOCK:
            self.write(bytes(-size % BLOCK))

    def copy_through(self, src: int, size: int) -> None:
        view = memoryview(self.buffer)
        left = size
        while left:
            n = os.readv(src, [view[: min(left, READ_CHUNK)]])
            if n == 0:
                raise ArchiveError("file shrank while being archived")
            self.write(view[:n])
            left -= n

    def finish(self) -> None:
        """The end-of-archive blocks, the record's padding, then the compressor's last blocks."""
        self.write(bytes(2 * BLOCK))
        self.write(bytes(-self.written % RECORD))
        if self.stream is not self.out:
            self.stream.close()  # flushes the compressor's last blocks into self.out
        self.out.flush()


def write_tar(entries: Iterable[Entry], fd: int, archive: Archive, hashing: bool = False) -> Stats:
    """Each entry as a member; hardlinks as link members, but whiteouts each their own."""
    sink = TarSink(fd, archive, hashing)
    links: dict[tuple[int, int], bytes] = {}
    stats = Stats()
    for entry in entries:
        st = entry.st
        if stat.S_ISSOCK(st.st_mode):
            log.warning("socket skipped", archive=archive.name, path=os.fsdecode(entry.path))
            continue
        link_to = None
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and not entry.is_whiteout:
            key = (st.st_dev, st.st_ino)
            link_to = links.get(key)
            if link_to is None:
                links[key] = member_name(entry)
        sink.write(tar_header(entry, archive.owner, link_to))
        stats.entries += 1
        if link_to is None and stat.S_ISREG(st.st_mode) and st.st_size:
            sink.write_file(entry)
            stats.bytes += st.st_size
    sink.finish()
    stats.archive_bytes = sink.out.size
    if hashing:
        stats.descriptor = layer_descriptor(sink, archive.compressor or "gzip")
    return stats


# ---------------------------------------------------------------------------
# Writer: oci-layer.  The upperdir in image-spec's layer encoding: whiteouts as
# .wh.<name> files, opaque directories with a .wh..wh..opq, overlay xattrs gone.
# ---------------------------------------------------------------------------

OCI_LAYER_MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
FUSE_OPAQUE_MARKERS = (OPAQUE_WHITEOUT, b".wh..opq")


def is_opaque(entry: Entry, upper: Upper) -> bool:
    return any(entry.xattrs.get(p + "opaque") == b"y" for p in upper.marker_prefixes)


def marker_free(xattrs: dict[str, bytes], upper: Upper) -> dict[str, bytes]:
    """The xattrs without overlay markers; escaped overlay xattrs as the container set them."""
    kept = {}
    for name, value in xattrs.items():
        user_name = upper.user_xattr(name)
        if user_name is not None:
            kept[user_name] = value
    return kept


def oci_entries(entries: Iterable[Entry], upper: Upper) -> Iterator[Entry]:
    """Convert overlay's encoding of changes into image-spec's, each path once."""
    for entry in entries:
        parent, _, name = entry.rel.rpartition(b"/")
        if name in FUSE_OPAQUE_MARKERS:
            continue  # fuse-overlayfs's own markers: the directory's entry carries opacity
        st = entry.st
        if entry.is_whiteout:
            rel = (parent + b"/" if parent else b"") + WHITEOUT_PREFIX + name
            yield Entry(rel, entry.path, whiteout_file_stat(st), {})
            continue
        yield Entry(entry.rel, entry.path, st, marker_free(entry.xattrs, upper))
        if stat.S_ISDIR(st.st_mode) and (is_opaque(entry, upper) or has_opq_file(entry)):
            rel = b"" if entry.rel == b"." else entry.rel + b"/"
            yield Entry(rel + OPAQUE_WHITEOUT, entry.path, whiteout_file_stat(st), {})


def has_opq_file(entry: Entry) -> bool:
    return os.path.lexists(os.path.join(entry.path, OPAQUE_WHITEOUT))


def whiteout_file_stat(st: os.stat_result) -> os.stat_result:
    """An empty regular file's stat, with the owner and times of the marker it replaces."""
    values = list(st)
    values[stat.ST_MODE] = stat.S_IFREG | 0o644
    values[stat.ST_NLINK], values[stat.ST_SIZE] = 1, 0
    extra = {"st_mtime_ns": st.st_mtime_ns, "st_atime_ns": st.st_atime_ns, "st_rdev": 0}
    return os.stat_result(values, extra)


def layer_descriptor(sink: TarSink, compressor: str) -> dict:
    assert sink.out.digest is not None and sink.tar_digest is not None
    return {
        "mediaType": OCI_LAYER_MEDIA_TYPES[compressor],
        "size": sink.out.size,
        "digest": "sha256:" + sink.out.digest.hexdigest(),
        "diff_id": "sha256:" + sink.tar_digest.hexdigest(),
    }


# ---------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------


def archive_one(archive: Archive, mounts: object, opts: Options) -> None:
    started = time.monotonic()
    upper = find_upper(find_mount(mounts, archive.mount_point), opts.mount_program)
    if archive.success:
        check_allowed(archive.success, opts.allow_dirs, "success")
    dest = Destination(archive.archive_to, opts.allow_dirs)
    try:
        remove_stale_temporaries(dest.dir_fd, dest.name, dest.parent)
        stats = write_archive(archive, upper, dest)
    finally:
        dest.close()
    if archive.success:
        write_success(archive.success, opts.allow_dirs)
    log.info(
        "archive written",
        archive=archive.name,
        mount_point=archive.mount_point,
        upperdir=upper.path,
        archive_to=archive.archive_to,
        method=archive.method,
        entries=stats.entries,
        bytes=stats.bytes,
        **({"archive_bytes": stats.archive_bytes} if archive.method != "copy" else {}),
        seconds=round(time.monotonic() - started, 3),
    )


def write_archive(archive: Archive, upper: Upper, dest: Destination) -> Stats:
    is_dir = archive.method == "copy"
    dest.check_kind(is_dir)
    entries = walk(upper)
    try:
        if is_dir:
            root_fd = dest.make_temp_dir()
            shown_root = posixpath.join(dest.parent, dest.tmp_name)
            stats = write_copy(entries, root_fd, shown_root, archive)
            syncfs(root_fd)
        else:
            fd = dest.make_temp_file()
            if archive.method.startswith("oci-layer"):
                stats = write_tar(oci_entries(entries, upper), fd, archive, hashing=True)
            else:
                stats = write_tar(entries, fd, archive)
            os.fsync(fd)
        if stats.descriptor is not None:  # never an old descriptor beside a new layer
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest.name + ".json", dir_fd=dest.dir_fd)
        dest.commit(is_dir)
    except BaseException:
        dest.discard_temp()
        raise
    if stats.descriptor is not None:
        descriptor = json.dumps(stats.descriptor, indent=2).encode() + b"\n"
        write_file_at(dest.dir_fd, dest.name + ".json", descriptor, dest.parent)
    return stats


class Options:
    """What the command line sets for archiving (a plain class: a dataclass costs start-up)."""

    def __init__(self, mount_program: str, allow_dirs: tuple[str, ...]) -> None:
        self.mount_program = mount_program
        self.allow_dirs = allow_dirs


def run(stdin: bytes, opts: Options) -> int:
    try:
        state = read_state(stdin)
        config = read_config(state["bundle"])
    except InputError as exc:
        log.error("unusable input", error=str(exc))
        return EXIT_BAD_INPUT
    archives = parse_archives(merged_annotations(state, config))
    if not archives:
        log.info("no archive asked for", container=state.get("id"))
        return EXIT_OK
    failed = 0
    for archive in archives:  # every archive is attempted, whatever the others did
        try:
            archive_one(archive, config.get("mounts"), opts)
        except Exception as exc:  # noqa: BLE001 - one failure must not stop the others
            failed += 1
            log.error(
                "archive failed",
                archive=archive.name,
                mount_point=archive.mount_point,
                archive_to=archive.archive_to,
                error=describe(exc),
            )
    return EXIT_ARCHIVE_FAILED if failed else EXIT_OK


def on_sigterm(signum: int, frame: object) -> NoReturn:
    raise Terminated()


HELP = f"""OCI poststop hook: archive the upperdir of a container's overlay mounts.

\b
Reads the OCI state JSON on stdin, then <bundle>/config.json. Each archive is
named by annotations {ANNOTATION_PREFIX}<NAME>.<arg>:
\b
  mount-point        (required) the mount's destination in the container, e.g. /data
  archive-to         (required) absolute host path to write the archive to
  success            file created (empty) once the archive is complete
  method             copy (default, a directory) | tar | tar.gz | tar.zst |
                     oci-layer | oci-layer+zstd (an OCI image layer + <archive-to>.json)
  tar-content-owner  UID or UID:GID written as the owner of every tar entry
  compression-level  gzip: 0-3 (default 2), zstd: 1-22 (default 3)
\b
Exit status: 0 all archives written (or none asked for), 1 an archive failed,
2 unusable input.
"""


@click.command(help=HELP, context_settings={"help_option_names": ["--help", "-h"]})
@click.option(
    "--log-level",
    type=click.Choice(list(LOG_LEVELS), case_sensitive=False),
    default="info",
    show_default=True,
    help="Log messages at this level and above.",
)
@click.option("--syslog", "use_syslog", is_flag=True, help="Also send log records to syslog.")
@click.option(
    "--log-file",
    type=str,
    default=None,
    help="Also append log records to this file (an engine may drop a hook's stderr).",
)
@click.option(
    "--mount-program",
    default=DEFAULT_MOUNT_PROGRAM,
    show_default=True,
    help="The overlay mount program (fuse-overlayfs) whose processes serve bind mounts.",
)
@click.option(
    "--allow-dir",
    "allow_dirs",
    multiple=True,
    help="Write archives and success files only inside this directory (repeatable).",
)
@click.version_option(__version__, prog_name="archive_overlay")
def main(log_level: str, use_syslog: bool, log_file: str | None, mount_program: str,
         allow_dirs: tuple[str, ...]) -> None:  # fmt: skip
    configure_logging(log_level.lower(), use_syslog, log_file)
    signal.signal(signal.SIGTERM, on_sigterm)
    opts = Options(mount_program, tuple(os.path.realpath(d) for d in allow_dirs))
    log.debug("run archive_overlay", version=__version__, pid=os.getpid())
    try:
        status = run(sys.stdin.buffer.read(), opts)
    except Terminated:
        log.error("terminated by SIGTERM: temporaries removed, nothing half-written")
        # Exit now: a compressor thread interrupted mid-block would never finish.
        os._exit(EXIT_ARCHIVE_FAILED)
    sys.exit(status)


def console_script() -> NoReturn:
    """The installed `archive_overlay`: main, then an exit without the interpreter's
    teardown (freeing every module's objects one by one; the kernel frees the process
    at once).  Log records are written and flushed as they happen."""
    try:
        main()
        status = EXIT_OK
    except SystemExit as exc:  # how click ends a command, every time
        if exc.code is not None and not isinstance(exc.code, int):
            raise
        status = exc.code or EXIT_OK
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    console_script()
