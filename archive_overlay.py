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
destination (safe and atomic), the writers, pushing a revision to a registry,
then the command.
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
import io
import json
import marshal
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
    "exclude", "image-tag", "image-base", "image-max-layers", "image-keep", "image-push",
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
DEFAULT_MAX_LAYERS = 100  # under every engine's limit: see README, "Chains that last"
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
        self.max_layers: int | None = None  # image-max-layers: None is DEFAULT_MAX_LAYERS
        self.keep: int | None = None  # image-keep: None keeps every revision
        # archive-to or image-tag held {time}: one archive per run, never a replacement.
        self.archive_to_once = False
        self.image_tag_once = False
        self.image_push = ""  # a registry reference: host[:port]/repo[:tag]
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


def parse_count(value: str) -> int | None:
    """A positive decimal integer (at most 9 digits), else None."""
    if not (value.isascii() and value.isdigit() and len(value) <= 9) or int(value) < 1:
        return None
    return int(value)


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
    elif arg == "image-max-layers":
        archive.max_layers = parse_count(value)
        if archive.max_layers is None or archive.max_layers < 2:
            return f"invalid image-max-layers {value[:40]!r}: an integer, 2 or more"
    elif arg == "image-keep":
        archive.keep = parse_count(value)
        if archive.keep is None:
            return f"invalid image-keep {value[:40]!r}: an integer, 1 or more"
    elif arg == "image-push":
        archive.image_push = value
        return push_ref_template_problem(value, archive.name)
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
    image_args = (
        ("image-tag", archive.image_tag), ("image-base", archive.image_base),
        ("image-max-layers", archive.max_layers is not None),
        ("image-keep", archive.keep is not None), ("image-push", archive.image_push),
    )  # fmt: skip
    for arg, value in image_args:
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

    def __init__(self, container_id: str | None, when: time.struct_time,
                 microseconds: int = 0) -> None:  # fmt: skip
        self.container_id = container_id
        self.when = when  # UTC
        self.microseconds = microseconds

    @property
    def stamp(self) -> str:
        """{time} in a path or a ref name: 20261127T093015.123456Z."""
        return time.strftime("%Y%m%dT%H%M%S", self.when) + f".{self.microseconds:06d}Z"

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
    """archive-to, success, image-tag and image-push with the run's values put in."""
    values = {"id": info.container_id, "name": archive.name, "time": info.stamp}
    for key in ("id", "name"):  # one path component each: never a way up or down
        value = values[key]
        if value is not None and ("/" in value or "\0" in value or value in ("", ".", "..")):
            values[key] = None
    archive.archive_to_once = holds_time(archive.archive_to)
    archive.image_tag_once = holds_time(archive.image_tag)
    archive.archive_to = expand(archive.archive_to, values, "archive-to")
    archive.success = expand(archive.success, values, "success")
    archive.image_tag = expand(archive.image_tag, values, "image-tag")
    archive.image_push = expand(archive.image_push, values, "image-push")
    why = push_ref_problem(archive.image_push) if archive.image_push else None
    if why is not None:
        raise ArchiveError(why)


def holds_time(template: str) -> bool:
    """Whether a template holds the {time} placeholder ({{time}} is literal text)."""
    return "{time}" in template.replace("{{", "").replace("}}", "")


# ---------------------------------------------------------------------------
# Finding the upperdir of a mount.
# ---------------------------------------------------------------------------


ESCAPED = "overlay."


