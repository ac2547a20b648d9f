"""archive_overlay: an OCI poststop hook that archives overlay upperdirs.

When a container stops, the runtime (runc, crun) or the engine (podman) runs
this hook with the container's OCI state JSON on stdin.  The hook reads the
bundle's config.json, finds the overlay mounts named by annotations
``com.launchplatform.oci-hooks.archive-overlay.<NAME>.<arg>``, and archives
each mount's upperdir (the container's changes; for mount-point /, its root
filesystem's) to a path on the host, as a directory copy, a tar stream, or a
tagged revision of an OCI image layout.

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
import re
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

import click
import structlog

if GC_WAS_ENABLED:
    if started_as_the_hook():
        gc.freeze()  # what start-up made lives until exit: never look for cycles in it
    gc.enable()

__version__ = "4.0.0"

ANNOTATION_PREFIX = "com.launchplatform.oci-hooks.archive-overlay."
ARGS = (
    "mount-point", "archive-to", "success", "method", "tar-content-owner", "compression-level",
    "exclude", "image-tag", "image-base",
)  # fmt: skip
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
        problems.append(("no syslog socket at /dev/log: not logging to syslog", {}))
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
    """A one-line cause for a log record, without a traceback; never raises."""
    try:
        if isinstance(exc, OSError) and exc.strerror:
            names = [shown_name(n) for n in (exc.filename, exc.filename2) if n is not None]
            return ": ".join([exc.strerror, *[n for n in names if n]])
        return str(exc) or type(exc).__name__
    except Exception:  # noqa: BLE001 - a message must never become a traceback
        return type(exc).__name__


def shown_name(name: object) -> str:
    """A path an OSError carries, as a log can show it: never an fd or a /proc/self/fd path."""
    if isinstance(name, (str, bytes)):
        text = os.fsdecode(name)
        return "" if text.startswith("/proc/self/fd/") else text
    return ""


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
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else describe(exc)
        raise InputError(f"cannot read the bundle's config.json {path}: {cause}") from None
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


ARCHIVE_METHODS = (
    "copy", "tar", "tar.gz", "tar.zst", "oci-layer", "oci-layer+zstd", "oci-image",
    "oci-image+zstd",
)  # fmt: skip
IMAGE_METHODS = ("oci-image", "oci-image+zstd")
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
        self.exclude = ""  # absolute paths in the mount, ':' or ',' separated
        self.image_tag = ""
        self.image_base = ""
        # Annotations that cannot be honoured, as (key, why): the archive is not written.
        self.refused: list[tuple[str, str]] = []

    @property
    def compressor(self) -> str | None:
        if self.method in ("tar.gz", "oci-layer", "oci-image"):
            return "gzip"
        if self.method in ("tar.zst", "oci-layer+zstd", "oci-image+zstd"):
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


def parse_exclude(value: str) -> frozenset[bytes]:
    """exclude's paths, relative to the mount's root as walk() names entries.

    Absolute paths inside the mount separated by ':' (as PATH is) or ','
    (podman 4.3's --annotation splits a value at commas unless CSV-quoted).
    """
    excluded = set()
    for path in value.replace(",", ":").split(":"):
        if not path:
            continue
        if not path.startswith("/"):
            raise ArchiveError(f"exclude path {path!r} is not an absolute path")
        rel = posixpath.normpath(path).lstrip("/")
        if not rel:
            raise ArchiveError("exclude path / would leave nothing to archive")
        excluded.add(os.fsencode(rel))
    return frozenset(excluded)


UNKNOWN_ARG = "unknown archive argument"


def apply_arg(archive: Archive, arg: str, value: str) -> str | None:
    """Set one arg of the archive; why its value cannot be honoured, or None."""
    if arg == "mount-point":
        archive.mount_point = value
    elif arg == "archive-to":
        archive.archive_to = value
    elif arg == "success":
        archive.success = value
    elif arg == "method":
        archive.method = value
        if value not in ARCHIVE_METHODS:
            return f"unknown method {value[:40]!r} (known: {', '.join(ARCHIVE_METHODS)})"
    elif arg == "tar-content-owner":
        archive.owner = parse_owner(value)
        if archive.owner is None:
            return f"invalid tar-content-owner {value[:40]!r}: UID or UID:GID, decimal"
    elif arg == "exclude":
        archive.exclude = value
    elif arg == "compression-level":
        if not (value.isascii() and value.isdigit() and len(value) <= 2):
            return f"invalid compression-level {value[:40]!r}: an integer"
        archive.compression_level = int(value)
    elif arg == "image-tag":
        archive.image_tag = value
    elif arg == "image-base":
        archive.image_base = value
    elif arg:
        return f"{UNKNOWN_ARG} {arg[:40]!r}"
    else:
        return f"no argument after the archive name: {ANNOTATION_PREFIX}<NAME>.<arg>"
    return None


def parse_archives(annotations: dict[str, str]) -> list[Archive]:
    """Every archive named under our prefix; what cannot be honoured is in `refused`."""
    archives: dict[str, Archive] = {}
    for key in sorted(annotations):
        if not key.startswith(ANNOTATION_PREFIX):
            continue
        name, _, arg = key[len(ANNOTATION_PREFIX) :].partition(".")
        archive = archives.setdefault(name, Archive(name))
        why = apply_arg(archive, arg, annotations[key])
        if why is not None:
            archive.refused.append((key, why))
    for archive in archives.values():
        check_archive(archive)
    return list(archives.values())


def check_archive(archive: Archive) -> None:
    """What no single annotation shows: a missing required arg, an arg the method lacks."""
    for arg, value in (("mount-point", archive.mount_point), ("archive-to", archive.archive_to)):
        if not value and not archive.refused:  # the first problem is enough to name
            why = f"no {arg}: an archive needs both mount-point and archive-to"
            archive.refused.append((f"{ANNOTATION_PREFIX}{archive.name}.{arg}", why))
    for arg, value in (("image-tag", archive.image_tag), ("image-base", archive.image_base)):
        if value and archive.method in ARCHIVE_METHODS and archive.method not in IMAGE_METHODS:
            why = f"{arg} is only for oci-image, not method {archive.method}"
            archive.refused.append((f"{ANNOTATION_PREFIX}{archive.name}.{arg}", why))
    why = level_problem(archive)
    if why is not None:
        archive.refused.append((f"{ANNOTATION_PREFIX}{archive.name}.compression-level", why))


def level_problem(archive: Archive) -> str | None:
    level, compressor = archive.compression_level, archive.compressor
    if level is None or archive.method not in ARCHIVE_METHODS:
        return None  # no level asked for, or the method is refused already
    levels = COMPRESSION_LEVELS.get(compressor or "")
    if levels and level in levels:
        return None
    allowed = f"{levels[0]}-{levels[-1]}" if levels else "none: it does not compress"
    return f"compression-level {level} out of range for method {archive.method} ({allowed})"


class RunInfo:
    """What every archive of one run shares: the container's id and the run's time."""

    def __init__(self, container_id: str | None, when: time.struct_time) -> None:
        self.container_id = container_id
        self.when = when  # UTC

    @property
    def stamp(self) -> str:
        """{time} in a path: 20261127T093015Z."""
        return time.strftime("%Y%m%dT%H%M%SZ", self.when)

    @property
    def created(self) -> str:
        """The time in image-spec's RFC 3339 form: 2026-11-27T09:30:15Z."""
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", self.when)


PLACEHOLDERS = "(known: {id} {name} {time}; {{ and }} for literal braces)"


def expand(template: str, values: dict[str, str | None], what: str) -> str:
    """{id}, {name}, {time} replaced; {{ and }} are literal braces; anything else fails."""
    if "{" not in template and "}" not in template:
        return template  # as before placeholders existed
    out, i = [], 0
    while i < len(template):
        c = template[i]
        if c in "{}" and template[i + 1 : i + 2] == c:
            out.append(c)
            i += 2
            continue
        if c == "}":
            raise ArchiveError(f"{what} {template!r}: a lone }} (write }}}} for a brace)")
        if c != "{":
            out.append(c)
            i += 1
            continue
        end = template.find("}", i)
        key = template[i + 1 : end] if end > 0 else ""
        if end < 0 or key not in values:
            shown = template[i : end + 1] if end > 0 else template[i:]
            raise ArchiveError(f"{what} {template!r}: unknown placeholder {shown} {PLACEHOLDERS}")
        value = values[key]
        if value is None:
            raise ArchiveError(
                f"{what} {template!r}: the {key} is missing, or is not one path component"
            )
        out.append(value)
        i = end + 1
    return "".join(out)


def expand_placeholders(archive: Archive, info: RunInfo) -> None:
    """archive-to, success and image-tag with the run's values put in."""
    values = {"id": info.container_id, "name": archive.name, "time": info.stamp}
    for key in ("id", "name"):  # one path component each: never a way up or down
        value = values[key]
        if value is not None and ("/" in value or "\0" in value or value in ("", ".", "..")):
            values[key] = None
    archive.archive_to = expand(archive.archive_to, values, "archive-to")
    archive.success = expand(archive.success, values, "success")
    archive.image_tag = expand(archive.image_tag, values, "image-tag")


# ---------------------------------------------------------------------------
# Finding the upperdir of a mount.
# ---------------------------------------------------------------------------


ESCAPED = "overlay."


class Upper:
    """An upperdir and the xattr namespaces its overlay keeps markers in."""

    def __init__(self, path: str, marker_prefixes: tuple[str, ...], fuse: bool = False) -> None:
        self.path = path
        self.marker_prefixes = marker_prefixes  # e.g. ("trusted.overlay.",)
        self.fuse = fuse  # fuse-overlayfs: its .wh.* files are markers too

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
    return Upper(opts["upperdir"], prefixes, fuse)


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
        log.debug("bind source served by the mount program", source=mount_point, pid=int(pid),
                  argv=" ".join(argv))  # fmt: skip
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
        log.debug("overlay mount: upperdir from its options", destination=mount.get("destination"),
                  options=",".join(options))  # fmt: skip
        upper = upper_from_options(options, fuse=False)
        if upper is None:
            raise ArchiveError("overlay mount has no upperdir (a read-only mount?)")
        return upper
    if kind == "bind" and isinstance(source, str):
        upper = upper_mounted_at(source, mount_program)
        if upper is None:
            raise ArchiveError(
                f"bind source {source} is neither served by a running {mount_program} "
                "nor an overlay mount"
            )
        return upper
    raise ArchiveError(f"mount type {kind!r} is not overlay (nor a bind of one)")


def upper_mounted_at(path: str, mount_program: str) -> Upper | None:
    """The upperdir of the overlay mounted at path: a mount-program process serving it,
    or a native overlay in mountinfo; None when path is neither."""
    fuse_options = mount_program_options(mount_program, path)
    if fuse_options is not None:
        upper = upper_from_options(fuse_options, fuse=True)
        if upper is None:
            raise ArchiveError(f"{mount_program} mount {path} has no upperdir (read-only?)")
        return upper
    native = native_overlay_options(path)
    if native is not None:
        log.debug("overlay mount found in mountinfo", source=path, options=",".join(native))
        upper = upper_from_options(native, fuse=False)
        if upper is None:
            raise ArchiveError(f"overlay mounted at {path} has no upperdir (read-only?)")
        return upper
    return None


def is_root_mount_point(mount_point: str) -> bool:
    return mount_point.startswith("/") and not mount_point.strip("/")


def find_root_upper(config: dict, bundle: str, mount_program: str) -> Upper:
    """The upperdir of the container's root filesystem (mount-point /).

    podman runs poststop hooks while root.path is still mounted: a native
    overlay or a mount-program's.  CRI-O unmounts it first, but the layer's
    directory in containers-storage stays, with the upperdir as its `diff`.
    """
    root = config.get("root")
    path = root.get("path") if isinstance(root, dict) else None
    if not isinstance(path, str) or not path:
        raise ArchiveError("config.json has no root.path")
    full = posixpath.normpath(posixpath.join(bundle, path))  # relative to the bundle
    for candidate in dict.fromkeys((full, os.path.realpath(full))):
        upper, found = upper_mounted_at(candidate, mount_program), "mount"
        if upper is None:
            upper, found = storage_layer_upper(candidate), "storage-layer"
        if upper is not None:
            log.debug("root filesystem", root_path=candidate, found=found, upperdir=upper.path)
            return upper
    shown = path if path == full else f"{path} ({full})"
    raise ArchiveError(
        f"root.path {shown} is neither an overlay mount (native or served by a running "
        f"{mount_program}) nor in a containers-storage overlay layer"
    )


def storage_layer_upper(root_path: str) -> Upper | None:
    """The `diff` of the containers-storage overlay layer whose `merged` is root_path.

    A container's layer is a directory holding `diff` (the upperdir), `link`
    and `lower`; `merged` is gone once unmounted.  The store's
    `.has-mount-program` says whether fuse-overlayfs wrote it; otherwise, as
    containers-storage does, a store used from a user namespace (rootless)
    marks with user.overlay.* (`userxattr`).
    """
    layer, name = posixpath.split(root_path)
    diff = posixpath.join(layer, "diff")
    if name != "merged" or not os.path.isdir(diff):
        return None
    if not all(os.path.isfile(posixpath.join(layer, f)) for f in ("link", "lower")):
        return None
    try:
        with open(posixpath.join(posixpath.dirname(layer), ".has-mount-program")) as f:
            fuse = f.read().strip() == "true"
    except OSError:
        fuse = False
    options = [f"upperdir={diff}"] + ([] if fuse or not in_user_namespace() else ["userxattr"])
    return upper_from_options(options, fuse=fuse)


def in_user_namespace() -> bool:
    """Not in the initial user namespace (whose uid_map maps all of 0..2^32-2 to itself)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def locate_upper(mount_point: str, config: dict, bundle: str, mount_program: str) -> Upper:
    """The upperdir behind a mount-point: the root filesystem's for /, else its mount's."""
    if is_root_mount_point(mount_point):
        return find_root_upper(config, bundle, mount_program)
    return find_upper(find_mount(config.get("mounts"), mount_point), mount_program)


# ---------------------------------------------------------------------------
# Walking an upperdir: every entry, parents before children, never following
# a symlink.  Names are bytes: a container may write names that are not UTF-8.
# ---------------------------------------------------------------------------

WHITEOUT_PREFIX = b".wh."
OPAQUE_WHITEOUT = b".wh..wh..opq"


class Entry:
    """One entry of the upperdir, read where it lies: by name in its open parent directory.

    Working relative to directory fds means only a name's length, never the
    depth of a path, limits what can be archived (a container may nest
    directories past PATH_MAX).
    """

    __slots__ = ("depth", "dir_fd", "dir_path", "name", "rel", "st", "xattrs")  # keep it light

    def __init__(self, rel: bytes, dir_fd: int, name: bytes, st: os.stat_result,
                 xattrs: dict[str, bytes], depth: int, dir_path: bytes | None = None) -> None:  # fmt: skip
        self.rel = rel  # b"." for the root, else b"dir/name"
        self.dir_fd = dir_fd  # the open directory holding it (the root: the upperdir itself)
        self.name = name  # its name there (the root: b".")
        self.st = st
        self.xattrs = xattrs
        self.depth = depth  # 0 for the root, 1 for its children, ...
        self.dir_path = dir_path  # the directory's path, where short enough to use

    @property
    def path(self) -> bytes:
        """A path to the entry however deep it lies, for the calls that take no dir_fd
        (xattrs); the last component is never followed."""
        if self.dir_path is not None:  # the kernel resolves it faster than /proc/self/fd
            return self.dir_path + b"/" + self.name
        return b"/proc/self/fd/%d/%s" % (self.dir_fd, self.name)

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


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def sorted_names(dir_fd: int) -> Iterator[bytes]:
    """A directory's names, sorted: archives of the same tree come out the same."""
    return iter(sorted(os.fsencode(n) for n in os.listdir(dir_fd)))


PATH_USABLE = 3800  # a directory path short enough that path + "/" + name fits PATH_MAX


def read_entry(upper: Upper, dir_fd: int, name: bytes, rel: bytes, depth: int,
               dir_path: bytes | None) -> Entry:  # fmt: skip
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    entry = Entry(rel, dir_fd, name, st, {}, depth, dir_path)
    entry.xattrs = read_xattrs(entry.path)
    if entry.xattrs:
        check_representable(entry, upper)
    return entry


def walk(upper: Upper, excluded: frozenset[bytes] = frozenset()) -> Iterator[Entry]:
    """Every entry of the upperdir, depth first, each directory before its children;
    not the excluded paths, nor anything under them (no whiteout is made for them).

    One directory fd is open per level: each entry is read (and must be used
    by the caller) before the walk moves on.
    """
    try:
        top = os.open(upper.path, DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise ArchiveError(f"upperdir {upper.path} is not a directory") from None
        raise ArchiveError(f"cannot read upperdir {upper.path}: {exc.strerror}") from None
    raise_open_file_limit()
    # Per level: the directory's fd, its path (None past PATH_USABLE), prefix, names.
    stack: list[tuple[int, bytes | None, bytes, Iterator[bytes]]] = []
    top_path = os.fsencode(upper.path)
    rel = b"."
    try:
        try:
            root = read_entry(upper, top, b".", rel, 0, top_path)
            stack.append((top, top_path, b"", sorted_names(top)))
        except BaseException:
            os.close(top)
            raise
        yield root
        while stack:
            fd, dir_path, prefix, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                os.close(fd)
                continue
            rel = prefix + name
            if rel in excluded:
                continue
            entry = read_entry(upper, fd, name, rel, len(stack), dir_path)
            yield entry
            if stat.S_ISDIR(entry.st.st_mode):
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
                child_path = entry.path if dir_path and len(dir_path) < PATH_USABLE else None
                stack.append((child, child_path, rel + b"/", sorted_names(child)))
    except OSError as exc:
        where = upper.path if rel == b"." else f"{upper.path}/{os.fsdecode(rel)}"
        raise ArchiveError(f"cannot read {where}: {exc.strerror}") from None
    finally:
        for fd, *_ in stack:
            with contextlib.suppress(OSError):
                os.close(fd)


def raise_open_file_limit() -> None:
    """The walk holds a directory fd per level: allow as many as the hard limit does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(entry.name, flags, dir_fd=entry.dir_fd)
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


def remove_stale_temporaries(dir_fd: int, name: str | None, shown_dir: str) -> None:
    """Temporaries for `name` (for any name: None) left by runs killed mid-write
    (SIGKILL): remove them."""
    prefix = "." if name is None else f".{name}{TMP_MARK}"
    try:
        entries = os.listdir(dir_fd)
    except OSError as exc:
        raise ArchiveError(f"cannot read the directory {shown_dir}: {exc.strerror}") from None
    for entry in entries:
        if not entry.startswith(prefix) or TMP_MARK not in entry:
            continue
        if is_stale(dir_fd, entry, entry.rpartition(TMP_MARK)[2]):
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

    def __init__(self, archive_to: str, allow_dirs: tuple[str, ...], archive: str = "") -> None:
        real = check_allowed(archive_to, allow_dirs, "archive-to")
        self.path = archive_to
        self.archive = archive  # its name, for the log
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
        fd = self._lock(os.open(self.tmp_name, DIR_FLAGS, dir_fd=self.dir_fd))
        clear_inherited(fd)
        return fd

    def make_temp_file(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return self._lock(os.open(self.tmp_name, flags, 0o644, dir_fd=self.dir_fd))

    def discard_temp(self) -> None:
        with contextlib.suppress(OSError):
            remove_at(self.dir_fd, self.tmp_name)

    def commit(self, is_dir: bool, companions: tuple[tuple[str, str], ...] = ()) -> None:
        """Put the temporary (and its companions: a layer's descriptor) in place, make the
        directory durable, and only then remove what they replaced.  A failure on the
        way puts everything back as it was."""
        self.check_kind(is_dir)
        placed: list[tuple[str, str, bool]] = []
        try:
            for tmp, name in ((self.tmp_name, self.name), *companions):
                placed.append((tmp, name, put_in_place(self.dir_fd, tmp, name)))
            os.fsync(self.dir_fd)
        except BaseException:
            for tmp, name, had_old in reversed(placed):
                with contextlib.suppress(OSError):
                    take_back(self.dir_fd, tmp, name, had_old)
            raise
        for tmp, _, had_old in placed:
            if had_old:  # the replaced one, now under the temporary name
                self.remove_replaced(tmp)

    def remove_replaced(self, tmp: str) -> None:
        try:
            remove_at(self.dir_fd, tmp)
        except OSError as exc:
            log.warning(
                "what the archive replaced is left behind: the next run removes it",
                archive=self.archive, path=posixpath.join(self.parent, tmp), error=describe(exc),
            )  # fmt: skip

    def check_kind(self, is_dir: bool) -> None:
        """Fail before writing anything if archive-to is of the other kind."""
        old = self.existing()
        if old is None:
            return
        if is_dir and not stat.S_ISDIR(old.st_mode):
            raise ArchiveError(f"archive-to {self.path} exists and is not a directory")
        if not is_dir and stat.S_ISDIR(old.st_mode):
            raise ArchiveError(f"archive-to {self.path} exists and is a directory")


@cache
def creator() -> tuple[int, int]:
    """Who owns what the hook creates (uid 0 in a rootless podman's namespace too)."""
    return os.geteuid(), os.getegid()


def clear_inherited(fd: int) -> None:
    """A new directory takes a setgid parent's group and setgid bit, and its default
    ACL (which would reach every entry made inside): drop them, so the copy holds
    only what the upperdir holds."""
    for name in ("system.posix_acl_default", "system.posix_acl_access"):
        try:
            os.removexattr(fd, name)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
    os.fchown(fd, -1, creator()[1])
    os.fchmod(fd, 0o700)


def put_in_place(dir_fd: int, tmp: str, name: str) -> bool:
    """Rename tmp onto name; True if an old `name` was there: it is now under tmp."""
    while True:
        try:
            renameat2(dir_fd, tmp, name, RENAME_NOREPLACE)
            return False
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        try:
            renameat2(dir_fd, tmp, name, RENAME_EXCHANGE)
            return True
        except FileNotFoundError:  # the old one was removed meanwhile
            continue


def take_back(dir_fd: int, tmp: str, name: str, had_old: bool) -> None:
    """Undo put_in_place: the old `name` back, the new one under tmp again."""
    if had_old:
        renameat2(dir_fd, tmp, name, RENAME_EXCHANGE)
    else:
        renameat2(dir_fd, name, tmp, RENAME_NOREPLACE)


def write_temp_file(dir_fd: int, name: str, data: bytes) -> str:
    """A small file written whole and fsync'd under a temporary name beside `name`."""
    tmp = temp_name(name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)
    return tmp


def write_file_at(dir_fd: int, name: str, data: bytes, shown_dir: str) -> None:
    """A small file written whole under a temporary name, fsync'd, then renamed into place."""
    remove_stale_temporaries(dir_fd, name, shown_dir)
    tmp = write_temp_file(dir_fd, name, data)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def write_success(path: str, allow_dirs: tuple[str, ...]) -> None:
    parent, name = posixpath.split(check_allowed(path, allow_dirs, "success"))
    try:
        dir_fd = open_dir_nofollow(parent, create=True)
        try:
            write_file_at(dir_fd, name, b"", parent)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise ArchiveError(f"cannot write the success file {path}: {exc.strerror}") from None


# ---------------------------------------------------------------------------
# Writer: copy.  archive-to becomes a directory equal to the upperdir.
# ---------------------------------------------------------------------------

FICLONE = 0x40049409
WRITEBACK_SIZE = 1 << 20


COPY_CHUNK = 1 << 30


class Stats:
    """What a writer did, for the log; and the entry it is at, for an error."""

    def __init__(self) -> None:
        self.entries = 0
        self.bytes = 0  # file data read from the upperdir
        self.archive_bytes = 0  # what the archive file holds (tar methods)
        self.descriptor: dict | None = None  # oci-layer: what <archive-to>.json says
        self.current: bytes | None = None  # the entry being written: errors name it
        self.xattrs_not_kept = 0  # copy: xattrs the destination refused


XATTR_REFUSED = {
    errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.ENOSPC, errno.E2BIG, errno.ERANGE,
    errno.EDQUOT,
}  # fmt: skip


class XattrWriter:
    """Sets xattrs on the destination.  One the destination refuses (unsupported
    namespace, too large, not permitted) is not kept, as `cp -a` and `tar -x` do:
    the first refusal of each kind is warned about, naming the entry; the rest counted."""

    def __init__(self, archive: str, stats: Stats) -> None:
        self.archive = archive
        self.stats = stats
        self.refused: set[tuple[str, int]] = set()

    def set_all(self, target: bytes | int, xattrs: dict[str, bytes], rel: bytes) -> None:
        for name, value in xattrs.items():
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in XATTR_REFUSED:
                    raise
                self.stats.xattrs_not_kept += 1
                kind = (name.partition(".")[0], exc.errno)
                if kind not in self.refused:
                    self.refused.add(kind)
                    log.warning(
                        "destination refuses an xattr: not kept (further refusals of this "
                        "kind are counted in xattrs_not_kept)",
                        archive=self.archive,
                        entry=os.fsdecode(rel),
                        xattr=name,
                        error=exc.strerror,
                    )


class Hardlinks:
    """The first archived path of each hardlinked inode, until all its links are seen:
    memory grows with the inodes whose other links are still to come (about 140 bytes
    each), not with the upperdir.  An upperdir is one filesystem: the inode number
    is the key."""

    def __init__(self) -> None:
        self.first: dict[int, bytes] = {}
        self.left: dict[int, int] = {}  # links still to come, for inodes with more than 2

    def first_link(self, st: os.stat_result, path: bytes) -> bytes | None:
        """None for the first link (path is remembered), else the first link's path."""
        ino = st.st_ino
        first = self.first.get(ino)
        if first is None:
            self.first[ino] = path
            if st.st_nlink > 2:
                self.left[ino] = st.st_nlink - 1
            return None
        left = self.left.pop(ino, 1) - 1
        if left > 0:
            self.left[ino] = left
        else:
            del self.first[ino]
        return first


def is_hardlink(entry: Entry) -> bool:
    """A link worth keeping as such; the kernel makes all whiteouts one inode."""
    st = entry.st
    return st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and not entry.is_whiteout


def is_sparse(st: os.stat_result) -> bool:
    return st.st_blocks * 512 < st.st_size


def data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of each stretch of data in a file with holes, in order."""
    segments, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: only a hole is left
                raise
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        segments.append((start, end - start))
        offset = end
    return segments


def copy_data(src: int, dst: int, size: int, can_clone: list[bool], sparse: bool = False) -> None:
    """Kernel-side copy: a reflink where the filesystem has them, else copy_file_range
    (holes kept: only the stretches of data of a sparse file are copied)."""
    if can_clone[0]:
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return
        except OSError:
            can_clone[0] = False  # not on this filesystem pair: do not ask again
    if not sparse:
        copy_range(src, dst, 0, size)
        return
    for offset, length in data_segments(src, size):
        copy_range(src, dst, offset, length)
    os.ftruncate(dst, size)


def copy_range(src: int, dst: int, offset: int, length: int, in_place: bool = True) -> None:
    """Copy src[offset:offset+length] kernel-side: to the same offset of dst (in_place),
    or at dst's current position (into an archive)."""
    copied = 0
    try:
        while copied < length:
            at = offset + copied
            n = os.copy_file_range(src, dst, min(length - copied, COPY_CHUNK), at,
                                   at if in_place else None)  # fmt: skip
            if n == 0:
                raise ArchiveError("file shrank while being archived")
            copied += n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        if in_place:
            os.lseek(dst, offset + copied, os.SEEK_SET)
        while copied < length:
            n = os.sendfile(dst, src, offset + copied, min(length - copied, COPY_CHUNK))
            if n == 0:
                raise ArchiveError("file shrank while being archived") from None
            copied += n


def set_metadata(target: int | tuple[int, bytes], entry: Entry, xw: XattrWriter,
                 mode_is_set: bool = True) -> None:  # fmt: skip
    """Owner, mode, xattrs, then times, each only where the new entry differs.

    chown clears setuid bits and capabilities, so mode and xattrs come after it.
    Entries are created with their final permissions (umask 0): chmod is needed
    only for directories (made 0700 to be filled) and setuid/setgid/sticky bits.
    """
    st = entry.st
    is_link = stat.S_ISLNK(st.st_mode)
    fix_mode = not is_link and (not mode_is_set or st.st_mode & 0o7000)
    times = (st.st_atime_ns, st.st_mtime_ns)
    if isinstance(target, int):
        if (st.st_uid, st.st_gid) != creator():
            os.chown(target, st.st_uid, st.st_gid)
        if fix_mode:
            os.chmod(target, stat.S_IMODE(st.st_mode))
        if entry.xattrs:
            xw.set_all(target, entry.xattrs, entry.rel)
        os.utime(target, ns=times)
        return
    dir_fd, name = target
    if (st.st_uid, st.st_gid) != creator():
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
    if fix_mode:
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
    if entry.xattrs:
        xw.set_all(b"/proc/self/fd/%d/%s" % (dir_fd, name), entry.xattrs, entry.rel)
    os.utime(name, ns=times, dir_fd=dir_fd, follow_symlinks=False)


def write_copy(entries: Iterable[Entry], root_fd: int, archive: Archive, stats: Stats) -> None:
    """The tree under the (new, empty) directory root_fd."""
    old_umask = os.umask(0)  # entries are created with their own permissions
    try:
        copy_entries(entries, root_fd, archive, stats)
    finally:
        os.umask(old_umask)


def copy_entries(entries: Iterable[Entry], root_fd: int, archive: Archive, stats: Stats) -> None:
    """Each entry made by name in its destination directory, held open per depth.

    A directory gets its metadata when the walk leaves it (creating children
    changes its mtime, and its default ACL or setgid bit must not reach them):
    memory holds one directory per level, not one per directory.
    """
    xw = XattrWriter(archive.name, stats)
    links = Hardlinks()
    open_dirs: list[tuple[int, Entry]] = []  # the destination directory of each level
    can_clone = [True]
    try:
        for entry in entries:
            stats.entries += 1
            while len(open_dirs) > entry.depth:
                leave_dir(open_dirs.pop(), root_fd, xw, stats)
            stats.current = entry.rel
            if entry.depth == 0:  # the root is the temporary directory itself
                open_dirs.append((root_fd, entry))
                continue
            stats.bytes += copy_entry(entry, open_dirs[-1][0], root_fd, links, xw, can_clone,
                                      open_dirs)  # fmt: skip
        while open_dirs:
            leave_dir(open_dirs.pop(), root_fd, xw, stats)
    finally:
        for fd, _ in open_dirs:
            if fd != root_fd:
                os.close(fd)


def copy_entry(entry: Entry, parent: int, root_fd: int, links: Hardlinks, xw: XattrWriter,
               can_clone: list[bool], open_dirs: list[tuple[int, Entry]]) -> int:  # fmt: skip
    """Make one entry (a directory is left open on open_dirs); the bytes of data copied."""
    st, name = entry.st, entry.name
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        os.mkdir(name, 0o700, dir_fd=parent)
        open_dirs.append((os.open(name, DIR_FLAGS, dir_fd=parent), entry))
        return 0
    if is_hardlink(entry):
        first = links.first_link(st, entry.rel)
        if first is not None:
            link_at(root_fd, first, parent, name)
            return 0
    if stat.S_ISREG(mode):
        copy_file(entry, parent, xw, can_clone)
        return st.st_size
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(entry.name, dir_fd=entry.dir_fd), name, dir_fd=parent)
    elif stat.S_ISFIFO(mode):
        os.mkfifo(name, stat.S_IMODE(mode), dir_fd=parent)
    else:  # devices (whiteouts among them) and sockets
        os.mknod(name, mode, st.st_rdev, dir_fd=parent)
    set_metadata((parent, name), entry, xw)
    return 0


def leave_dir(level: tuple[int, Entry], root_fd: int, xw: XattrWriter, stats: Stats) -> None:
    fd, entry = level
    stats.current = entry.rel
    try:
        set_metadata(fd, entry, xw, mode_is_set=False)
    finally:
        if fd != root_fd:
            os.close(fd)


def link_at(root_fd: int, first: bytes, parent: int, name: bytes) -> None:
    """A hardlink to the copy's entry `first` (a path under root_fd, maybe past PATH_MAX)."""
    try:
        os.link(first, name, src_dir_fd=root_fd, dst_dir_fd=parent, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    *dirs, base = first.split(b"/")
    fd = os.dup(root_fd)
    try:
        for part in dirs:
            next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        os.link(base, name, src_dir_fd=fd, dst_dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(fd)


def copy_file(entry: Entry, parent: int, xw: XattrWriter, can_clone: list[bool]) -> None:
    src_fd = open_source(entry)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst_fd = os.open(entry.name, flags, stat.S_IMODE(entry.st.st_mode) & 0o777, dir_fd=parent)
        try:
            size = entry.st.st_size
            if size:
                copy_data(src_fd, dst_fd, size, can_clone, is_sparse(entry.st))
                if size >= WRITEBACK_SIZE:
                    start_writeback(dst_fd)
            set_metadata(dst_fd, entry, xw)
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
KERNEL_COPY_MIN = 1 << 16  # smaller file data goes through the buffer
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


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))  # the length counts its own digits
    return b"%d" % length + body


def xattr_keyword(name: str) -> bytes:
    """SCHILY.xattr.<name>, the name's raw bytes with "%" and "=" escaped as GNU tar
    does (a "=" would end the keyword), so that GNU tar restores the very name."""
    raw = os.fsencode(name).replace(b"%", b"%25").replace(b"=", b"%3D")
    return b"SCHILY.xattr." + raw


ACL_XATTRS = {"system.posix_acl_access": b"access", "system.posix_acl_default": b"default"}
ACL_TAGS = {0x01: b"user", 0x02: b"user", 0x04: b"group", 0x08: b"group", 0x10: b"mask",
            0x20: b"other"}  # fmt: skip
ACL_NAMED = (0x02, 0x08)
ACL_ENTRY = struct.Struct("<HHI")


def acl_text(value: bytes) -> bytes | None:
    """A POSIX ACL xattr (version 2) as the text GNU tar and bsdtar read from
    SCHILY.acl.*: one `tag:qualifier:rwx` per line, ids as numbers (the names of the
    container's users mean nothing on the host).  None if it is not a valid ACL."""
    body = value[4:]
    if len(value) < 4 or value[:4] != b"\x02\0\0\0" or len(body) % ACL_ENTRY.size:
        return None
    lines = []
    for tag, perm, ident in ACL_ENTRY.iter_unpack(body):
        if tag not in ACL_TAGS:
            return None
        qualifier = b"%d" % ident if tag in ACL_NAMED else b""
        perms = bytes(c if perm & bit else 45 for c, bit in ((114, 4), (119, 2), (120, 1)))
        lines.append(ACL_TAGS[tag] + b":" + qualifier + b":" + perms + b"\n")
    return b"".join(lines)


def xattr_records(xattrs: dict[str, bytes]) -> list[bytes]:
    """Every xattr as SCHILY.xattr.*; POSIX ACLs also as SCHILY.acl.*, which
    `tar --acls` and `bsdtar --acls` restore (as `tar --acls -c` writes them)."""
    records = []
    for name, value in xattrs.items():
        records.append(pax_record(xattr_keyword(name), value))
        kind = ACL_XATTRS.get(name)
        text = acl_text(value) if kind is not None else None
        if text is not None:
            records.append(pax_record(b"SCHILY.acl." + kind, text))
    return records


def pax_time(ns: int) -> bytes:
    """Seconds with nanoseconds; before 1970 the sign covers both (-0.5 s is "-0.5")."""
    sign = b"-" if ns < 0 else b""
    seconds, nanos = divmod(abs(ns), 1_000_000_000)
    return b"%s%d.%09d" % (sign, seconds, nanos)


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


def tar_header(entry: Entry, owner: tuple[int, int] | None, link_to: bytes | None,
               sparse: SparseMap | None = None) -> bytes:  # fmt: skip
    """The header blocks of one member: a PAX header first where ustar cannot hold it all."""
    st = entry.st
    name = member_name(entry)
    records = []
    if link_to is not None:
        typeflag, linkname, size = HARDLINK, link_to, 0
    else:
        typeflag = TYPEFLAGS[stat.S_IFMT(st.st_mode)]
        linkname = os.readlink(entry.name, dir_fd=entry.dir_fd) if typeflag == b"2" else b""
        size = st.st_size if typeflag == b"0" else 0
    if sparse is not None:  # PAX sparse format 1.0, as GNU tar --sparse writes it
        records += sparse.records(name)
        name, size = sparse.member_name(entry), sparse.member_size
    if owner is None:
        uid, gid = st.st_uid, st.st_gid
        uname, gname = user_name(uid), group_name(gid)
    else:
        (uid, gid), uname, gname = owner, b"", b""
    seconds = st.st_mtime_ns // 1_000_000_000
    if len(name) > 100:
        records.append(pax_record(b"path", name))
    if len(linkname) > 100:
        records.append(pax_record(b"linkpath", linkname))
    if uid > MAX_OCTAL_7:
        records.append(pax_record(b"uid", b"%d" % uid))
        uid = 0
    if gid > MAX_OCTAL_7:
        records.append(pax_record(b"gid", b"%d" % gid))
        gid = 0
    if size > MAX_OCTAL_11:
        records.append(pax_record(b"size", b"%d" % size))
    if st.st_mtime_ns % 1_000_000_000 or not 0 <= seconds <= MAX_OCTAL_11:
        records.append(pax_record(b"mtime", pax_time(st.st_mtime_ns)))
        seconds = min(max(seconds, 0), MAX_OCTAL_11)
    if len(uname) > 32:
        records.append(pax_record(b"uname", uname))
    if len(gname) > 32:
        records.append(pax_record(b"gname", gname))
    if entry.xattrs:
        records += xattr_records(entry.xattrs)
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


class SparseMap:
    """A file with holes as a PAX 1.0 sparse member: its data stretches, listed in a
    text map that precedes them in the member's data, so the archive holds the data
    only (GNU tar --sparse and bsdtar restore the holes)."""

    def __init__(self, segments: list[tuple[int, int]], size: int) -> None:
        self.segments = segments
        self.size = size
        lines = [b"%d\n" % (len(segments) + 1)]
        lines += [b"%d\n%d\n" % segment for segment in segments]
        lines.append(b"%d\n0\n" % size)  # the end of the file, as GNU tar marks it
        text = b"".join(lines)
        self.map = text + bytes(-len(text) % BLOCK)
        self.member_size = len(self.map) + sum(length for _, length in segments)

    def records(self, name: bytes) -> list[bytes]:
        return [
            pax_record(b"GNU.sparse.major", b"1"),
            pax_record(b"GNU.sparse.minor", b"0"),
            pax_record(b"GNU.sparse.name", name),
            pax_record(b"GNU.sparse.realsize", b"%d" % self.size),
        ]

    @staticmethod
    def member_name(entry: Entry) -> bytes:
        parent = entry.rel.rpartition(b"/")[0]
        return b"./" + (parent + b"/" if parent else b"") + b"GNUSparseFile.0/" + entry.name


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

    def copy_from(self, src: int, offset: int, length: int) -> None:
        """Kernel-side copy of file data straight into the archive (plain tar)."""
        self.raw.flush()
        copy_range(src, self.fd, offset, length, in_place=False)
        self.size += length


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

    def write_data(self, src: int, segments: Iterable[tuple[int, int]], size: int) -> None:
        """A regular file's data (the given stretches of it), padded to a whole block.
        Large stretches go kernel-side into a plain tar; small ones through the buffer,
        which saves a flush per file."""
        kernel_copy = self.stream is self.out and self.tar_digest is None
        for offset, length in segments:
            if kernel_copy and length >= KERNEL_COPY_MIN:
                self.out.copy_from(src, offset, length)
                self.written += length
            else:
                self.copy_through(src, offset, length)
        if size % BLOCK:
            self.write(bytes(-size % BLOCK))

    def copy_through(self, src: int, offset: int, length: int) -> None:
        view = memoryview(self.buffer)
        end = offset + length
        while offset < end:
            n = os.preadv(src, [view[: min(end - offset, READ_CHUNK)]], offset)
            if n == 0:
                raise ArchiveError("file shrank while being archived")
            self.write(view[:n])
            offset += n

    def finish(self) -> None:
        """The end-of-archive blocks, the record's padding, then the compressor's last blocks."""
        self.write(bytes(2 * BLOCK))
        self.write(bytes(-self.written % RECORD))
        if self.stream is not self.out:
            self.stream.close()  # flushes the compressor's last blocks into self.out
        self.out.flush()


def write_tar(entries: Iterable[Entry], fd: int, archive: Archive, stats: Stats,
              layer: bool = False) -> None:  # fmt: skip
    """Each entry as a member; hardlinks as link members, but whiteouts each their own.
    A layer is hashed for its descriptor and holds no sparse members (image-spec:
    sparse files SHOULD NOT be used in layers)."""
    sink = TarSink(fd, archive, hashing=layer)
    links = Hardlinks()
    for entry in entries:
        stats.current = entry.rel
        st = entry.st
        if stat.S_ISSOCK(st.st_mode):
            log.warning(
                "socket skipped: tar cannot hold one", archive=archive.name,
                entry=os.fsdecode(entry.rel),
            )  # fmt: skip
            continue
        link_to = links.first_link(st, member_name(entry)) if is_hardlink(entry) else None
        stats.entries += 1
        if link_to is None and stat.S_ISREG(st.st_mode) and st.st_size:
            write_file_member(sink, entry, archive.owner, sparse_ok=not layer)
            stats.bytes += st.st_size
        else:
            sink.write(tar_header(entry, archive.owner, link_to))
    stats.current = None
    sink.finish()
    stats.archive_bytes = sink.out.size
    if layer:
        stats.descriptor = layer_descriptor(sink, archive.compressor or "gzip")


def write_file_member(sink: TarSink, entry: Entry, owner: tuple[int, int] | None,
                      sparse_ok: bool) -> None:  # fmt: skip
    size = entry.st.st_size
    src = open_source(entry)
    try:
        sparse = None
        if sparse_ok and is_sparse(entry.st):
            segments = data_segments(src, size)
            if sum(length for _, length in segments) < size:
                sparse = SparseMap(segments, size)
        if sparse is None:
            sink.write(tar_header(entry, owner, None))
            sink.write_data(src, ((0, size),), size)
        else:
            sink.write(tar_header(entry, owner, None, sparse))
            sink.write(sparse.map)
            sink.write_data(src, sparse.segments, sparse.member_size)
    finally:
        os.close(src)


# ---------------------------------------------------------------------------
# Writer: oci-layer.  The upperdir in image-spec's layer encoding: whiteouts as
# .wh.<name> files, opaque directories with a .wh..wh..opq, overlay xattrs gone.
# ---------------------------------------------------------------------------

OCI_LAYER_MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
FUSE_OPAQUE_MARKERS = (OPAQUE_WHITEOUT, b".wh..opq")
OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")


def is_opaque(entry: Entry, upper: Upper) -> bool:
    return any(entry.xattrs.get(p + "opaque") == b"y" for p in upper.marker_prefixes)


def layer_xattrs(entry: Entry, upper: Upper, archive: str) -> dict[str, bytes]:
    """The xattrs without overlay markers.  An overlay xattr the container set itself
    (stored escaped since Linux 6.7) is dropped with a warning: an applier would take
    it for a marker (a trusted.overlay.opaque makes podman hide the image's files)."""
    kept = {}
    for name, value in entry.xattrs.items():
        user_name = upper.user_xattr(name)
        if user_name is None:
            continue  # this overlay's own marker
        if user_name.startswith(OVERLAY_XATTRS):
            log.warning(
                "xattr left out of the layer: appliers would take it for an overlay marker",
                archive=archive, entry=os.fsdecode(entry.rel), xattr=user_name,
            )  # fmt: skip
            continue
        kept[user_name] = value
    return kept


def oci_entries(entries: Iterable[Entry], upper: Upper, archive: str) -> Iterator[Entry]:
    """Convert overlay's encoding of changes into image-spec's, each path once."""
    whiteouts: list[set[bytes]] = [set()]  # per depth: the whiteout names made in that dir
    for entry in entries:
        st, depth = entry.st, entry.depth
        parent, _, name = entry.rel.rpartition(b"/")
        rel_dir = parent + b"/" if parent else b""
        if name.startswith(WHITEOUT_PREFIX):
            check_fuse_marker(entry, upper)
            if name in FUSE_OPAQUE_MARKERS:
                continue  # the directory's entry carries its opacity
            name = name[len(WHITEOUT_PREFIX) :]  # fuse-overlayfs's whiteout file for `name`
        elif not entry.is_whiteout:
            yield Entry(entry.rel, entry.dir_fd, entry.name, st,
                        layer_xattrs(entry, upper, archive), depth)  # fmt: skip
            if stat.S_ISDIR(st.st_mode):
                del whiteouts[depth + 1 :]
                whiteouts.append(set())
                if depth and (is_opaque(entry, upper) or upper.fuse and has_opq_file(entry)):
                    opq = entry.rel + b"/" + OPAQUE_WHITEOUT
                    yield Entry(opq, entry.dir_fd, OPAQUE_WHITEOUT, whiteout_file_stat(st), {},
                                depth + 1)  # fmt: skip
            continue
        if name in whiteouts[depth]:
            continue  # fuse-overlayfs wrote both a device and a file for it
        whiteouts[depth].add(name)
        yield Entry(rel_dir + WHITEOUT_PREFIX + name, entry.dir_fd, entry.name,
                    whiteout_file_stat(st), {}, depth)  # fmt: skip


def check_fuse_marker(entry: Entry, upper: Upper) -> None:
    """A .wh.* name is a marker only where fuse-overlayfs wrote it; elsewhere it is
    the container's own file, which a layer cannot hold (image-spec reserves the
    prefix: an applier would delete or hide files of the image instead)."""
    if not upper.fuse:
        raise ArchiveError(
            f"{os.fsdecode(entry.rel)}: a name starting with .wh. cannot be in an OCI layer "
            "(image-spec reserves it for whiteouts); use another method for this mount"
        )


def has_opq_file(entry: Entry) -> bool:
    try:
        os.stat(entry.name + b"/" + OPAQUE_WHITEOUT, dir_fd=entry.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


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
# Writer: oci-image.  archive-to is an OCI image layout (image-spec
# image-layout.md); the layer, exactly as oci-layer writes it, becomes a new
# revision: a config and a manifest on top of a base revision, then index.json,
# rewritten under an fcntl lock on index.lock, names it image-tag.
# ---------------------------------------------------------------------------

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE, INDEX_FILE, LOCK_FILE = "oci-layout", "index.json", "index.lock"
MAX_JSON_BLOB = 4 << 20  # image-spec: registries may refuse manifests over 4 MiB
# image-spec annotations.md: ref ::= component ("/" component)*, component ::=
# alphanum (separator alphanum)*, alphanum ::= [A-Za-z0-9]+, separator ::= [-._:@+] | "--"
REF_NAME_RE = re.compile(r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*")
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
          "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}  # fmt: skip


def is_ref_name(value: str) -> bool:
    return all(REF_NAME_RE.fullmatch(c) for c in value.split("/"))


class Base:
    """The revision a new one goes on top of; None fields for a first revision."""

    def __init__(self, manifest: dict, config: dict, digest: str | None = None,
                 name: str | None = None) -> None:  # fmt: skip
        self.manifest = manifest
        self.config = config
        self.digest = digest
        self.name = name


class Layout:
    """An OCI image layout directory, held open: its blobs, its index and its lock."""

    def __init__(self, path: str, allow_dirs: tuple[str, ...], create: bool) -> None:
        self.path = check_allowed(path, allow_dirs, "archive-to")
        try:
            self.fd = open_dir_nofollow(self.path, create=create)
        except OSError as exc:
            raise ArchiveError(f"cannot open the image layout: {describe(exc)}") from None
        self.blobs_fd: int | None = None
        self.shown_blobs = posixpath.join(self.path, "blobs", "sha256")

    def close(self) -> None:
        for fd in (self.blobs_fd, self.fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive fcntl (POSIX record) lock on index.lock, as podman's stores take."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(LOCK_FILE, flags, 0o644, dir_fd=self.fd)
        except OSError as exc:
            exc.filename = posixpath.join(self.path, LOCK_FILE)
            raise ArchiveError(f"cannot open the layout's lock: {describe(exc)}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def read_file(self, name: str) -> bytes | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        with open(fd, "rb") as f:
            return f.read()

    def ensure_layout(self, create: bool) -> None:
        """An empty (or new) directory becomes an empty layout; any other must be one."""
        if self.read_file(INDEX_FILE) is None and self.is_empty():
            if not create:
                raise self.not_a_layout("it is empty")
            with self.locked():
                if self.read_file(INDEX_FILE) is None and self.is_empty():
                    if self.read_file(LAYOUT_FILE) is None:
                        self.write(LAYOUT_FILE, {"imageLayoutVersion": "1.0.0"})
                    self.write(INDEX_FILE, {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE,
                                            "manifests": []})  # fmt: skip
        version = self.load(LAYOUT_FILE, "its oci-layout file")
        if not str(version.get("imageLayoutVersion", "")).startswith("1."):
            raise self.not_a_layout("oci-layout has no imageLayoutVersion 1.x")
        self.read_index()

    def is_empty(self) -> bool:
        """Nothing but what a first commit may have left: lock, blobs, oci-layout, temporaries."""
        made = (LOCK_FILE, "blobs", LAYOUT_FILE)
        return all(n in made or TMP_MARK in n for n in os.listdir(self.fd))

    def not_a_layout(self, why: str) -> ArchiveError:
        return ArchiveError(f"archive-to {self.path} is not an OCI image layout: {why}")

    def load(self, name: str, what: str) -> dict:
        data = self.read_file(name)
        if data is None:
            raise self.not_a_layout(f"no {name}")
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            raise self.not_a_layout(f"{what} is not valid JSON") from None
        if not isinstance(value, dict):
            raise self.not_a_layout(f"{what} is not a JSON object")
        return value

    def read_index(self) -> dict:
        index = self.load(INDEX_FILE, INDEX_FILE)
        manifests = index.get("manifests")
        if index.get("schemaVersion") != 2 or not isinstance(manifests, list):
            raise self.not_a_layout("index.json is not an image index (schemaVersion 2)")
        if not all(is_descriptor(d) for d in manifests):
            raise self.not_a_layout("index.json holds a malformed descriptor")
        return index

    def write(self, name: str, value: dict) -> None:
        write_file_at(self.fd, name, canonical_json(value), self.path)

    def open_blobs(self) -> int:
        if self.blobs_fd is None:
            try:
                self.blobs_fd = open_dir_nofollow(self.shown_blobs, create=True)
            except OSError as exc:
                raise ArchiveError(f"cannot open the layout's blobs: {describe(exc)}") from None
            remove_stale_temporaries(self.blobs_fd, None, self.shown_blobs)
        return self.blobs_fd

    def read_blob(self, digest: str, what: str) -> dict:
        """A JSON blob, checked against its digest."""
        if not DIGEST_RE.fullmatch(digest):
            raise ArchiveError(f"{what} {digest!r} is not a sha256 digest")
        name = digest.removeprefix("sha256:")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self.open_blobs())  # fmt: skip
        except FileNotFoundError:
            raise ArchiveError(f"{what} {digest}: no such blob in {self.path}") from None
        with open(fd, "rb") as f:
            data = f.read(MAX_JSON_BLOB + 1)
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ArchiveError(f"{what} {digest}: the blob does not match its digest")
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise ArchiveError(f"{what} {digest} is not a JSON object")
        return value

    def put_json_blob(self, value: dict, media_type: str) -> dict:
        """A JSON blob written (or found already there) under its digest: its descriptor."""
        data = canonical_json(value)
        digest = hashlib.sha256(data).hexdigest()
        blobs_fd = self.open_blobs()
        old = lstat_at(blobs_fd, digest)
        if old is None or not stat.S_ISREG(old.st_mode) or old.st_size != len(data):
            write_file_at(blobs_fd, digest, data, self.shown_blobs)
        return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}

    def put_layer(self, archive: Archive, entries: Iterable[Entry], upper: Upper,
                  stats: Stats) -> None:  # fmt: skip
        """The layer as oci-layer writes it, through a locked temporary, kept under its digest."""
        blobs_fd = self.open_blobs()
        tmp = temp_name("blob")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644, dir_fd=blobs_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a live temporary: see is_stale
            write_tar(oci_entries(entries, upper, archive.name), fd, archive, stats, layer=True)
            stats.current = None
            os.fsync(fd)
            assert stats.descriptor is not None
            name = stats.descriptor["digest"].removeprefix("sha256:")
            old = lstat_at(blobs_fd, name)
            if old is not None and stat.S_ISREG(old.st_mode) and old.st_size == stats.archive_bytes:
                os.unlink(tmp, dir_fd=blobs_fd)  # the same layer is there already
            else:
                os.rename(tmp, name, src_dir_fd=blobs_fd, dst_dir_fd=blobs_fd)
            os.fsync(blobs_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=blobs_fd)
            raise
        finally:
            os.close(fd)


def is_descriptor(value: object) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("digest"), str)
        and isinstance(value.get("annotations", {}), dict)
    )


def canonical_json(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def find_base(layout: Layout, index: dict, archive: Archive) -> Base | None:
    """image-base (a ref name or a manifest digest), else what image-tag names now."""
    wanted = archive.image_base or archive.image_tag
    if DIGEST_RE.fullmatch(wanted):
        digest, name = wanted, None
    elif archive.image_base and not is_ref_name(wanted):
        raise ArchiveError(f"image-base {wanted!r} is neither a ref name nor a sha256 digest")
    else:
        named = [d for d in index["manifests"] if d.get("annotations", {}).get(REF_NAME) == wanted]
        if not named:
            if archive.image_base:
                raise ArchiveError(f"image-base {wanted!r} is not in {layout.path}/index.json")
            return None  # a first revision
        if named[-1].get("mediaType", MANIFEST_MEDIA_TYPE) != MANIFEST_MEDIA_TYPE:
            raise ArchiveError(f"{wanted!r} in {layout.path} is not an image manifest")
        digest, name = named[-1]["digest"], wanted
    manifest = layout.read_blob(digest, "base manifest")
    check_manifest(manifest, digest)
    config = layout.read_blob(manifest["config"]["digest"], "base config")
    check_config(config, len(manifest["layers"]), manifest["config"]["digest"])
    return Base(manifest, config, digest, name)


def check_manifest(manifest: dict, digest: str) -> None:
    config, layers = manifest.get("config"), manifest.get("layers")
    if (
        manifest.get("schemaVersion") != 2
        or manifest.get("mediaType", MANIFEST_MEDIA_TYPE) != MANIFEST_MEDIA_TYPE
        or not isinstance(config, dict)
        or not isinstance(config.get("digest"), str)
        or not isinstance(layers, list)
    ):
        raise ArchiveError(f"base {digest} is not an OCI image manifest")
    if config.get("mediaType") != CONFIG_MEDIA_TYPE:
        raise ArchiveError(
            f"base {digest}: its config is {config.get('mediaType')!r}, not an image config"
        )


def check_config(config: dict, layers: int, digest: str) -> None:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if (
        not isinstance(rootfs, dict)
        or rootfs.get("type") != "layers"
        or not isinstance(diff_ids, list)
        or len(diff_ids) != layers
        or not isinstance(config.get("history", []), list)
    ):
        raise ArchiveError(
            f"base config {digest} is not an image config (rootfs.diff_ids, one per layer)"
        )


def first_config() -> dict:
    """The config of a revision with no base: this host's platform, no layers yet."""
    machine = os.uname().machine
    return {"architecture": GOARCH.get(machine, machine), "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []}, "history": []}  # fmt: skip


def new_config(base: Base | None, layer: dict, archive: Archive, info: RunInfo) -> dict:
    config = json.loads(json.dumps(base.config)) if base is not None else first_config()
    config["created"] = info.created
    config["rootfs"]["diff_ids"].append(layer["diff_id"])
    comment = f"container {info.container_id} archive {archive.name}"
    config.setdefault("history", []).append(
        {
            "created": info.created,
            "created_by": f"archive_overlay {__version__}",
            "comment": comment,
        }
    )
    return config


def new_manifest(base: Base | None, layer: dict, config: dict, info: RunInfo) -> dict:
    layers = list(base.manifest["layers"]) if base is not None else []
    layers.append({k: layer[k] for k in ("mediaType", "digest", "size")})
    annotations = {"org.opencontainers.image.created": info.created}
    if base is not None:
        annotations["org.opencontainers.image.base.digest"] = base.digest
        if base.name is not None:
            annotations["org.opencontainers.image.base.name"] = base.name
    return {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": config,
            "layers": layers, "annotations": annotations}  # fmt: skip


def tag_revision(layout: Layout, manifest: dict, tag: str) -> None:
    """index.json with the new manifest named `tag`; its former holder kept, unnamed."""
    with layout.locked():
        index = layout.read_index()
        for descriptor in index["manifests"]:
            annotations = descriptor.get("annotations")
            if isinstance(annotations, dict) and annotations.get(REF_NAME) == tag:
                del annotations[REF_NAME]
                if not annotations:
                    del descriptor["annotations"]
        index["manifests"].append({**manifest, "annotations": {REF_NAME: tag}})
        layout.write(INDEX_FILE, index)


def write_revision(archive: Archive, upper: Upper, allow_dirs: tuple[str, ...],
                   info: RunInfo, excluded: frozenset[bytes] = frozenset()) -> Stats:  # fmt: skip
    """Layer, config, manifest, each fsync'd under its digest; only then index.json."""
    if not archive.image_tag:
        raise ArchiveError(f"method {archive.method} needs an image-tag")
    if not is_ref_name(archive.image_tag):
        raise ArchiveError(f"image-tag {archive.image_tag!r} is not a valid ref name")
    create = not archive.image_base  # a named base must be there already: nothing made
    layout = Layout(archive.archive_to, allow_dirs, create)
    stats = Stats()
    try:
        layout.ensure_layout(create)
        base = find_base(layout, layout.read_index(), archive)  # all checked before writing
        layout.put_layer(archive, walk(upper, excluded), upper, stats)
        assert stats.descriptor is not None
        config = new_config(base, stats.descriptor, archive, info)
        config_descriptor = layout.put_json_blob(config, CONFIG_MEDIA_TYPE)
        manifest = new_manifest(base, stats.descriptor, config_descriptor, info)
        stats.descriptor = layout.put_json_blob(manifest, MANIFEST_MEDIA_TYPE)
        tag_revision(layout, stats.descriptor, archive.image_tag)
    except OSError as exc:
        if stats.current is not None:
            raise ArchiveError(failure(exc, upper, layout.path, stats)) from None
        raise ArchiveError(f"image layout {layout.path}: {describe(exc)}") from None
    finally:
        layout.close()
    return stats


# ---------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------


def archive_one(archive: Archive, config: dict, bundle: str, opts: Options,
                info: RunInfo) -> None:  # fmt: skip
    started = time.monotonic()
    expand_placeholders(archive, info)
    excluded = parse_exclude(archive.exclude)
    upper = locate_upper(archive.mount_point, config, bundle, opts.mount_program)
    log.debug("upperdir found", archive=archive.name, upperdir=upper.path,
              markers=",".join(upper.marker_prefixes))  # fmt: skip
    if archive.success:
        check_allowed(archive.success, opts.allow_dirs, "success")
    if archive.method in IMAGE_METHODS:
        stats = write_revision(archive, upper, opts.allow_dirs, info, excluded)
    else:
        dest = Destination(archive.archive_to, opts.allow_dirs, archive.name)
        log.debug("writing to a temporary", archive=archive.name,
                  path=posixpath.join(dest.parent, dest.tmp_name))  # fmt: skip
        try:
            for name in (dest.name, dest.name + ".json"):
                remove_stale_temporaries(dest.dir_fd, name, dest.parent)
            stats = write_archive(archive, upper, dest, excluded)
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
        **({"xattrs_not_kept": stats.xattrs_not_kept} if stats.xattrs_not_kept else {}),
        **revision_fields(archive, stats),
        seconds=round(time.monotonic() - started, 3),
    )


def revision_fields(archive: Archive, stats: Stats) -> dict[str, str]:
    """oci-image: the new revision's manifest digest and its tag, for the log."""
    if archive.method not in IMAGE_METHODS or stats.descriptor is None:
        return {}
    return {"manifest": stats.descriptor["digest"], "image_tag": archive.image_tag}


def write_archive(archive: Archive, upper: Upper, dest: Destination,
                  excluded: frozenset[bytes] = frozenset()) -> Stats:  # fmt: skip
    is_dir = archive.method == "copy"
    dest.check_kind(is_dir)
    stats = Stats()
    companions: tuple[tuple[str, str], ...] = ()
    try:
        try:
            write_temporary(archive, upper, dest, stats, excluded)
            if stats.descriptor is not None:  # the layer and its descriptor go in together
                data = json.dumps(stats.descriptor, indent=2).encode() + b"\n"
                json_name = dest.name + ".json"
                companions = ((write_temp_file(dest.dir_fd, json_name, data), json_name),)
            started = time.monotonic()
            dest.commit(is_dir, companions)
            log.debug("archive renamed into place", archive=archive.name,
                      seconds=round(time.monotonic() - started, 3))  # fmt: skip
        except OSError as exc:
            raise ArchiveError(failure(exc, upper, dest.path, stats)) from None
    except BaseException:
        dest.discard_temp()
        for tmp, _ in companions:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dest.dir_fd)
        raise
    return stats


def write_temporary(archive: Archive, upper: Upper, dest: Destination, stats: Stats,
                    excluded: frozenset[bytes]) -> None:  # fmt: skip
    """The whole archive under its temporary name, durable on disk."""
    entries = walk(upper, excluded)
    clock = [time.monotonic()]
    if archive.method == "copy":
        root_fd = dest.make_temp_dir()
        write_copy(entries, root_fd, archive, stats)
        stats.current = None
        clock.append(time.monotonic())
        syncfs(root_fd)
    else:
        fd = dest.make_temp_file()
        if archive.method.startswith("oci-layer"):
            write_tar(oci_entries(entries, upper, archive.name), fd, archive, stats, layer=True)
        else:
            write_tar(entries, fd, archive, stats)
        stats.current = None
        clock.append(time.monotonic())
        os.fsync(fd)
    clock.append(time.monotonic())
    log.debug("archive written to its temporary", archive=archive.name,
              walk_write_seconds=round(clock[1] - clock[0], 3),
              sync_seconds=round(clock[2] - clock[1], 3))  # fmt: skip


def failure(exc: OSError, upper: Upper, target: str, stats: Stats) -> str:
    """What failed, naming the entry being archived when there was one."""
    if stats.current is None:
        return f"cannot write {target}: {exc.strerror or exc}"
    entry = upper.path if stats.current == b"." else f"{upper.path}/{os.fsdecode(stats.current)}"
    return f"cannot archive {entry} into {target}: {exc.strerror or exc}"


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
    container_id = state.get("id")
    info = RunInfo(container_id if isinstance(container_id, str) else None, time.gmtime())
    failed = 0
    for archive in archives:  # every archive is attempted, whatever the others did
        if archive.refused:
            failed += 1
            log_refused(archive)
            continue
        try:
            archive_one(archive, config, state["bundle"], opts, info)
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


def log_refused(archive: Archive) -> None:
    """One error line for an archive whose annotations cannot be honoured."""
    reasons = [why for _, why in archive.refused]
    if any(why.startswith(UNKNOWN_ARG) for why in reasons):
        reasons.append(f"known arguments: {', '.join(ARGS)}")
    log.error(
        "archive failed",
        archive=archive.name,
        annotation=",".join(key for key, _ in archive.refused),
        error="; ".join(reasons) + ": archive not written",
    )


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
                     oci-layer | oci-layer+zstd (an OCI image layer + <archive-to>.json) |
                     oci-image | oci-image+zstd (a tagged revision in the OCI image
                     layout archive-to)
  tar-content-owner  UID or UID:GID written as the owner of every tar entry
  compression-level  gzip: 0-3 (default 2), zstd: 1-22 (default 3)
  exclude            absolute paths in the mount, ':' or ',' separated, left out
  image-tag          oci-image: the ref name the new revision gets (required)
  image-base         oci-image: the revision it goes on, a ref name or sha256
                     digest (default: what image-tag names now)
\b
mount-point / means the container's root filesystem (config.json root.path).
archive-to, success and image-tag may hold {{id}} (the container's id), {{name}}
(the archive's NAME), {{time}} (UTC, e.g. 20261127T093015Z); {{{{ and }}}} are braces.
\b
An annotation that cannot be honoured (a misspelt method or arg, a bad owner
or level, only one of mount-point and archive-to) fails its archive.
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
@click.version_option(__version__, "--version", "-v", prog_name="archive_overlay")
@click.argument("ignored", nargs=-1, metavar="")
def main(log_level: str, use_syslog: bool, log_file: str | None, mount_program: str,
         allow_dirs: tuple[str, ...], ignored: tuple[str, ...]) -> None:  # fmt: skip
    configure_logging(log_level.lower(), use_syslog, log_file)
    if ignored:  # as the Go hook did: a stray word in a hooks.d file must not stop archives
        log.warning("extra command-line arguments ignored", arguments=" ".join(ignored))
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