class Upper:
    """An upperdir and the xattr namespaces its overlay keeps markers in."""

    def __init__(self, path: str, marker_prefixes: tuple[str, ...], fuse: bool = False,
                 lowers: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.path = path
        self.marker_prefixes = marker_prefixes  # e.g. ("trusted.overlay.",)
        self.fuse = fuse  # fuse-overlayfs: its .wh.* files are markers too
        self.lowers = lowers  # the image's layers under it, topmost first

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
    return Upper(opts["upperdir"], prefixes, fuse, lower_dirs(options, opts["upperdir"]))


def lower_dirs(options: list[str], upperdir: str) -> tuple[str, ...]:
    """The lower layers, topmost first: `lowerdir=A:B` (`\\:` a colon in a name) or one
    `lowerdir+=A` per layer.  A relative one is containers-storage's `l/<link>`, relative
    to its overlay directory (it mounts from there when the options are long), which
    holds the upperdir's layer."""
    lowers: list[str] = []
    for option in options:
        key, _, value = option.partition("=")
        if key == "lowerdir":
            lowers += [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", value) if p]
        elif key == "lowerdir+" and value:
            lowers.append(value)
    store = posixpath.dirname(posixpath.dirname(upperdir))
    return tuple(p if p.startswith("/") else posixpath.join(store, p) for p in lowers)


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
    and `lower` (its image's layers, `l/<link>` relative to the store's overlay
    directory); `merged` is gone once unmounted.  The markers' namespace is the
    store's, not that of the user namespace the hook runs in (root may archive
    a rootless user's layer): see store_markers.
    """
    layer, name = posixpath.split(root_path)
    diff = posixpath.join(layer, "diff")
    if name != "merged" or not os.path.isdir(diff):
        return None
    if not all(os.path.isfile(posixpath.join(layer, f)) for f in ("link", "lower")):
        return None
    try:
        with open(posixpath.join(layer, "lower")) as f:
            lower = f.read().strip()
    except OSError as exc:
        raise ArchiveError(f"cannot read {layer}/lower: {exc.strerror}") from None
    fuse, userxattr = store_markers(posixpath.dirname(layer), diff)
    options = [f"upperdir={diff}", f"lowerdir={lower}"] + (["userxattr"] if userxattr else [])
    return upper_from_options(options, fuse=fuse)


def store_markers(store: str, diff: str) -> tuple[bool, bool]:
    """(fuse-overlayfs, user.overlay.*) for a layer of the store's overlay directory.

    fuse-overlayfs wrote it if the store's `.has-mount-program` says `true`.
    Else the kernel's own xattrs on the upperdir's root (overlay.uuid, .impure,
    .origin, set at mount) name the namespace: trusted.overlay.* first, as a
    rootful container may set user.overlay.* on its own root as data.  Without
    them, a store is rootless (userxattr) when its owner is not root, or when
    the hook runs in a user namespace (`podman unshare`).
    """
    try:
        with open(posixpath.join(store, ".has-mount-program")) as f:
            if f.read().strip() == "true":
                return True, False
    except OSError:
        pass
    names = read_xattrs(os.fsencode(diff))
    for prefix, userxattr in (("trusted.overlay.", False), ("user.overlay.", True)):
        if any(n.startswith(prefix) and not n.startswith(prefix + ESCAPED) for n in names):
            return False, userxattr
    try:
        owner = os.stat(store).st_uid
    except OSError as exc:
        raise ArchiveError(f"cannot read the store {store}: {exc.strerror}") from None
    return False, owner != 0 or in_user_namespace()


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
# exclude's paths as the container saw them: resolved through the symlinks of
# its view, the upperdir over its image's lower layers (readable at poststop).
# ---------------------------------------------------------------------------

MAX_SYMLINKS = 40  # as the kernel's path walk


class View:
    """A merged view of layers (topmost first), read as overlayfs shows them but
    without mounting: the container's (the upperdir over the lower layers) or the
    image's (the lower layers alone).  Every layer keeps markers as the upperdir does."""

    def __init__(self, upper: Upper, layers: Iterable[str]) -> None:
        self.upper = upper
        self.layers = [os.fsencode(p) for p in layers]

    def lookup(self, dirs: list[bytes], name: bytes) -> tuple[os.stat_result | None, list[bytes]]:
        """`name` in the directory the layers' `dirs` make: its stat and paths (a directory's
        in every layer that adds to it, topmost first); (None, []) if absent or deleted."""
        found: list[bytes] = []
        first = None
        for d in dirs:
            path = d + b"/" + name
            st = lstat_or_none(path)
            if st is None:
                if self.upper.fuse and lstat_or_none(d + b"/" + WHITEOUT_PREFIX + name) is not None:
                    break  # fuse-overlayfs's whiteout file
                continue
            if is_whiteout_stat(st) or (found and not stat.S_ISDIR(st.st_mode)):
                break  # deleted here, or a file under a directory: hidden
            if first is None:
                first = st
            found.append(path)
            if not stat.S_ISDIR(st.st_mode) or is_opaque_dir(self.upper, path):
                break
        return first, found

    def resolve(self, rel: bytes) -> tuple[bytes, bool]:
        """rel with the symlinks of its directories resolved (the last name is not followed,
        as rm does not follow it), and whether it is in this view."""
        names: list[bytes] = []  # resolved so far
        levels = [self.layers]  # the layers' dirs making each resolved directory
        todo = rel.split(b"/")[::-1]
        links = 0
        while todo:
            name = todo.pop()
            if name in (b"", b"."):
                continue
            if name == b"..":
                if names:
                    names.pop()
                    levels.pop()
                continue
            st, paths = self.lookup(levels[-1], name)
            if not todo or st is None or not (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                return b"/".join([*names, name, *todo[::-1]]), st is not None and not todo
            if stat.S_ISLNK(st.st_mode):
                links += 1
                target = os.readlink(paths[0]) if links <= MAX_SYMLINKS else b""
                if not target:
                    return b"/".join([*names, name, *todo[::-1]]), False
                if target.startswith(b"/"):
                    del names[:], levels[1:]
                todo += target.split(b"/")[::-1]
                continue
            names.append(name)
            levels.append(paths)
        return b"/".join(names), True


def lstat_or_none(path: bytes) -> os.stat_result | None:
    """None for a path that is not there, or that no file can have (a NUL, too long a name)."""
    try:
        return os.stat(path, follow_symlinks=False)
    except ValueError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            return None
        raise ArchiveError(f"cannot read {os.fsdecode(path)}: {exc.strerror}") from None


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque_dir(upper: Upper, path: bytes) -> bool:
    """A directory the overlay marked opaque (deleted, then made again)."""
    for prefix in upper.marker_prefixes:
        try:
            if os.getxattr(path, prefix + "opaque", follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass  # none, or a namespace this process cannot read
    return upper.fuse and lstat_or_none(path + b"/" + OPAQUE_WHITEOUT) is not None


def container_paths(excluded: frozenset[bytes], upper: Upper, archive: Archive) -> frozenset[bytes]:
    """exclude's paths where the upperdir holds what the container saw at them.

    A path is resolved through the symlinks of the container's view (a merged-/usr
    image's /lib, /var/run -> ../run), or of the image's where the container deleted
    it; one that is in neither is warned about.  A layer cannot leave out a path of
    the image that a directory the container deleted (or deleted and made again, or
    replaced) hides: that fails the archive, see hiding_dir.
    """
    container = View(upper, (upper.path, *upper.lowers))
    image = View(upper, upper.lowers)
    paths = set()
    for rel in sorted(excluded):
        shown = "/" + os.fsdecode(rel)
        path, seen = container.resolve(rel)
        in_image = image.resolve(path) == (path, True)
        if not seen and not in_image:  # deleted: the image's view of it
            deleted, in_image = image.resolve(rel)
            path = deleted if in_image else path
        if not seen and not in_image:
            log.warning("exclude path matches nothing in the container's view",
                        archive=archive.name, exclude=shown)  # fmt: skip
        elif path != rel:
            log.debug("exclude path resolved", archive=archive.name, exclude=shown,
                      path="/" + os.fsdecode(path))  # fmt: skip
        hidden_by = hiding_dir(upper, path) if in_image else None
        if hidden_by is not None and archive.method.startswith("oci-"):
            raise ArchiveError(
                f"exclude path {shown} is in /{os.fsdecode(hidden_by)}, which the container "
                "deleted or replaced: a layer cannot leave it out and keep the image's"
            )
        paths.add(path)
    return frozenset(paths)


def hiding_dir(upper: Upper, rel: bytes) -> bytes | None:
    """The directory above rel that the upperdir deletes (a whiteout), replaces (a file),
    or deletes and makes again (opaque), hiding all the image had under it; or None."""
    d = os.fsencode(upper.path)
    parts = rel.split(b"/")[:-1]
    for i, name in enumerate(parts):
        path = d + b"/" + name
        st = lstat_or_none(path)
        if st is None:
            deleted = upper.fuse and lstat_or_none(d + b"/" + WHITEOUT_PREFIX + name) is not None
            return b"/".join(parts[: i + 1]) if deleted else None
        if not stat.S_ISDIR(st.st_mode) or is_opaque_dir(upper, path):
            return b"/".join(parts[: i + 1])
        d = path
    return None


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
        return is_whiteout_stat(self.st)


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
    not the excluded paths, nor anything under them, nor fuse-overlayfs's .wh.<name> file
    of one (no marker is kept or made for them).

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
            if rel in excluded or upper.fuse and marks_excluded(prefix, name, excluded):
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


def marks_excluded(prefix: bytes, name: bytes, excluded: frozenset[bytes]) -> bool:
    """fuse-overlayfs's whiteout file .wh.<name> of an excluded path: no marker is kept."""
    return name.startswith(WHITEOUT_PREFIX) and prefix + name[len(WHITEOUT_PREFIX) :] in excluded


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
    try:
        if name in ("", ".", ".."):
            parent, name = posixpath.split(os.path.realpath(path))
        real = posixpath.join(os.path.realpath(parent), name)
    except OSError as exc:  # a component changed while it was read (a link, then no link)
        raise ArchiveError(f"cannot resolve {what} {path}: {describe(exc)}") from None
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


# What a temporary's name adds to its stem: the mark, a pid (up to pid_max 4194304), 8 hex.
TMP_TAIL = len(TMP_MARK) + 7 + 1 + 8


def name_max(dir_fd: int | None) -> int:
    """The longest name, in bytes, the directory's filesystem takes."""
    try:
        return 255 if dir_fd is None else os.fpathconf(dir_fd, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def temp_stem(name: str, dir_fd: int | None = None) -> str:
    """What the temporaries for `name` start with: `.name`, or, where that leaves too
    little room for the rest, `.` + the name's first bytes + `~` + a checksum of it."""
    raw = os.fsencode(name)
    room = name_max(dir_fd) - TMP_TAIL - 1  # for the name, after the "."
    if len(raw) <= room:
        return f".{name}"
    return f".{os.fsdecode(raw[: room - 9])}~{zlib.crc32(raw):08x}"


def temp_name(name: str, dir_fd: int | None = None) -> str:
    """A temporary beside `name` (in dir_fd), recognisable as ours and as whose (the pid),
    short enough for the filesystem whatever the length of `name`."""
    return f"{temp_stem(name, dir_fd)}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"


def remove_stale_temporaries(dir_fd: int, name: str | None, shown_dir: str) -> None:
    """Temporaries for `name` (for any name: None) left by runs killed mid-write
    (SIGKILL): remove them."""
    prefix = "." if name is None else f"{temp_stem(name, dir_fd)}{TMP_MARK}"
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

    def __init__(self, archive_to: str, allow_dirs: tuple[str, ...], archive: str = "",
                 replace: bool = True) -> None:  # fmt: skip
        real = check_allowed(archive_to, allow_dirs, "archive-to")
        self.path = archive_to
        self.archive = archive  # its name, for the log
        self.replace = replace  # False: an archive already at archive-to fails this one
        self.parent, self.name = posixpath.split(real)
        try:
            self.dir_fd = open_dir_nofollow(self.parent, create=True)
        except OSError as exc:
            raise ArchiveError(
                f"cannot open {self.parent}, the directory of archive-to: {describe(exc)}"
            ) from None
        self.tmp_name = temp_name(self.name, self.dir_fd)
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
                placed.append((tmp, name, put_in_place(self.dir_fd, tmp, name, self.replace)))
            os.fsync(self.dir_fd)
        except BaseException as exc:
            for tmp, name, had_old in reversed(placed):
                with contextlib.suppress(OSError):
                    take_back(self.dir_fd, tmp, name, had_old)
            if isinstance(exc, FileExistsError):
                raise self.exists_already(posixpath.join(self.parent, exc.filename)) from None
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

    def exists_already(self, path: str) -> ArchiveError:
        return ArchiveError(f"{path} exists already: an archive-to with {{time}} never "
                            "replaces an archive (another run in the same microsecond?)")  # fmt: skip

    def check_companion(self, suffix: str) -> None:
        """Fail before writing anything if `<archive-to><suffix>` is a name too long."""
        if len(os.fsencode(self.name + suffix)) > name_max(self.dir_fd):
            raise ArchiveError(
                f"archive-to {self.path}: its name is too long for the {suffix} file that goes "
                f"beside it (at most {name_max(self.dir_fd) - len(suffix)} bytes)"
            )

    def check_kind(self, is_dir: bool) -> None:
        """Fail before writing anything if archive-to is of the other kind, or there at all
        when it must not be replaced."""
        old = self.existing()
        if old is None:
            return
        if not self.replace:
            raise self.exists_already(posixpath.join(self.parent, self.name))
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


def put_in_place(dir_fd: int, tmp: str, name: str, replace: bool = True) -> bool:
    """Rename tmp onto name; True if an old `name` was there: it is now under tmp.
    Without `replace`, an old `name` is left alone: FileExistsError."""
    while True:
        try:
            renameat2(dir_fd, tmp, name, RENAME_NOREPLACE)
            return False
        except OSError as exc:
            if exc.errno != errno.EEXIST or not replace:
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
    tmp = temp_name(name, dir_fd)
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
        self.layers = 0  # oci-image: the new revision's layers
        self.merged = 0  # oci-image: layers merged into one to stay within image-max-layers


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
    is_device = typeflag in (b"3", b"4")
    return header_blocks(
        name, st.st_mode, uid, gid, size, st.st_mtime_ns, typeflag, linkname, uname, gname,
        os.major(st.st_rdev) if is_device else 0, os.minor(st.st_rdev) if is_device else 0,
        records, xattr_records(entry.xattrs) if entry.xattrs else [],
    )  # fmt: skip


def header_blocks(name: bytes, mode: int, uid: int, gid: int, size: int, mtime_ns: int,
                  typeflag: bytes, linkname: bytes, uname: bytes, gname: bytes, devmajor: int,
                  devminor: int, records: list[bytes], more: list[bytes]) -> bytes:  # fmt: skip
    """A member's header from its fields: PAX records for what ustar cannot hold (after
    `records`, before `more`), then the ustar block."""
    seconds = mtime_ns // 1_000_000_000
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
    if mtime_ns % 1_000_000_000 or not 0 <= seconds <= MAX_OCTAL_11:
        records.append(pax_record(b"mtime", pax_time(mtime_ns)))
        seconds = min(max(seconds, 0), MAX_OCTAL_11)
    if len(uname) > 32:
        records.append(pax_record(b"uname", uname))
    if len(gname) > 32:
        records.append(pax_record(b"gname", gname))
    records += more
    block = ustar_block(
        name, stat.S_IMODE(mode), uid, gid, min(size, MAX_OCTAL_11), seconds, typeflag,
        linkname, uname, gname, devmajor, devminor,
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
    """The archive file as a compressor sees it: counts what it gets, hashes it if asked.
    It writes through its own buffer to fd and never closes fd, so it is closed (or
    discarded) before its fd is: a buffer finalised later would write into whatever file
    holds that fd number by then."""

    def __init__(self, fd: int, hashing: bool) -> None:
        self.fd = fd
        self.file = io.FileIO(fd, "wb", closefd=False)
        self.raw = io.BufferedWriter(self.file, READ_CHUNK)
        self.digest = hashlib.sha256() if hashing else None
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        if self.file.closed:  # discarded: a compressor being shut down writes into nothing
            return len(data)
        if self.digest is not None:
            self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()  # flushes what it holds

    def discard(self) -> None:
        """Drop what the buffer holds: a buffer whose file is closed closes without a flush."""
        self.file.close()
        self.raw.close()

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
        self.out.close()

    def discard(self, stop_compressor: bool) -> None:
        """After a failure: nothing more written to fd, the compressor's threads stopped.
        Not after SIGTERM: a compressor interrupted mid-block might never finish (the hook
        exits at once then)."""
        self.out.discard()
        if stop_compressor and self.stream is not self.out:
            # The archive has failed already (its error is what the caller reports); what
            # the compressor says while it shuts down, into a discarded file, is beside it.
            with contextlib.suppress(Exception):
                self.stream.close()


def write_tar(entries: Iterable[Entry], fd: int, archive: Archive, stats: Stats,
              layer: bool = False) -> None:  # fmt: skip
    """Each entry as a member; hardlinks as link members, but whiteouts each their own.
    A layer is hashed for its descriptor and holds no sparse members (image-spec:
    sparse files SHOULD NOT be used in layers)."""
    sink = TarSink(fd, archive, hashing=layer)
    try:
        write_members(entries, sink, archive, stats, layer)
        sink.finish()
    except BaseException as exc:
        sink.discard(stop_compressor=isinstance(exc, Exception))  # before the caller closes fd
        raise
    stats.archive_bytes = sink.out.size
    if layer:
        stats.descriptor = layer_descriptor(sink, archive.compressor or "gzip")


def write_members(entries: Iterable[Entry], sink: TarSink, archive: Archive, stats: Stats,
                  layer: bool) -> None:  # fmt: skip
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
# Merging layers.  Consecutive layers of an image become one layer that,
# applied on top of the layers below them, gives the same filesystem as
# applying them in order, as image-spec's layer.md and containers/storage's
# applier have it: a whiteout .wh.x deletes x and all under it; an opaque
# .wh..wh..opq in d hides what lower layers have under d; an entry replaces its
# path (a directory over a directory keeps the children); a link member joins
# its target's inode, and a regular file is a new inode (its other names keep
# the old data).
#
# Nothing is mounted or extracted: each layer is read as a stream.  Pass 1 reads
# the headers of the layers below (only which paths exist there) and of the
# merged ones (the newest state of every path they touch, each name's inode) into
# an SQLite index in a temporary file beside blobs/, so memory stays small
# whatever the chain.  Pass 2 writes the result: directories, whiteouts, symlinks,
# devices and FIFOs in path order from the index; then the merged layers are read
# again, oldest first, and each surviving file's data is written once, under its
# first name, with its newest metadata; then its other names as link members.
#
# In the index a path is its bytes with "/" as "\0": sorted, a directory's
# subtree follows it, and a subtree is one key range.  A path the merged layers
# delete stays as a tombstone (a whiteout in the result where a layer below has
# the path); a directory whose lower contents were hidden (deleted, replaced by
# a non-directory, made opaque) is "wiped" (opaque in the result).
# ---------------------------------------------------------------------------

LAYER_COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar": None,
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}
MERGE_CACHE_KIB = 8 << 10  # SQLite's page cache: what the index may hold in memory
TOMBSTONE, DIRECTORY, NOT_DIRECTORY = 0, 1, 2
MEMBER_TYPES = {
    b"0": stat.S_IFREG, b"\0": stat.S_IFREG, b"7": stat.S_IFREG, b"2": stat.S_IFLNK,
    b"3": stat.S_IFCHR, b"4": stat.S_IFBLK, b"5": stat.S_IFDIR, b"6": stat.S_IFIFO,
}  # fmt: skip
WHITEOUT_META_PREFIX = b".wh..wh."  # aufs's own files (.wh..wh.plnk ...): not changes
INDEX_SCHEMA = """
CREATE TABLE below (key BLOB PRIMARY KEY, layer INTEGER, dir INTEGER) WITHOUT ROWID;
CREATE TABLE node (key BLOB PRIMARY KEY, layer INTEGER, kind INTEGER, ino INTEGER,
                   wiped INTEGER, meta BLOB) WITHOUT ROWID;
CREATE INDEX node_ino ON node (ino, key);
CREATE TABLE inode (id INTEGER PRIMARY KEY, layer INTEGER, ordinal INTEGER, regular INTEGER,
                    meta BLOB);
CREATE TABLE holder (ino INTEGER PRIMARY KEY, key BLOB);
"""


class Member:
    """One member of a layer, as the merge needs it: its path (an index key), what
    kind of change it is, and its header's fields (meta: see TarReader.member)."""

    __slots__ = ("key", "link", "meta", "mode", "name", "ordinal")

    def __init__(self, ordinal: int, name: bytes, key: bytes, mode: int, link: bytes | None,
                 meta: tuple) -> None:  # fmt: skip
        self.ordinal = ordinal  # its place in the layer, counting every member
        self.name = name  # as the layer spells it, for errors
        self.key = key
        self.mode = mode  # with its file type; 0 for a link member
        self.link = link  # a link member's target, as a key
        self.meta = meta


def path_key(name: bytes, digest: str) -> bytes:
    """A member's path as an index key: no leading "./" or "/", "/" as "\\0"."""
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise ArchiveError(f"layer {digest}: member {shown_name(name)} leaves the root")
    return b"\0".join(parts)


def key_path(key: bytes) -> bytes:
    return key.replace(b"\0", b"/")


def pax_mtime_ns(text: bytes) -> int:
    """A PAX mtime (b"-12.5", b"1700000000.123456789") in nanoseconds, exactly."""
    sign = -1 if text.startswith(b"-") else 1
    seconds, _, fraction = text.lstrip(b"-").partition(b".")
    return sign * (int(seconds or b"0") * 1_000_000_000 + int((fraction + b"0" * 9)[:9]))


def tar_number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU's base-256 (high bit of the first byte)."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big", signed=field[0] == 0xFF)
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def pax_records(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The records of a PAX header: b"<length> <key>=<value>\\n" each."""
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        end = pos + int(data[pos:space])
        if end > len(data) or end <= space or data[end - 1] != 10:
            raise ValueError("malformed PAX record")
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals:
            raise ValueError("malformed PAX record")
        yield key, value
        pos = end


ZERO_BLOCK = bytes(BLOCK)
USTAR_MAGIC = b"ustar\x0000"  # POSIX: name may continue in prefix; GNU's "ustar  \0" has none
PAX_FIELDS = (b"path", b"linkpath", b"size", b"uid", b"gid", b"uname", b"gname", b"mtime")
HEADER_ONLY_TYPES = (b"x", b"g", b"L", b"K")  # PAX, PAX global, GNU long name and link name


class TarReader:
    """A layer's tar, read as a stream the way Go's archive/tar reads it (podman's and
    umoci's reader): ustar headers with PAX and GNU long-name headers; each member's
    data read or skipped.  The stream may end after the last member's data, without
    padding or end-of-archive blocks (umoci 0.4.7 writes such layers).  Hand-written
    rather than tarfile's, which parses each header field in Python: with it a merge of
    100 layers took 1.6 times the CPU (README, Merging layers)."""

    def __init__(self, stream: BinaryIO, digest: str) -> None:
        self.stream = stream
        self.digest = digest
        self.data_left = 0  # the current member's data not read yet
        self.padding = 0  # and the zeros after it
        self.ordinal = 0
        self.buffer = bytearray(READ_CHUNK)

    def read_exact(self, n: int) -> bytes:
        data = self.stream.read(n)
        while len(data) < n:
            more = self.stream.read(n - len(data))
            if not more:
                break
            data += more
        return data

    def discard(self, n: int) -> int:
        """Read past n bytes; how many there were."""
        view = memoryview(self.buffer)
        left = n
        while left:
            got = self.stream.readinto(view[: min(left, READ_CHUNK)])
            if not got:
                break
            left -= got
        return n - left

    def next(self) -> Member | None:
        """The next member, None at the end of the archive."""
        if self.discard(self.data_left) != self.data_left:
            raise ValueError("the data ends early")
        self.discard(self.padding)  # may be missing at the very end
        self.data_left = self.padding = 0
        pax: dict[bytes, bytes] = {}
        records: list[tuple[bytes, bytes]] = []
        while True:
            block = self.read_exact(BLOCK)
            if len(block) < BLOCK or block == ZERO_BLOCK:
                if block and block != ZERO_BLOCK:
                    raise ValueError("a header is cut short")
                return None
            fields = USTAR.unpack(block)
            if not checksum_matches(block, tar_number(fields[6])):
                raise ValueError("a header's checksum is wrong")
            typeflag, size = fields[7], tar_number(fields[4])
            if typeflag not in HEADER_ONLY_TYPES:
                break
            data = self.read_exact(size)
            if len(data) < size:
                raise ValueError("a header is cut short")
            self.discard(-size % BLOCK)
            if typeflag == b"x":
                for key, value in pax_records(data):
                    if key.startswith(b"SCHILY."):
                        records.append((key, value))
                    elif key in PAX_FIELDS:
                        pax[key] = value
                    elif key.startswith(b"GNU.sparse."):
                        raise ValueError("sparse members are not supported")
            elif typeflag in (b"L", b"K"):  # GNU: a NUL-terminated name for the next member
                pax.setdefault(b"path" if typeflag == b"L" else b"linkpath",
                               data.split(b"\0", 1)[0])  # fmt: skip
        member = self.member(fields, pax, records)
        self.ordinal += 1
        if stat.S_ISREG(member.mode):  # other members have no data, whatever their size says
            self.data_left = member.meta[6]
            self.padding = -self.data_left % BLOCK
        return member

    def member(self, fields: tuple, pax: dict[bytes, bytes], records: list) -> Member:
        name, mode, uid, gid, _, mtime, _, typeflag, linkname, magic = fields[:10]
        uname, gname, devmajor, devminor, prefix = fields[10:]
        name = name.split(b"\0", 1)[0]
        if magic == USTAR_MAGIC and prefix[:1] != b"\0":
            name = prefix.split(b"\0", 1)[0] + b"/" + name
        name = pax.get(b"path", name)
        linkname = pax.get(b"linkpath", linkname.split(b"\0", 1)[0])
        if typeflag == b"\0" and name.endswith(b"/"):
            typeflag = b"5"  # a directory in a pre-ustar archive
        kind = 0 if typeflag == HARDLINK else MEMBER_TYPES.get(typeflag)
        if kind is None:
            raise ArchiveError(f"layer {self.digest}: member {shown_name(name)} has tar type "
                               f"{typeflag!r}, which a layer cannot hold")  # fmt: skip
        mode = kind | tar_number(mode) & 0o7777
        size = int(pax[b"size"]) if b"size" in pax else tar_number(fields[4])
        meta = (
            mode,
            int(pax[b"uid"]) if b"uid" in pax else tar_number(uid),
            int(pax[b"gid"]) if b"gid" in pax else tar_number(gid),
            pax.get(b"uname", uname.split(b"\0", 1)[0]),
            pax.get(b"gname", gname.split(b"\0", 1)[0]),
            pax_mtime_ns(pax[b"mtime"]) if b"mtime" in pax else tar_number(mtime) * 1_000_000_000,
            size if stat.S_ISREG(mode) else 0,
            linkname if stat.S_ISLNK(mode) else b"",
            tar_number(devmajor), tar_number(devminor),
            tuple(records),
        )  # fmt: skip
        link = path_key(linkname, self.digest) if typeflag == HARDLINK else None
        return Member(self.ordinal, name, path_key(name, self.digest), mode, link, meta)

    def copy_data(self, sink: TarSink, size: int) -> None:
        """The current member's data (size bytes) into sink, padded to a block."""
        view = memoryview(self.buffer)
        left = size
        while left:
            got = self.stream.readinto(view[: min(left, READ_CHUNK)])
            if not got:
                raise ValueError("the data ends early")
            sink.write(view[:got])
            left -= got
        self.data_left -= size
        if size % BLOCK:
            sink.write(bytes(-size % BLOCK))


def checksum_matches(block: bytes, stored: int) -> bool:
    """A header's checksum as writers compute it: the bytes' sum with the checksum field
    as spaces, unsigned (POSIX) or, from some old tars, signed."""
    unsigned = byte_sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    high = sum(1 for i, b in enumerate(block) if b > 127 and not 148 <= i < 156)
    return stored == unsigned - 256 * high


class HashingReader(io.RawIOBase):
    """A layer blob read once from start to end, its digest and size checked at the end."""

    def __init__(self, fd: int, descriptor: dict) -> None:
        super().__init__()
        self.file = open(fd, "rb", buffering=0)  # noqa: SIM115
        self.digest = hashlib.sha256()
        self.size = 0
        self.expected = descriptor

    def readinto(self, buffer: bytearray | memoryview) -> int:
        n = self.file.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        self.size += n
        return n

    def readable(self) -> bool:
        return True

    def check(self) -> None:
        """Read what is left and compare with the descriptor."""
        buffer = bytearray(READ_CHUNK)
        while self.readinto(buffer):
            pass
        digest = "sha256:" + self.digest.hexdigest()
        if digest != self.expected["digest"]:
            raise ArchiveError(f"layer {self.expected['digest']} does not match its digest")
        size = self.expected.get("size")
        if isinstance(size, int) and size != self.size:
            raise ArchiveError(f"layer {self.expected['digest']} is {self.size} bytes, not {size}")

    def close(self) -> None:
        self.file.close()
        super().close()


def open_layer(blobs_fd: int, descriptor: dict) -> HashingReader:
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise ArchiveError(f"layer {digest!r} is not a sha256 digest")
    if descriptor.get("mediaType") not in LAYER_COMPRESSION:
        raise ArchiveError(
            f"layer {digest} has media type {descriptor.get('mediaType')!r}: "
            "merging reads only OCI and Docker tar, tar+gzip and tar+zstd layers"
        )
    try:
        fd = os.open(digest.removeprefix("sha256:"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=blobs_fd)  # fmt: skip
    except OSError as exc:
        raise ArchiveError(f"layer {digest}: cannot open its blob: {exc.strerror}") from None
    return HashingReader(fd, descriptor)


def decompressed(raw: HashingReader, compression: str | None) -> BinaryIO:
    if compression == "gzip":
        from isal import igzip

        return igzip.IGzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                            closefd=False)  # fmt: skip
        return io.BufferedReader(reader, READ_CHUNK)
    return io.BufferedReader(raw, READ_CHUNK)


@contextlib.contextmanager
def layer_members(blobs_fd: int, descriptor: dict, whole: bool = True) -> Iterator[Iterator]:
    """The members of one layer, read as a stream: (Member, the reader for its data).
    With whole, the blob is read to its end and checked against its digest."""
    digest = descriptor.get("digest")
    raw = open_layer(blobs_fd, descriptor)
    where = ["its start"]

    def members() -> Iterator[tuple[Member, TarReader]]:
        stream = decompressed(raw, LAYER_COMPRESSION[descriptor["mediaType"]])
        tar = TarReader(stream, digest)
        while True:
            member = tar.next()
            if member is None:
                break
            where[0] = f"member {shown_name(member.name)}"
            yield member, tar
        if whole:
            while tar.discard(READ_CHUNK):
                pass
            raw.check()

    try:
        yield members()
    except corrupt_layer_errors() as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk, not the layer
        raise ArchiveError(f"layer {digest} is corrupt or truncated at {where[0]}: "
                           f"{describe(exc)}") from None  # fmt: skip
    finally:
        raw.close()


def corrupt_layer_errors() -> tuple[type[BaseException], ...]:
    """What a broken layer makes the reader and the decompressors raise."""
    import zstandard
    from isal import isal_zlib

    return (ValueError, EOFError, OSError, zlib.error, isal_zlib.error, zstandard.ZstdError)


class MergeIndex:
    """The merge's index: an SQLite database in a locked temporary file in the layout's
    top directory (the stale-temporary sweep removes it after a SIGKILL)."""

    def __init__(self, blobs_fd: int) -> None:
        import sqlite3

        self.top_fd = os.open("../..", DIR_FLAGS, dir_fd=blobs_fd)
        self.name = temp_name("merge-index")
        self.fd = -1
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self.fd = os.open(self.name, flags, 0o600, dir_fd=self.top_fd)
            fcntl.flock(self.fd, fcntl.LOCK_EX)  # a live temporary: see is_stale
            self.db = sqlite3.connect(f"/proc/self/fd/{self.top_fd}/{self.name}",
                                      isolation_level=None)  # fmt: skip
        except BaseException:
            self.close()
            raise
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "locking_mode = EXCLUSIVE",
                       "temp_store = MEMORY", f"cache_size = -{MERGE_CACHE_KIB}",
                       "mmap_size = 0"):  # fmt: skip
            self.db.execute("PRAGMA " + pragma)
        self.db.executescript(INDEX_SCHEMA)
        self.db.execute("BEGIN")

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.name, dir_fd=self.top_fd)
            os.close(self.fd)
        os.close(self.top_fd)

    def one(self, sql: str, *args: object) -> tuple | None:
        return self.db.execute(sql, args).fetchone()

    def delete_under(self, table: str, key: bytes, layer: int | None = None) -> None:
        """Drop the subtree under `key` (the root: b""), or only what layers before
        `layer` wrote there."""
        if key:
            sql, args = "key > ? AND key < ?", [key + b"\0", key + b"\1"]
        else:
            sql, args = "key > ?", [b""]
        if layer is not None:
            sql, args = sql + " AND layer < ?", [*args, layer]
        self.db.execute(f"DELETE FROM {table} WHERE {sql}", args)


def merge_layers(blobs_fd: int, merged: list[dict], below: list[dict], out_fd: int,
                 archive: Archive, stats: Stats) -> dict:  # fmt: skip
    """Write to out_fd one layer equal to the `merged` layers applied in order on top
    of the `below` ones (descriptors, oldest first, of blobs in blobs_fd), compressed
    as archive says; its descriptor (with diff_id) in stats.descriptor, and returned."""
    index = MergeIndex(blobs_fd)
    try:
        for n, descriptor in enumerate(below):
            with layer_members(blobs_fd, descriptor) as members:
                for member, _ in members:
                    apply_below(index, member, n)
        for n, descriptor in enumerate(merged):
            with layer_members(blobs_fd, descriptor) as members:
                for member, _ in members:
                    stats.current = member.name
                    apply_merged(index, member, n, descriptor["digest"])
        stats.current = None
        index.db.execute(
            "INSERT INTO holder SELECT ino, MIN(key) FROM node WHERE ino IS NOT NULL GROUP BY ino"
        )
        sink = TarSink(out_fd, archive, hashing=True)
        write_tree(index, sink, stats)
        write_file_data(index, sink, blobs_fd, merged, stats)
        write_file_links(index, sink, stats)
        stats.current = None
        sink.finish()
    finally:
        index.close()
    stats.archive_bytes = sink.out.size
    stats.descriptor = layer_descriptor(sink, archive.compressor or "gzip")
    return stats.descriptor


def whiteout_target(key: bytes) -> tuple[str, bytes] | None:
    """For a whiteout member: ("opaque", its directory's key), ("whiteout", the key it
    deletes), or ("aufs", b"") for aufs's own files, no change.  None for any other."""
    parent, _, name = key.rpartition(b"\0")
    if not name.startswith(WHITEOUT_PREFIX):
        return None
    if name == OPAQUE_WHITEOUT:
        return "opaque", parent
    if name.startswith(WHITEOUT_META_PREFIX):
        return "aufs", b""
    return "whiteout", (parent + b"\0" if parent else b"") + name[len(WHITEOUT_PREFIX) :]


def apply_below(index: MergeIndex, member: Member, layer: int) -> None:
    """A member of a layer below the merged ones: only which paths exist is kept."""
    whiteout = whiteout_target(member.key)
    if whiteout is not None:
        what, target = whiteout
        if what == "opaque":
            index.delete_under("below", target, layer)
        elif what == "whiteout":
            index.db.execute("DELETE FROM below WHERE key = ?", (target,))
            index.delete_under("below", target)
        return
    is_dir = stat.S_ISDIR(member.mode)
    if not is_dir:
        index.delete_under("below", member.key)
    index.db.execute("INSERT OR REPLACE INTO below VALUES (?, ?, ?)", (member.key, layer, is_dir))


def apply_merged(index: MergeIndex, member: Member, layer: int, digest: str) -> None:
    """A member of a merged layer: the newest state of its path, kept whole."""
    key = member.key
    whiteout = whiteout_target(key)
    if whiteout is not None:
        what, target = whiteout
        if what == "opaque":  # what earlier layers have under it is hidden
            index.delete_under("node", target, layer)
            index.db.execute("UPDATE node SET wiped = 1 WHERE key = ? AND kind = ?",
                             (target, DIRECTORY))  # fmt: skip
        elif what == "whiteout":
            replace_path(index, target, layer, TOMBSTONE, None, 0, marshal.dumps(member.meta))
        return
    if stat.S_ISDIR(member.mode):
        old = index.one("SELECT kind, wiped FROM node WHERE key = ?", key)
        wiped = 0 if old is None else old[1] if old[0] == DIRECTORY else 1
        index.db.execute("INSERT OR REPLACE INTO node VALUES (?, ?, ?, NULL, ?, ?)",
                         (key, layer, DIRECTORY, wiped, marshal.dumps(member.meta)))  # fmt: skip
        return
    if member.link is not None:
        ino = link_target(index, member, digest)
        index.db.execute("UPDATE inode SET meta = ? WHERE id = ?",
                         (marshal.dumps(link_meta(index, ino, member.meta)), ino))  # fmt: skip
    else:
        ino = index.db.execute(
            "INSERT INTO inode (layer, ordinal, regular, meta) VALUES (?, ?, ?, ?)",
            (layer, member.ordinal, stat.S_ISREG(member.mode), marshal.dumps(member.meta)),
        ).lastrowid
    replace_path(index, key, layer, NOT_DIRECTORY, ino, 0, None)


def replace_path(index: MergeIndex, key: bytes, layer: int, kind: int, ino: int | None,
                 wiped: int, meta: bytes | None) -> None:  # fmt: skip
    """A non-directory or a tombstone at `key`: a directory there goes, with its subtree."""
    old = index.one("SELECT kind FROM node WHERE key = ?", key)
    if old is None or old[0] == DIRECTORY:
        index.delete_under("node", key)
    index.db.execute("INSERT OR REPLACE INTO node VALUES (?, ?, ?, ?, ?, ?)",
                     (key, layer, kind, ino, wiped, meta))  # fmt: skip


def link_target(index: MergeIndex, member: Member, digest: str) -> int:
    row = index.one("SELECT kind, ino FROM node WHERE key = ?", member.link)
    if row is None or row[0] != NOT_DIRECTORY or member.link == member.key:
        raise ArchiveError(
            f"layer {digest}: member {shown_name(member.name)} is a hardlink to "
            f"{shown_name(key_path(member.link))}, which no merged layer has at that point"
        )
    return row[1]


def link_meta(index: MergeIndex, ino: int, meta: tuple) -> tuple:
    """A link member's header sets the inode's owner, mode, times and xattrs (as
    containers/storage applies it); the type, size, target and device stay."""
    old = marshal.loads(index.one("SELECT meta FROM inode WHERE id = ?", ino)[0])
    mode = stat.S_IFMT(old[0]) | stat.S_IMODE(meta[0])
    return (mode, *meta[1:6], *old[6:10], meta[10])


def write_tree(index: MergeIndex, sink: TarSink, stats: Stats) -> None:
    """Directories, whiteouts, opaque markers, and the non-regular inodes, in path
    order.  A whiteout only where a layer below has the path, an opaque marker only
    where one has the directory, and neither under a directory already opaque."""
    rows = index.db.execute(
        "SELECT n.key, n.kind, n.wiped, n.meta, i.regular, i.meta, h.key FROM node n"
        " LEFT JOIN inode i ON i.id = n.ino LEFT JOIN holder h ON h.ino = n.ino ORDER BY n.key"
    )
    hiding: list[bytes] = []  # the opaque directories (as key prefixes) the walk is in
    for key, kind, wiped, meta, regular, inode_meta, holder in rows:
        stats.current = key_path(key)
        while hiding and not key.startswith(hiding[-1]):
            hiding.pop()
        if kind == TOMBSTONE:
            if not hiding and index.one("SELECT 1 FROM below WHERE key = ?", key):
                parent, _, name = key.rpartition(b"\0")
                whiteout = (parent + b"\0" if parent else b"") + WHITEOUT_PREFIX + name
                write_member(sink, whiteout, whiteout_meta(marshal.loads(meta)), None, stats)
        elif kind == DIRECTORY:
            meta = marshal.loads(meta)
            write_member(sink, key, meta, None, stats)
            if wiped and not hiding and index.one("SELECT 1 FROM below WHERE key = ? AND dir",
                                                  key):  # fmt: skip
                opaque = (key + b"\0" if key else b"") + OPAQUE_WHITEOUT
                write_member(sink, opaque, whiteout_meta(meta), None, stats)
                hiding.append(key + b"\0" if key else b"")
        elif not regular:
            write_member(sink, key, marshal.loads(inode_meta), None if holder == key else holder,
                         stats)  # fmt: skip


def whiteout_meta(meta: tuple) -> tuple:
    """An empty regular file with the owner and mtime of the entry it stands for."""
    return (stat.S_IFREG | 0o644, *meta[1:6], 0, b"", 0, 0, ())


def write_member(sink: TarSink, key: bytes, meta: tuple, link_to: bytes | None,
                 stats: Stats) -> None:  # fmt: skip
    mode, uid, gid, uname, gname, mtime_ns, size, linkname, devmajor, devminor, records = meta
    path = key_path(key)
    name = b"./" + path + b"/" if stat.S_ISDIR(mode) and path else b"./" + path
    if link_to is not None:
        typeflag, linkname, size = HARDLINK, b"./" + key_path(link_to), 0
    else:
        typeflag = TYPEFLAGS[stat.S_IFMT(mode)]
    more = [pax_record(k, v) for k, v in records]
    sink.write(header_blocks(name, mode, uid, gid, size, mtime_ns, typeflag, linkname, uname,
                             gname, devmajor, devminor, [], more))  # fmt: skip
    stats.entries += 1


def write_file_data(index: MergeIndex, sink: TarSink, blobs_fd: int, merged: list[dict],
                    stats: Stats) -> None:  # fmt: skip
    """Each surviving regular inode once, under its first name, its data read from the
    member that made it: the merged layers read again, oldest first."""
    wanted = index.db.execute(
        "SELECT i.layer, i.ordinal, i.meta, h.key FROM holder h JOIN inode i ON i.id = h.ino"
        " WHERE i.regular ORDER BY h.ino"
    )
    next_one = wanted.fetchone()
    for n, descriptor in enumerate(merged):
        if next_one is None:
            break
        if next_one[0] != n:
            continue
        with layer_members(blobs_fd, descriptor, whole=False) as members:
            for member, tar in members:
                if next_one is None or next_one[0] != n:
                    break
                if member.ordinal != next_one[1]:
                    continue
                _, _, meta, key = next_one
                stats.current = key_path(key)
                meta = marshal.loads(meta)
                write_member(sink, key, meta, None, stats)
                tar.copy_data(sink, meta[6])
                stats.bytes += meta[6]
                next_one = wanted.fetchone()


def write_file_links(index: MergeIndex, sink: TarSink, stats: Stats) -> None:
    """The other names of each regular inode, as link members to its first."""
    rows = index.db.execute(
        "SELECT n.key, h.key, i.meta FROM node n JOIN holder h ON h.ino = n.ino"
        " JOIN inode i ON i.id = n.ino WHERE i.regular AND n.key != h.key ORDER BY n.key"
    )
    for key, holder, meta in rows:
        stats.current = key_path(key)
        write_member(sink, key, marshal.loads(meta), holder, stats)


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
BASE_DIGEST = "org.opencontainers.image.base.digest"
BASE_NAME = "org.opencontainers.image.base.name"
# On a revision's manifest and its index.json descriptor: who committed it.
COMMITTED_BY_CONTAINER = ANNOTATION_PREFIX + "container"
COMMITTED_BY_ARCHIVE = ANNOTATION_PREFIX + "archive"
# On a revision that merged layers of its base only: "<base digest> <first> <count>", its
# layer `first` holds those layers of that base merged (see merged_before).
MERGED_FROM = ANNOTATION_PREFIX + "merged"
LAYOUT_FILE, INDEX_FILE, LOCK_FILE = "oci-layout", "index.json", "index.lock"
BLOB_TMP = "blob"  # blobs' temporaries: .blob.archive_overlay-tmp-<pid>-<random> in the layout
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

    @contextlib.contextmanager
    def writing_blobs(self) -> Iterator[None]:
        """A shared flock on blobs/sha256 from before the base is read until index.json
        names what the commit wrote: a collector (exclusive) never runs in between."""
        fd = self.open_blobs()
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

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
            remove_stale_temporaries(self.blobs_fd, None, self.shown_blobs)  # older versions'
            remove_stale_temporaries(self.fd, BLOB_TMP, self.path)
        return self.blobs_fd

    def move_into_blobs(self, tmp: str, name: str) -> None:
        """A blob's temporary, written in the layout's top directory, renamed to its digest
        in blobs/sha256: nothing but digest-named files ever sits there (`umoci gc` refuses
        a layout holding anything else), even after a SIGKILL."""
        blobs_fd = self.open_blobs()
        try:
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=blobs_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        os.fsync(blobs_fd)

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
            self.move_into_blobs(write_temp_file(self.fd, BLOB_TMP, data), digest)
        return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}

    def put_layer(self, archive: Archive, entries: Iterable[Entry], upper: Upper,
                  stats: Stats) -> None:  # fmt: skip
        """The layer as oci-layer writes it, kept under its digest."""

        def write(fd: int) -> None:
            write_tar(oci_entries(entries, upper, archive.name), fd, archive, stats, layer=True)

        self.put_blob(write, stats)

    def put_blob(self, write: Callable[[int], None], stats: Stats) -> None:
        """A large blob written by `write` (which sets stats.descriptor) to a locked
        temporary, fsync'd, then kept under its digest in blobs/sha256."""
        blobs_fd = self.open_blobs()
        tmp = temp_name(BLOB_TMP, self.fd)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644, dir_fd=self.fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a live temporary: see is_stale
            write(fd)
            stats.current = None
            os.fsync(fd)
            assert stats.descriptor is not None
            name = stats.descriptor["digest"].removeprefix("sha256:")
            old = lstat_at(blobs_fd, name)
            if old is not None and stat.S_ISREG(old.st_mode) and old.st_size == stats.archive_bytes:
                os.unlink(tmp, dir_fd=self.fd)  # the same blob is there already
            else:
                self.move_into_blobs(tmp, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
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


def committed_by(archive: Archive, info: RunInfo) -> dict[str, str]:
    """The annotations naming the container and the archive that commit a revision."""
    if info.container_id is None:
        return {}
    return {COMMITTED_BY_CONTAINER: info.container_id, COMMITTED_BY_ARCHIVE: archive.name}


def find_base(layout: Layout, index: dict, archive: Archive,
              origin: dict[str, str] | None = None) -> Base | None:  # fmt: skip
    """image-base (a ref name or a manifest digest); else, when this container committed
    this archive here before (`origin`: see committed_by), the base of that commit: a
    container that stops again keeps its upperdir, relative to that base; else what
    image-tag names now."""
    earlier = [d for d in index["manifests"]
               if origin and origin.items() <= d.get("annotations", {}).items()]  # fmt: skip
    if earlier and not archive.image_base:
        return base_of_earlier_commit(layout, earlier[-1]["digest"])
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
    return load_base(layout, digest, name)


def base_of_earlier_commit(layout: Layout, earlier: str) -> Base | None:
    """The base recorded in the manifest of this container's earlier commit (none for a
    first revision); it must still be in the layout."""
    annotations = layout.read_blob(earlier, "this container's earlier commit").get("annotations")
    annotations = annotations if isinstance(annotations, dict) else {}
    digest, name = annotations.get(BASE_DIGEST), annotations.get(BASE_NAME)
    if digest is None:
        return None
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise ArchiveError(f"this container's earlier commit {earlier}: bad {BASE_DIGEST}")
    if lstat_at(layout.open_blobs(), digest.removeprefix("sha256:")) is None:
        raise ArchiveError(
            f"{digest}, the base of this container's earlier commit {earlier}, is no longer in "
            f"{layout.path}: name the revision its upperdir goes on with image-base"
        )
    return load_base(layout, digest, name if isinstance(name, str) else None)


def load_base(layout: Layout, digest: str, name: str | None) -> Base:
    """A base revision's manifest and config, read and checked."""
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


def padded_history(config: dict, layers: int) -> list[dict]:
    """The config's history with an entry added for each of its first `layers` layers it
    recorded none for (image-spec makes history optional): buildah and podman commit on
    an image only when its non-empty history entries are as many as its layers."""
    history = list(config.get("history", []))
    recorded = sum(1 for h in history if not (isinstance(h, dict) and h.get("empty_layer")))
    comment = "a layer of the base image, which recorded no history for it"
    return history + [{"comment": comment} for _ in range(layers - recorded)]


def new_config(base: Base | None, layer: dict, archive: Archive, info: RunInfo) -> dict:
    config = json.loads(json.dumps(base.config)) if base is not None else first_config()
    config["history"] = padded_history(config, len(config["rootfs"]["diff_ids"]))
    config["created"] = info.created
    config["rootfs"]["diff_ids"].append(layer["diff_id"])
    comment = f"container {info.container_id} archive {archive.name}"
    config["history"].append(
        {
            "created": info.created,
            "created_by": f"{HISTORY_BY} {__version__}",
            "comment": comment,
        }
    )
    return config


def layer_entries(history: list) -> list[int]:
    """Where in the history the entries for layers are (those not marked empty_layer)."""
    return [i for i, e in enumerate(history) if not (isinstance(e, dict) and e.get("empty_layer"))]


def new_manifest(base: Base | None, layers: list[dict], config: dict, info: RunInfo,
                 marks: dict[str, str] | None = None) -> dict:  # fmt: skip
    annotations = {"org.opencontainers.image.created": info.created, **(marks or {})}
    if base is not None:
        annotations[BASE_DIGEST] = base.digest
        if base.name is not None:
            annotations[BASE_NAME] = base.name
    return {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": config,
            "layers": layers, "annotations": annotations}  # fmt: skip


def tag_revision(layout: Layout, manifest: dict, tag: str, marks: dict[str, str] | None = None,
                 move: bool = True, keep: int | None = None) -> None:  # fmt: skip
    """index.json with the new manifest named `tag` (and annotated with `marks`: see committed_by, MERGED_FROM); its
    former holder kept, unnamed, with its other annotations, unless image-keep leaves it
    out (see Collecting a layout).  Without `move`, a tag held already fails the commit."""
    with layout.locked():
        index = layout.read_index()
        if not move:
            check_tag_free(layout, index, tag)
        for descriptor in index["manifests"]:
            annotations = descriptor.get("annotations")
            if isinstance(annotations, dict) and annotations.get(REF_NAME) == tag:
                del annotations[REF_NAME]
                if not annotations:
                    del descriptor["annotations"]
        index["manifests"].append({**manifest, "annotations": {**(marks or {}), REF_NAME: tag}})
        if keep is not None:
            drop_old_revisions(layout, index, manifest["digest"], keep)
        layout.write(INDEX_FILE, index)


def check_revision_inputs(archive: Archive, info: RunInfo) -> None:
    """What a revision takes from its inputs, checked before its first byte is written."""
    if not archive.image_tag:
        raise ArchiveError(f"method {archive.method} needs an image-tag")
    if not is_ref_name(archive.image_tag):
        raise ArchiveError(f"image-tag {archive.image_tag!r} is not a valid ref name")
    for what, value in (("container id", info.container_id), ("archive name", archive.name)):
        try:
            (value or "").encode()
        except UnicodeEncodeError:
            raise ArchiveError(
                f"the {what} {value!r} is not valid UTF-8: it cannot go into the revision's "
                "config and annotations (JSON text)"
            ) from None


def check_tag_free(layout: Layout, index: dict, tag: str) -> None:
    """A tag made with {time} names one run's revision: never moved off another."""
    if any(d.get("annotations", {}).get(REF_NAME) == tag for d in index["manifests"]):
        raise ArchiveError(
            f"image-tag {tag!r} names a revision in {layout.path} already: an image-tag with "
            "{time} never moves off one (another run in the same microsecond?)"
        )


def write_revision(archive: Archive, upper: Upper, allow_dirs: tuple[str, ...],
                   info: RunInfo, excluded: frozenset[bytes] = frozenset()) -> Stats:  # fmt: skip
    """Layer, config, manifest, each fsync'd under its digest; only then index.json.

    From its base to index.json and through the push, the commit holds blobs/sha256
    locked shared, so that no collector removes what it wrote, stacks on or uploads;
    then, with image-keep, it collects.
    """
    check_revision_inputs(archive, info)
    create = not archive.image_base  # a named base must be there already: nothing made
    layout = Layout(archive.archive_to, allow_dirs, create)
    stats = Stats()
    max_layers = archive.max_layers or DEFAULT_MAX_LAYERS
    push_failure: ArchiveError | None = None
    try:
        layout.ensure_layout(create)
        origin = committed_by(archive, info)
        with layout.writing_blobs():
            index = layout.read_index()
            if archive.image_tag_once:
                check_tag_free(layout, index, archive.image_tag)
            base = find_base(layout, index, archive, origin)  # all checked before writing
            check_room(base, max_layers)
            layout.put_layer(archive, walk(upper, excluded), upper, stats)
            assert stats.descriptor is not None
            config = new_config(base, stats.descriptor, archive, info)
            layers = list(base.manifest["layers"]) if base is not None else []
            layers.append({k: stats.descriptor[k] for k in ("mediaType", "digest", "size")})
            stats.merged, merged_from = squash(layout, index, base, config, layers, archive,
                                               info, max_layers)  # fmt: skip
            compact_history(config)
            config_descriptor = layout.put_json_blob(config, CONFIG_MEDIA_TYPE)
            marks = {**origin, **merged_from}
            manifest = new_manifest(base, layers, config_descriptor, info, marks)
            stats.descriptor = layout.put_json_blob(manifest, MANIFEST_MEDIA_TYPE)
            stats.layers = len(layers)
            tag_revision(layout, stats.descriptor, archive.image_tag, marks,
                         move=not archive.image_tag_once, keep=archive.keep)  # fmt: skip
            try:  # still locked: no collector removes what the push is uploading
                push_revision(layout, stats.descriptor, archive)
            except ArchiveError as exc:
                push_failure = exc
        if archive.keep is not None:
            collect(layout, archive.name)
        if push_failure is not None:
            raise push_failure
    except OSError as exc:
        if stats.current is not None:
            raise ArchiveError(failure(exc, upper, layout.path, stats)) from None
        raise ArchiveError(f"image layout {layout.path}: {describe(exc)}") from None
    finally:
        layout.close()
    return stats


# ---------------------------------------------------------------------------
# Keeping chains short: a commit that would give its revision more than
# image-max-layers layers merges (see Merging layers) the older half of the
# runs' layers the hook wrote into one, and leaves the layers it merged before
# as they are, until those fill half the room (see squash_window).  The base
# image's own layers (up to the last layer whose history entry the hook did not
# write) stay first, byte for byte.  The history keeps one entry per run: the merged runs' entries are
# marked empty_layer, and one entry after them stands for the merged layer.
# ---------------------------------------------------------------------------

HISTORY_BY = (
    "archive_overlay"  # every history entry the hook writes: created_by "archive_overlay …"
)
MERGED_BY, COMPACTED_BY = "(merged layers)", "(compacted history)"
COMPACT_HISTORY_OVER = 1 << 20  # config bytes; podman and skopeo refuse configs over 4 MiB


def is_own(entry: object) -> bool:
    """A history entry the hook wrote (a run, a merged layer, compacted runs)."""
    created_by = entry.get("created_by") if isinstance(entry, dict) else None
    return isinstance(created_by, str) and created_by.startswith(HISTORY_BY + " ")


def base_layers(history: list, layers: int) -> int:
    """How many of the first layers are the base image's own: up to the last layer whose
    history entry the hook did not write (all of them if the history does not say)."""
    entries = [history[i] for i in layer_entries(history)]
    if len(entries) != layers:
        return layers
    return max((i + 1 for i, e in enumerate(entries) if not is_own(e)), default=0)


def check_room(base: Base | None, max_layers: int) -> None:
    """Fail before anything is written when the base image alone fills image-max-layers."""
    if base is None:
        return
    layers = len(base.manifest["layers"])
    own_base = base_layers(padded_history(base.config, layers), layers)
    if own_base >= max_layers:
        raise ArchiveError(
            f"base {base.name or base.digest} has {own_base} layers archive_overlay did not "
            f"write, which it never merges: image-max-layers {max_layers} leaves no room "
            "for this run's layer"
        )


def squash_window(history: list, layers: int, max_layers: int) -> tuple[int, int] | None:
    """(first, count) of the layers to merge into one so that `layers` fit max_layers;
    None when they fit.  The older half of the runs' layers not merged yet, leaving the
    layers merged before as they are (a registry has them already); once merged layers
    fill half the room, the lightest half of those next to each other (the fewest runs:
    runs of a similar age merge together, so a run's data is rewritten a few times over
    a chain, not at every merge).  More where half is not enough (the newest layer too,
    when the base leaves room for only one)."""
    if layers <= max_layers:
        return None
    first = base_layers(history, layers)
    own, needed = layers - first, layers - max_layers + 1
    entries = [history[i] for i in layer_entries(history)][first:]
    merged = next((i for i, e in enumerate(entries) if not is_merged(e)), len(entries))
    runs = own - merged
    if merged < (max_layers - first) // 2 and runs >= needed:
        return first + merged, max(runs // 2, needed)
    count = min(own, max(merged // 2, needed))
    held = layer_runs(history)[first:]
    starts = range(max(merged, count) - count + 1)
    return first + min(starts, key=lambda i: (sum(held[i : i + count]), -i)), count


def layer_runs(history: list) -> list[int]:
    """For each layer, how many runs it holds: those the hook's entries since the layer
    before it count (a merged layer's runs are listed above its own entry)."""
    held, runs = [], 0
    for entry in history:
        if is_own(entry):
            runs += runs_in(entry)
        if not (isinstance(entry, dict) and entry.get("empty_layer")):
            held.append(runs)
            runs = 0
    return held


def is_merged(entry: object) -> bool:
    """A history entry the hook wrote for a layer it merged."""
    return is_own(entry) and str(entry.get("created_by", "")).endswith(" " + MERGED_BY)  # type: ignore[union-attr]


def squash(layout: Layout, index: dict, base: Base | None, config: dict, layers: list[dict],
           archive: Archive, info: RunInfo, max_layers: int) -> tuple[int, dict[str, str]]:  # fmt: skip
    """Merge layers where the revision would exceed max_layers: how many were merged, and
    the annotation saying which of the base's layers, when they all were the base's."""
    window = squash_window(config["history"], len(layers), max_layers)
    if window is None:
        return 0, {}
    first, count = window
    started = time.monotonic()
    key = None
    if base is not None and first + count <= len(base.manifest["layers"]):
        key = f"{base.digest} {first} {count}"
    media_type = OCI_LAYER_MEDIA_TYPES[archive.compressor or "gzip"]
    merged = merged_before(layout, index, key, first, media_type) if key else None
    if merged is None:
        stats = Stats()

        def write(fd: int) -> None:
            merge_layers(layout.open_blobs(), layers[first : first + count], layers[:first], fd,
                         archive, stats)  # fmt: skip

        layout.put_blob(write, stats)
        assert stats.descriptor is not None
        merged = stats.descriptor
    layers[first : first + count] = [{k: merged[k] for k in ("mediaType", "digest", "size")}]
    config["rootfs"]["diff_ids"][first : first + count] = [merged["diff_id"]]
    merge_history(config["history"], first, count, info, max_layers)
    log.info("layers merged", archive=archive.name, layers=count, into=merged["digest"],
             reused=str(merged.get("reused", False)).lower(), revision_layers=len(layers),
             seconds=round(time.monotonic() - started, 3))  # fmt: skip
    return count, {MERGED_FROM: key} if key else {}


def merged_before(layout: Layout, index: dict, key: str, first: int,
                  media_type: str) -> dict | None:  # fmt: skip
    """The layer an earlier commit on the same base merged from the same layers (a
    container's second stop, a base pinned to a revision before a merge), while it is in
    the layout: the same filesystem, not merged again, and uploaded once."""
    for descriptor in reversed(index["manifests"]):
        if descriptor.get("annotations", {}).get(MERGED_FROM) != key:
            continue
        try:
            manifest = layout.read_blob(descriptor["digest"], "earlier merge's manifest")
            layer = manifest["layers"][first]
            config = layout.read_blob(manifest["config"]["digest"], "earlier merge's config")
            diff_id = config["rootfs"]["diff_ids"][first]
            digest = layer["digest"]
            if (
                layer.get("mediaType") != media_type
                or not DIGEST_RE.fullmatch(digest)
                or lstat_at(layout.open_blobs(), digest.removeprefix("sha256:")) is None
            ):
                continue  # fmt: skip
        except (ArchiveError, KeyError, IndexError, TypeError):
            continue
        return {"mediaType": media_type, "digest": digest, "size": layer["size"],
                "diff_id": diff_id, "reused": True}  # fmt: skip
    return None


def merge_history(history: list, first: int, count: int, info: RunInfo,
                  max_layers: int) -> None:  # fmt: skip
    """The entries of the merged layers marked empty_layer, then one for the merged layer
    saying which runs it holds: every run since the layer before it."""
    positions = layer_entries(history)
    start = positions[first - 1] + 1 if first else 0
    end = positions[first + count - 1] + 1
    held = [e for e in history[start:end] if is_own(e)]
    for i in positions[first : first + count]:
        history[i] = {**history[i], "empty_layer": True}
    runs = sum(runs_in(e) for e in held)
    since = held[0].get("created", "?") if held else "?"
    history.insert(end, {
        "created": info.created,
        "created_by": f"{HISTORY_BY} {__version__} {MERGED_BY}",
        "comment": f"{runs} runs merged into one layer, from {since} "
                   f"(image-max-layers {max_layers})",
    })  # fmt: skip


def runs_in(entry: dict) -> int:
    """How many runs a history entry of the hook's stands for."""
    words = str(entry.get("created_by", "")).split(" ", 2)
    if len(words) == 2:
        return 1  # one run's layer
    if words[-1] == COMPACTED_BY:
        count = str(entry.get("comment", "")).split(" ", 1)[0]
        return int(count) if count.isdigit() else 0
    return 0  # a merged layer: its runs are listed above it


def compact_history(config: dict) -> None:
    """Keep the config well under the 4 MiB podman and skopeo accept: while it is over
    COMPACT_HISTORY_OVER, the older half of the oldest stretch of the hook's empty_layer
    entries becomes one entry counting their runs."""
    while len(canonical_json(config)) > COMPACT_HISTORY_OVER:
        history = config["history"]
        stretch = oldest_empty_stretch(history)
        if len(stretch) < 2:
            return
        half = stretch[: (len(stretch) + 1) // 2]
        entries = [history[i] for i in half]
        history[half[0] : half[-1] + 1] = [{
            "created": entries[0].get("created", ""),
            "created_by": f"{HISTORY_BY} {__version__} {COMPACTED_BY}",
            "comment": f"{sum(runs_in(e) for e in entries)} runs, from "
                       f"{entries[0].get('created', '?')} to {entries[-1].get('created', '?')}",
            "empty_layer": True,
        }]  # fmt: skip


def oldest_empty_stretch(history: list) -> list[int]:
    """Positions of the first run of consecutive empty_layer entries the hook wrote."""
    stretch: list[int] = []
    for i, entry in enumerate(history):
        if is_own(entry) and entry.get("empty_layer"):
            stretch.append(i)
        elif len(stretch) > 1:
            break
        else:
            stretch = []
    return stretch


# ---------------------------------------------------------------------------
# Collecting a layout.  image-keep=N: after a commit, of the revisions in the
# tag's chain (the tagged manifest and those it came from, through
# org.opencontainers.image.base.digest) only the N newest stay in index.json,
# and never one that carries a ref name.  Then every blob that no descriptor
# in index.json reaches is removed (mark and sweep).  Commits hold a shared
# flock(2) on blobs/sha256 from before they read their base until index.json
# names what they wrote; the collector takes it exclusive, without waiting
# (when a commit is in flight, the next commit collects), so it never removes
# a running commit's blobs.  index.json is rewritten before anything is deleted.
# ---------------------------------------------------------------------------

BASE_DIGEST = "org.opencontainers.image.base.digest"
MANIFEST_TYPES = (MANIFEST_MEDIA_TYPE, "application/vnd.docker.distribution.manifest.v2+json")
INDEX_TYPES = (INDEX_MEDIA_TYPE, "application/vnd.docker.distribution.manifest.list.v2+json")


def drop_old_revisions(layout: Layout, index: dict, tip: str, keep: int) -> None:
    """Leave out of index.json the revisions of tip's chain past the `keep` newest."""
    chain, digest = [], tip
    limit = keep + len(index["manifests"])
    while digest and digest not in chain and len(chain) < limit:
        chain.append(digest)
        try:
            manifest = layout.read_blob(digest, "revision")
        except ArchiveError:
            break  # removed already: the chain ends here
        annotations = manifest.get("annotations")
        digest = annotations.get(BASE_DIGEST) if isinstance(annotations, dict) else None
    dropped = set(chain[keep:])
    index["manifests"] = [
        d for d in index["manifests"]
        if d["digest"] not in dropped or REF_NAME in d.get("annotations", {})
    ]  # fmt: skip


def collect(layout: Layout, archive: str) -> None:
    """Remove every blob that index.json does not reach, unless a commit is in flight."""
    blobs_fd = layout.open_blobs()
    try:
        fcntl.flock(blobs_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("collection left to the next commit: another commit is writing to the "
                 "layout", archive=archive, layout=layout.path)  # fmt: skip
        return
    try:
        with layout.locked():
            reached = reached_blobs(layout, layout.read_index())
            if reached is not None:
                sweep(layout, reached, archive)
    finally:
        fcntl.flock(blobs_fd, fcntl.LOCK_UN)


def reached_blobs(layout: Layout, index: dict) -> set[str] | None:
    """The digests of every blob a descriptor of the index reaches, through manifests and
    nested indexes; None (collect nothing) if one of them cannot be read."""
    reached: set[str] = set()
    todo = list(index["manifests"])
    while todo:
        descriptor = todo.pop()
        digest = descriptor.get("digest")
        if not isinstance(digest, str) or digest in reached:
            continue
        reached.add(digest)
        media_type = descriptor.get("mediaType")
        if media_type not in MANIFEST_TYPES + INDEX_TYPES:
            continue  # a layer, a config, or a blob of another kind: nothing inside it
        try:
            value = layout.read_blob(digest, "manifest")
        except ArchiveError as exc:
            log.warning("nothing collected: a blob index.json reaches cannot be read",
                        layout=layout.path, error=str(exc))  # fmt: skip
            return None
        for key in ("config", "subject"):
            if isinstance(value.get(key), dict):
                todo.append(value[key])
        for key in ("layers", "manifests", "blobs"):
            if isinstance(value.get(key), list):
                todo += [d for d in value[key] if isinstance(d, dict)]
    return reached


def sweep(layout: Layout, reached: set[str], archive: str) -> None:
    blobs_fd = layout.open_blobs()
    removed = freed = 0
    for name in os.listdir(blobs_fd):
        if not DIGEST_RE.fullmatch("sha256:" + name) or "sha256:" + name in reached:
            continue
        st = lstat_at(blobs_fd, name)
        os.unlink(name, dir_fd=blobs_fd)
        removed += 1
        freed += st.st_size if st is not None else 0
    if removed:
        os.fsync(blobs_fd)
    log.info("layout collected", archive=archive, layout=layout.path, blobs_removed=removed,
             bytes_freed=freed)  # fmt: skip


# ---------------------------------------------------------------------------
# Pushing a revision.  image-push=REF: once index.json names the new revision,
# skopeo (containers/image, the library podman and buildah push with: their
# auth files, certs.d, registries.conf, Bearer and Basic auth, HEAD before each
# upload) copies exactly that manifest to REF, from a private layout in the
# layout's directory whose index names only it and whose blobs are the
# layout's own.  Bounded in time; a failure fails the archive, the local
# commit stands.
# ---------------------------------------------------------------------------

DEFAULT_SKOPEO = "/usr/bin/skopeo"
DEFAULT_PUSH_TIMEOUT = 120  # seconds, the whole skopeo run
PUSH_NAME = "push"  # the private layout's temporary name and its one ref name
# distribution's reference grammar: a registry host (a dot, a port or localhost tells it
# from a repository component), lowercase path components, an optional tag; no digest.
HOST_PART = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
PUSH_REF_RE = re.compile(
    rf"(?P<host>(?:{HOST_PART}(?:\.{HOST_PART})*|\[[0-9A-Fa-f:]+\])(?::[0-9]{{1,5}})?)"
    rf"/(?P<repo>{PATH_PART}(?:/{PATH_PART})*)(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
)
# What skopeo says, as the user needs to read it; the first found names the cause.
PUSH_CAUSES = (
    "unauthorized", "authentication required", "permission denied", "denied",
    "certificate signed by unknown authority",
    "certificate", "connection refused", "no such host", "i/o timeout", "no route to host",
    "server gave HTTP response to HTTPS client", "no space left on device", "manifest invalid",
    "blob unknown", "name unknown", "too many requests",
)  # fmt: skip
LOGRUS_MSG_RE = re.compile(r'msg="((?:[^"\\]|\\.)*)"')


class PushSettings:
    """What the command line sets for pushing (--skopeo, --push-timeout, --auth-file)."""

    def __init__(self, skopeo: str, timeout: float, auth_file: str | None) -> None:
        self.skopeo = skopeo
        self.timeout = timeout
        self.auth_file = auth_file


push_settings = PushSettings(DEFAULT_SKOPEO, DEFAULT_PUSH_TIMEOUT, None)


def configure_push(settings: PushSettings) -> None:
    """Set once by main(), as configure_logging sets the log's sinks."""
    global push_settings
    push_settings = settings


def push_ref_problem(ref: str) -> str | None:
    """Why ref is not host[:port]/repo[:tag] (docker:// allowed), or None."""
    found = PUSH_REF_RE.fullmatch(ref.removeprefix("docker://"))
    host = found.group("host") if found else ""
    if found is None or not ("." in host or ":" in host or host == "localhost"):
        return f"image-push {ref[:80]!r} is not a registry reference host[:port]/repo[:tag]"
    if len(host) + 1 + len(found.group("repo")) > 255:
        return f"image-push {ref[:80]!r}: the repository name is over 255 characters"
    return None


def push_ref_template_problem(template: str, name: str) -> str | None:
    """push_ref_problem with placeholders put in as a run would (a stand-in id and time)."""
    sample = {"id": "0" * 64, "name": name, "time": "20261127T093015Z"}
    try:
        return push_ref_problem(expand(template, sample, "image-push"))
    except ArchiveError as exc:
        return str(exc)


def push_revision(layout: Layout, manifest: dict, archive: Archive) -> None:
    """The committed revision, by its manifest digest, to image-push's registry."""
    if not archive.image_push:
        return
    ref = archive.image_push.removeprefix("docker://")
    started = time.monotonic()
    remove_stale_temporaries(layout.fd, PUSH_NAME, layout.path)
    tmp = temp_name(PUSH_NAME)
    try:
        os.mkdir(tmp, 0o700, dir_fd=layout.fd)
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=layout.fd)
    except OSError as exc:
        raise ArchiveError(f"image-push {ref}: cannot prepare the push: {describe(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live temporary: see is_stale
        write_push_layout(fd, manifest)
        run_skopeo(layout.path, tmp, ref, manifest["digest"])
    except OSError as exc:
        raise ArchiveError(f"image-push {ref}: cannot prepare the push: {describe(exc)}") from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            remove_at(layout.fd, tmp)
    log.info("revision pushed", archive=archive.name, image_push=ref, manifest=manifest["digest"],
             seconds=round(time.monotonic() - started, 3))  # fmt: skip


def write_push_layout(dir_fd: int, manifest: dict) -> None:
    """A layout whose index names only this manifest; its blobs are the layout's (a symlink)."""
    index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE,
             "manifests": [{**manifest, "annotations": {REF_NAME: PUSH_NAME}}]}  # fmt: skip
    for name, data in ((LAYOUT_FILE, {"imageLayoutVersion": "1.0.0"}), (INDEX_FILE, index)):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644,
                     dir_fd=dir_fd)  # fmt: skip
        with open(fd, "wb") as f:
            f.write(canonical_json(data))
    os.symlink("../blobs", "blobs", dir_fd=dir_fd)


def run_skopeo(layout_path: str, tmp: str, ref: str, digest: str) -> None:
    """skopeo copy, bounded by --push-timeout; the digest it pushed must be ours."""
    import subprocess

    settings = push_settings
    auth = ["--authfile", settings.auth_file] if settings.auth_file else []
    digest_file = posixpath.join(tmp, "pushed-digest")
    cmd = [settings.skopeo, "copy", "--quiet", "--preserve-digests", "--retry-times", "0",
           "--digestfile", digest_file, *auth, f"oci:{tmp}:{PUSH_NAME}", f"docker://{ref}"]  # fmt: skip
    log.debug("pushing", command=" ".join(cmd), cwd=layout_path)
    try:
        proc = subprocess.run(cmd, cwd=layout_path, env=skopeo_environment(), check=False,
                              stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=settings.timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ArchiveError(
            f"image-push {ref}: timed out: revision {digest} committed, not pushed "
            f"(no push within {settings.timeout:g} s, --push-timeout; skopeo killed)"
        ) from None
    except OSError as exc:
        raise ArchiveError(
            f"image-push {ref}: cannot run {settings.skopeo} (--skopeo): {exc.strerror}"
        ) from None
    if proc.returncode != 0:
        cause, said = push_failure(proc.stderr.decode(errors="replace"))
        raise ArchiveError(f"image-push {ref}: {cause}: revision {digest} committed, not pushed "
                           f"(skopeo: {said})")  # fmt: skip
    with open(posixpath.join(layout_path, digest_file), encoding="ascii") as f:
        pushed = f.read().strip()
    if pushed != digest:
        raise ArchiveError(f"image-push {ref}: the registry holds {pushed}, not {digest}")


def skopeo_environment() -> dict[str, str]:
    """The hook's own environment (podman's is empty: skopeo then looks where root's
    podman keeps credentials).  In rootless podman's user namespace the hook is uid 0 but
    /root is not its own: HOME and XDG_RUNTIME_DIR, when unset, are those of the user that
    uid 0 maps to, the places that user's podman and skopeo use."""
    env = dict(os.environ)
    uid = user_behind_root()
    if uid is None:
        return env
    if "HOME" not in env:
        with contextlib.suppress(KeyError):
            env["HOME"] = pwd.getpwuid(uid).pw_dir
    runtime_dir = f"/run/user/{uid}"
    if "XDG_RUNTIME_DIR" not in env and os.path.isdir(runtime_dir):
        env["XDG_RUNTIME_DIR"] = runtime_dir
    return env


def user_behind_root() -> int | None:
    """In a user namespace, the host uid that its uid 0 is; None in the initial one."""
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inside, outside, _ = line.split()
                if inside == "0":
                    return int(outside) if outside != "0" else None
    except (OSError, ValueError):
        pass
    return None


def push_failure(stderr: str) -> tuple[str, str]:
    """The cause skopeo's last words name, and those words (its logrus msg unquoted)."""
    lines = [line for line in stderr.splitlines() if line.strip()] or ["no message"]
    found = LOGRUS_MSG_RE.search(lines[-1])
    said = found.group(1).replace('\\"', '"') if found else lines[-1]
    cause = next((c for c in PUSH_CAUSES if c in said), "skopeo failed")
    return cause, said[:2000]


# ---------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------


def archive_one(archive: Archive, config: dict, bundle: str, opts: Options,
                info: RunInfo) -> None:  # fmt: skip
    started = time.monotonic()
    expand_placeholders(archive, info)
    excluded = parse_exclude(archive.exclude)
    upper = locate_upper(archive.mount_point, config, bundle, opts.mount_program)
    excluded = container_paths(excluded, upper, archive)
    log.debug("upperdir found", archive=archive.name, upperdir=upper.path,
              markers=",".join(upper.marker_prefixes))  # fmt: skip
    if archive.success:
        check_allowed(archive.success, opts.allow_dirs, "success")
    if archive.method in IMAGE_METHODS:
        stats = write_revision(archive, upper, opts.allow_dirs, info, excluded)
    else:
        dest = Destination(archive.archive_to, opts.allow_dirs, archive.name,
                           replace=not archive.archive_to_once)  # fmt: skip
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
    fields = {"manifest": stats.descriptor["digest"], "image_tag": archive.image_tag,
              "layers": str(stats.layers)}  # fmt: skip
    if stats.merged:
        fields["merged_layers"] = str(stats.merged)
    return fields


def write_archive(archive: Archive, upper: Upper, dest: Destination,
                  excluded: frozenset[bytes] = frozenset()) -> Stats:  # fmt: skip
    is_dir = archive.method == "copy"
    dest.check_kind(is_dir)
    if archive.method.startswith("oci-layer"):
        dest.check_companion(".json")
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
    now = time.time()
    info = RunInfo(container_id if isinstance(container_id, str) else None, time.gmtime(now),
                   int(now % 1 * 1_000_000))  # fmt: skip
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
                     digest (default: the base of this container's earlier
                     commit there, else what image-tag names now)
  image-max-layers   oci-image: at most this many layers in a revision (default
                     100); past it, the older half of the hook's own layers merge
  image-keep         oci-image: keep only the N newest revisions of the tag's chain
                     in index.json, and remove the blobs nothing reaches (default:
                     keep everything)
  image-push         oci-image: push the committed revision to this registry
                     reference, host[:port]/repo[:tag] (skopeo, bounded by
                     --push-timeout; a failed push fails the archive, the
                     local commit stands)
\b
mount-point / means the container's root filesystem (config.json root.path).
archive-to, success, image-tag and image-push may hold {{id}} (the container's id),
{{name}} (the archive's NAME), {{time}} (UTC, e.g. 20261127T093015.123456Z); {{{{ and
}}}} are braces.
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
@click.option(
    "--skopeo",
    default=DEFAULT_SKOPEO,
    show_default=True,
    help="The skopeo binary that pushes image-push revisions (the hook's PATH is empty).",
)
@click.option(
    "--push-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_PUSH_TIMEOUT,
    show_default=True,
    help="Seconds one push may take; then skopeo is killed and the archive fails.",
)
@click.option(
    "--auth-file",
    default=None,
    help="Registry credentials for image-push (default: containers-auth.json(5)'s places).",
)
@click.version_option(__version__, "--version", "-v", prog_name="archive_overlay")
@click.argument("ignored", nargs=-1, metavar="")
def main(log_level: str, use_syslog: bool, log_file: str | None, mount_program: str,
         allow_dirs: tuple[str, ...], skopeo: str, push_timeout: float, auth_file: str | None,
         ignored: tuple[str, ...]) -> None:  # fmt: skip
    configure_logging(log_level.lower(), use_syslog, log_file)
    configure_push(PushSettings(skopeo, push_timeout, auth_file))
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
