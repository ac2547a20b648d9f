"""Bad input, property-based: whatever arrives, the hook ends cleanly and writes nothing stray.

Hypothesis generates state JSON (valid, malformed, wrong types, huge, deeply
nested, invalid UTF-8, empty), config.json files and annotation sets (odd names,
unknown args, bad owners and levels, NULs, long values, relative and escaping
paths). More than 10,000 of them per run go through the hook in-process
(click's CliRunner: a subprocess each would take minutes); a few hundred also
go through the installed script as a subprocess, and must end the same way.

Every input must end with the one exit status the README gives its class: 2 for
unusable input or a command line click refuses, 0 for --help and --version or
when no archive is asked for, else 1 when an archive failed and 0 when each was
written (every archive asked for ends in exactly one record saying which). It
must log no traceback, leave the upperdir, the bundle, a sentinel directory and
the working directory untouched, and leave in the scratch directory only the
archive, descriptor and success paths it asked for: no temporary, nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner
from conftest import PREFIX, requires_root
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytestmark = requires_root  # a tmpfs scratch (fast fsync) and device nodes in the upperdir

ARGS = ["mount-point", "archive-to", "success", "method", "tar-content-owner", "compression-level",
        "exclude", "image-tag", "image-base", "image-max-layers", "image-keep"]  # fmt: skip
METHODS = ["copy", "tar", "tar.gz", "tar.zst", "oci-layer", "oci-layer+zstd", "oci-image",
           "oci-image+zstd"]  # fmt: skip
# What the placeholders of archive-to, success and image-tag may become (README, Annotations)
PLACEHOLDERS = {"{name}": "[^/]+", "{id}": "[^/]+", "{time}": r"\d{8}T\d{6}Z",
                "{{": r"\{", "}}": r"\}"}  # fmt: skip
LEVELS = ["trace", "debug", "info", "warn", "warning", "error", "fatal", "panic"]
SETTINGS = {
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
        HealthCheck.large_base_example,
    ],
}


# --- the world every input runs in ------------------------------------------------------


@dataclass
class World:
    """A tmpfs holding a small upperdir, bundles, the scratch dir, a sentinel and a cwd."""

    root: Path

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def fuzz_bundle(self) -> Path:
        """The bundle whose config.json each input may bring."""
        return self.root / "fuzz-bundle"

    @property
    def out(self) -> Path:
        """The scratch dir: archive-to and success paths point here."""
        return self.root / "out"

    @property
    def sentinel(self) -> Path:
        return self.root / "sentinel"

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    def build(self) -> None:
        for d in ("upper/dir", "bundle", "fuzz-bundle", "out", "sentinel/sub", "cwd", "merged"):
            (self.root / d).mkdir(parents=True)
        (self.upper / "hello").write_text("hello\n")
        (self.upper / "dir" / "file").write_bytes(os.urandom(3000))
        os.symlink("/etc/shadow", self.upper / "shadow")
        os.mkfifo(self.upper / "fifo")
        os.mknod(self.upper / "gone", stat.S_IFCHR, os.makedev(0, 0))  # a whiteout
        os.setxattr(self.upper / "dir", "trusted.overlay.opaque", b"y")
        (self.sentinel / "keep").write_text("the sentinel must not change\n")
        (self.sentinel / "sub" / "keep").write_text("nor here\n")
        config = {"ociVersion": "1.0.2", "mounts": self.mounts(), "annotations": {}}
        (self.bundle / "config.json").write_text(json.dumps(config))
        self.reset()

    def mounts(self) -> list[dict]:
        """Overlay-shaped mounts (none mounted): /data has a real upperdir, the others fail."""
        return [
            {"destination": "/data", "type": "overlay", "source": str(self.merged),
             "options": [f"lowerdir={self.root}/lower", f"upperdir={self.upper}",
                         f"workdir={self.root}/work", "private"]},
            {"destination": "/ro", "type": "overlay", "source": "overlay",
             "options": [f"lowerdir={self.root}/lower"]},
            {"destination": "/bind", "type": "bind", "source": str(self.merged),
             "options": ["bind"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": []},
        ]  # fmt: skip

    def reset(self) -> None:
        """Empty the scratch dir but for `escape`, a symlink leading to the sentinel."""
        for name in os.listdir(self.out):
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        os.symlink(self.sentinel, self.out / "escape")

    def fixed(self) -> dict[bytes, tuple]:
        """Everything outside the scratch dir and the per-input bundle, lstat'ed."""
        skip = {os.fsencode(self.out), os.fsencode(self.fuzz_bundle)}
        found = {}
        for dirpath, dirnames, filenames in os.walk(os.fsencode(self.root)):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st_ = os.lstat(path)
                link = os.readlink(path) if stat.S_ISLNK(st_.st_mode) else None
                found[path] = (st_.st_mode, st_.st_uid, st_.st_gid, st_.st_size,
                               st_.st_mtime_ns, st_.st_ctime_ns, link)  # fmt: skip
        return found

    def strays(self, asked: set[str]) -> list[bytes]:
        """Entries in the scratch dir that are neither asked for nor a parent of one."""
        wanted: set[bytes] = {b"escape"}
        parents: set[bytes] = set()
        patterns: list[re.Pattern[bytes]] = []
        out = os.fsencode(self.out)
        for value in asked:
            if "{" in value or "}" in value:
                pattern = placeholder_pattern(value, str(self.out))
                if pattern is not None:
                    patterns.append(pattern)
            try:
                path = os.path.normpath(os.fsencode(value))
            except UnicodeEncodeError:
                continue  # a lone surrogate: no such file can be made
            if not path.startswith(out + b"/"):
                continue
            rel = os.path.relpath(path, out)
            wanted |= {rel, rel + b".json"}  # oci-layer writes <archive-to>.json beside it
            while b"/" in rel:
                rel = rel.rpartition(b"/")[0]
                parents.add(rel)
        strays, stack = [], [b""]
        while stack:
            rel_dir = stack.pop()
            for name in os.listdir(os.path.join(out, rel_dir) if rel_dir else out):
                rel = os.path.join(rel_dir, name) if rel_dir else name
                if rel in wanted or any(p.fullmatch(rel) for p in patterns):
                    continue  # an archive or success file: what it holds is the hook's
                if rel in parents and stat.S_ISDIR(os.lstat(os.path.join(out, rel)).st_mode):
                    stack.append(rel)
                    continue
                strays.append(rel)
        return strays


def placeholder_pattern(value: str, out: str) -> re.Pattern[bytes] | None:
    """What a path with placeholders directly in the scratch dir may become, relative to it
    (with `.json` for an oci-layer's descriptor)."""
    prefix = out + "/"
    if not value.startswith(prefix) or "/" in value[len(prefix) :]:
        return None
    try:
        parts = re.split("({name}|{id}|{time}|{{|}})", value[len(prefix) :])
        regex = "".join(PLACEHOLDERS.get(part, re.escape(part)) for part in parts)
        return re.compile(os.fsencode(f"(?:{regex})(?:\\.json)?"))
    except UnicodeEncodeError:
        return None


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("fuzz")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(root)], check=True)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        w = World(root)
        w.build()
        yield w
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # the hook in-process installs its own
        structlog.reset_defaults()
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.fixture(scope="module")
def hook_main(hook_bin):
    """The hook's click command, imported once the installed copy is current."""
    from archive_overlay import main

    return main


# --- one input, run and checked -----------------------------------------------------------


@dataclass
class Input:
    args: list[str]
    stdin: bytes
    config: bytes | None = None  # the per-input bundle's config.json, when it has one
    asked: set[str] = field(default_factory=set)  # the path values the annotations hold
    odd_args: bool = False  # junk on the command line


@dataclass
class Outcome:
    status: int
    output: str


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_in_process(main, world: World, given: Input) -> Outcome:
    with working_directory(world.cwd):
        result = CliRunner().invoke(main, given.args, input=given.stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        trace = "".join(traceback.format_exception(*result.exc_info))  # type: ignore[misc]
        raise AssertionError(f"uncaught exception (a Traceback):\n{trace}\n{given}")
    return Outcome(result.exit_code, result.output)


def run_subprocess(hook_bin: Path, world: World, given: Input) -> Outcome:
    proc = subprocess.run(
        [str(hook_bin), *given.args], input=given.stdin, capture_output=True, env={},
        cwd=world.cwd, timeout=60, check=False,
    )  # fmt: skip
    return Outcome(proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace"))


WITH_VALUE = ("--log-level", "--allow-dir", "--mount-program")
EAGER = ("--help", "-h", "--version", "-v")


class CommandLine:
    """What the README (Command line) makes of the arguments: `usage` when click refuses them
    (an unknown option, an option without its value, a log level not in the list: exit 2,
    nothing read), `eager` for --help/--version (exit 0, nothing read), and the log level the
    run logs at. Extra words, and everything after `--`, are ignored with a warning."""

    def __init__(self, args: list[str]) -> None:
        self.usage = self.eager = False
        self.level = "info"
        rest = list(args)
        while rest:
            arg = rest.pop(0)
            name, equals, value = arg.partition("=")
            if arg == "--":
                break
            if name in WITH_VALUE:
                if not equals:
                    if not rest:
                        self.usage = True  # checked while parsing: before --help
                        return
                    value = rest.pop(0)
                if name == "--log-level":
                    self.level = value
            elif arg in EAGER:
                self.eager = True
            elif arg.startswith("-") and arg != "-":
                self.usage = True
                return
        if not self.eager and self.level.lower() not in LEVELS:
            self.usage = True

    @property
    def shows(self) -> set[str]:
        """The levels of the records it logs."""
        order = ["debug", "info", "warning", "error"]
        level = {"trace": "debug", "warn": "warning"}.get(self.level.lower(), self.level.lower())
        return set(order[order.index(level) :]) if level in order else set()


def decoded(data: bytes | None) -> object:
    """The JSON value, or None when Python's json cannot read it."""
    try:
        return json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        return None


def asked_archives(state: dict, config: dict) -> set[str]:
    """The archive names the annotations name, as the README says they merge."""
    merged: dict[str, str] = {}
    for found in (config.get("annotations"), state.get("annotations")):
        if isinstance(found, dict):
            merged.update({k: v for k, v in found.items() if isinstance(v, str)})
    return {k[len(PREFIX) :].partition(".")[0] for k in merged if k.startswith(PREFIX)}


def expected_status(world: World, given: Input) -> int | None:
    """README, Command line: 2 for unusable input (stdin not a JSON object, no bundle,
    config.json missing or not JSON) or a command line click refuses; 0 for --help and
    --version, or when no archive is asked for; None when archives are asked for: then
    0 exactly when every one was written, 1 when any failed (see `status_of_archives`)."""
    command = CommandLine(given.args)
    if command.usage:
        return 2
    if command.eager:
        return 0
    read = state_and_config(world, given)
    if read is None:
        return 2
    return None if asked_archives(*read) else 0


def state_and_config(world: World, given: Input) -> tuple[dict, dict] | None:
    """The state and the config.json the input names, when both are JSON objects."""
    state = decoded(given.stdin)
    bundle = state.get("bundle") if isinstance(state, dict) else None
    if not isinstance(state, dict) or not isinstance(bundle, str) or not bundle:
        return None
    configs = {str(world.bundle): (world.bundle / "config.json").read_bytes(),
               str(world.fuzz_bundle): given.config}  # fmt: skip
    config = decoded(configs.get(os.path.normpath(os.path.join(str(world.cwd), bundle))))
    if not isinstance(config, dict):
        return None  # no other directory of the world holds a config.json: unusable
    return state, config


WRITTEN = re.compile(r' level=info event="archive written" ')
FAILED = re.compile(r' level=error event="archive failed" ')


def status_of_archives(world: World, given: Input, got: Outcome) -> int | None:
    """Each archive asked for ends in one record, `archive written` or `archive failed`: the
    status is 1 when any failed, else 0. None where the level hides both (fatal, panic)."""
    shows = CommandLine(given.args).shows
    read = state_and_config(world, given)
    assert read is not None
    asked = asked_archives(*read)
    lines = got.output.splitlines()
    written = sum(1 for line in lines if WRITTEN.search(line))
    failed = sum(1 for line in lines if FAILED.search(line))
    if "info" in shows:
        assert written + failed == len(asked), (written, failed, asked, got, given)
    elif "error" in shows:
        assert failed <= len(asked), (failed, asked, got, given)
    else:
        return None
    return 1 if failed else 0


def logged(output: str) -> bool:
    """Whether the hook logged a record (a line of its own, not the echo of an argument
    such as --log-level=debug in click's usage error)."""
    return any(line.startswith("timestamp=") for line in output.splitlines())


def check(run, world: World, given: Input) -> Outcome:
    """Run one input on a clean scratch dir and check every property; return what it did."""
    world.reset()
    if given.config is not None:
        (world.fuzz_bundle / "config.json").write_bytes(given.config)
    before = world.fixed()
    got = run(given)
    want = expected_status(world, given)
    if want is None:
        want = status_of_archives(world, given, got)
    if want is None:  # fatal and panic log neither outcome: 0 or 1, the log cannot tell
        assert got.status in (0, 1), (got, given)
    else:
        assert got.status == want, (got, given)
    assert "Traceback" not in got.output, (got, given)
    command = CommandLine(given.args)
    if command.usage:
        assert "Error: " in got.output and not logged(got.output), (got, given)
    elif command.eager:
        assert not logged(got.output), (got, given)  # help or version, nothing read
    elif "error" in command.shows:
        if got.status == 2:
            assert 'event="unusable input"' in got.output, (got, given)
        elif got.status == 0:
            assert "level=error" not in got.output, (got, given)
    assert world.fixed() == before, ("wrote outside the scratch dir", got, given)
    strays = world.strays(given.asked)
    assert not strays, (f"not asked for: {strays}", got, given)
    return got


# --- strategies -----------------------------------------------------------------------------

# Free text never starts with "/": a random absolute path must never be an archive-to.
free_text = st.text(max_size=16).map(lambda s: s.lstrip("/"))
long_text = st.integers(0, 300_000).map(lambda n: "v" * n)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), free_text,
    st.sampled_from(["\x00", "\ud800", "\udcff", "é", "\u202e", "\n"]),
)  # fmt: skip


# JSON this shallow parses at any stack depth, this deep at none (Python's json recurses):
# between them, whether it parses depends on how deep the caller's stack is already.
SHALLOW, TOO_DEEP = 200, 100_000


def nested(depth: int) -> object:
    value: object = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"n": value}
    return value


# Ready-made odd JSON values: drawing one costs far less than building a random tree.
JSON_ZOO = [
    [], {}, [None], {"": ""}, [[[]]], {"a": {"b": {"c": None}}}, list(range(100)),
    {f"k{i}": i for i in range(100)}, [{"x": [1.5, True, "s"]}], nested(100), ["x" * 10_000],
    {"\x00": "\x00"}, [float("nan"), float("inf")], 2**70, -(2**63), 1e308, [1, [2, [3]]],
]  # fmt: skip
json_values = st.one_of(json_scalars, st.sampled_from(JSON_ZOO))
json_trees = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(free_text, inner, max_size=3),
    max_leaves=5,
)
archive_names = st.one_of(
    st.sampled_from(["data", "a", "b", "", "x.y", ".", "日本", "n" * 300, "with space", "\x00"]),
    free_text,
)
owners = st.one_of(
    st.sampled_from([
        "0", "1000", "1000:1000", "-1", "-1:-1", "a:b", "1:2:3", ":", "1:", ":1", "",
        "4294967294", "4294967295", "4294967296:0", "99999999999999999999", "0x10", " 1",
        "1 ", "+1", "\u0661", "1\x00", "1" * 5000, "1:" + "2" * 5000, "1_000",
    ]),
    st.integers().map(str),
    st.tuples(st.integers(), st.integers()).map(lambda t: f"{t[0]}:{t[1]}"),
    free_text,
)  # fmt: skip
compression_levels = st.one_of(
    st.sampled_from(["0", "3", "22", "-1", "99", "", "1e3", "3.0", " 2", "1" * 5000, "٣"]),
    st.integers().map(str),
    free_text,
)
excludes = st.sampled_from(
    ["/dir", "/dir:/file", "/a,/b", "rel", "/x:rel", "/", "//", "/..", ":", ",", "", "/\x00"]
) | free_text  # fmt: skip
methods = st.sampled_from(METHODS + ["", "zip", "COPY", "tar.gz ", "tar.bz2", "oci-image+gz"])
methods = methods | st.sampled_from(["oci-image", "oci-image+zstd"]) | free_text
image_tags = st.sampled_from(
    ["data", "v1.2", "team/data-2026", "{name}", "{name}-{time}", "{id}", "", "UP", "a..b", "-x",
     "{nope}", "{", "}", "x" * 200, "a b", "data\x00"]
) | free_text  # fmt: skip
counts = st.one_of(
    st.sampled_from(["0", "1", "2", "3", "100", "", "-1", "2.0", " 2", "1" * 12, "٣", "0x10"]),
    st.integers(-5, 1000).map(str),
    free_text,
)  # image-max-layers and image-keep
image_bases = st.sampled_from(
    ["data", "missing", "sha256:" + "0" * 64, "sha256:bad", "sha256:", "", "{name}", "v1.2"]
) | free_text  # fmt: skip
mount_points = st.sampled_from(
    ["/data", "/data/", "//data", "/data/../data", "/ro", "/bind", "/tmp", "/missing", "", "data",
     "/", "\x00", "/data\x00"]
) | free_text  # fmt: skip
log_levels = st.sampled_from(LEVELS + [level.upper() for level in LEVELS])
odd_args = st.lists(
    st.sampled_from(["--help", "-h", "--version", "-v", "--log-level", "loud", "--nope", "-x",
                     "--allow-dir", "--mount-program", "--", "-", "info", "--log-level=debug",
                     "--log-level=LOUD"]),
    max_size=4,
)  # fmt: skip


class Strategies:
    """The strategies that name the world's paths, built once (building them per draw is slow).

    `confined` inputs run with --allow-dir (never covering the sentinel), and only
    they may name paths that lead out of the scratch dir: those must be refused.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        out, root, sentinel = str(world.out), str(world.root), str(world.sentinel)
        inside = [
            f"{out}/a", f"{out}/b", f"{out}/a.tar.gz", f"{out}/nested/deeper/c", f"{out}/a/inner",
            f"{out}//b", f"{out}/./a", f"{out}/a/", f"{out}/x/../b", f"{out}/ok", f"{out}/sp ace",
            f"{out}/" + "n" * 300, f"{out}/\udcff", f"{out}/\x00x", f"{out}/\ud800",
            f"{out}/.wh.x", f"{out}/.a.archive_overlay-tmp-1-00",
            f"{out}/{{name}}", f"{out}/{{name}}-{{time}}.tar", f"{out}/{{id}}", f"{out}/{{{{x}}}}",
            f"{out}/{{nope}}", f"{out}/{{", f"{out}/}}", f"{out}/{{id}}-{{name}}.d",
        ]  # fmt: skip
        relative = ["", "rel", "rel/x", ".", "..", "./x", "~/x", "-", "a\x00b", "\t", "rel/../.."]
        escaping = [
            f"{sentinel}/z", f"{out}/../sentinel/z", f"{out}/escape/z", f"{out}/escape",
            f"{out}/escape/", f"{out}/escape/..", f"{out}/escape/sub/z", f"{root}/z", sentinel,
            "/", "//", f"{out}/../../z", f"{out}/escape/{{name}}", f"{sentinel}/{{time}}",
        ]  # fmt: skip
        self.allow_dirs = st.lists(
            st.sampled_from([out, f"{out}/", f"{out}/a", f"{root}/none", "", "relative",
                             f"{out}/../out"]),
            min_size=1, max_size=3,
        )  # fmt: skip
        self.values: dict[bool, dict[str, st.SearchStrategy]] = {}
        self.stray_values: dict[bool, dict[str, st.SearchStrategy]] = {}
        for confined in (False, True):
            paths = st.sampled_from(inside + relative + (escaping if confined else [])) | free_text
            self.values[confined] = {
                "mount-point": mount_points, "archive-to": paths, "success": paths,
                "method": methods, "tar-content-owner": owners,
                "compression-level": compression_levels, "exclude": excludes,
                "image-tag": image_tags, "image-base": image_bases,
                "image-max-layers": counts, "image-keep": counts,
            }  # fmt: skip
            self.stray_values[confined] = {
                arg: value | json_values | long_text for arg, value in self.values[confined].items()
            }
        self.other_values = free_text | json_values | long_text
        self.bundles = st.sampled_from([
            str(world.bundle), str(world.bundle) + "/", str(world.root / "missing"),
            str(world.bundle / "config.json"), str(world.upper), "bundle", "", "\x00",
            str(world.bundle) + "\x00", str(world.bundle) + "\ud800", "/" + "b" * 5000,
        ]) | json_values  # fmt: skip
        bundle = os.fsencode(world.bundle)
        self.fixed_stdins = st.sampled_from([
            b"", b" ", b"\n\t", b"\x00", b"null", b"[]", b'"x"', b"1", b"{}", b"\xef\xbb\xbf{}",
            b"{" * 3, b'{"bundle": null}', b'{"bundle": ""}', b'{"bundle": 1}',
            b'{"bundle": "' + bundle + b'"', b'{"bundle": "' + bundle + b'"}\x00',
            b'{"bundle": "' + bundle + b'", "annotations": 1e999999}',
            b'{"bundle": "\xff\xfe"}', b'{"pid": ' + b"9" * 5000 + b"}", b"NaN", b"-Infinity",
            b'{"bundle": "' + bundle + b'", "bundle": 3}',
        ])  # fmt: skip
        options = st.sampled_from([
            f"upperdir={world.upper}", f"upperdir={world.upper}/dir", f"upperdir={root}/none",
            f"upperdir={world.bundle}/config.json", f"upperdir={world.upper}/shadow", "upperdir=",
            "upperdir=rel", "upperdir", f"lowerdir={root}/lower", "userxattr", "private", "ro",
            "redirect_dir=on", "", "=", "bind",
        ]) | free_text.map(lambda s: "x-" + s) | json_scalars  # fmt: skip
        mount = st.fixed_dictionaries(
            {},
            optional={
                "destination": st.sampled_from(["/data", "/data/", "/other", "", "data"]) | json_values,
                "type": st.sampled_from(["overlay", "bind", "tmpfs", "Overlay", ""]) | json_values,
                "source": st.sampled_from([str(world.merged), "overlay", "", "rel"]) | json_values,
                "options": st.lists(options, max_size=6) | json_values,
            },
        )  # fmt: skip
        self.mounts = st.lists(mount | json_values, max_size=3) | json_values
        self.annotations = {c: annotation_maps(self, c) for c in (False, True)}
        self.cli = {c: cli_args(self, c) for c in (False, True)}


@st.composite
def annotation_maps(draw, s: Strategies, confined: bool) -> dict[str, object]:
    """Complete archives (mount-point + archive-to, maybe more) and stray annotations."""
    annotations: dict[str, object] = {}
    for _ in range(draw(st.integers(0, 3))):
        name = draw(archive_names)
        extra = draw(st.integers(0, 2 ** (len(ARGS) - 2) - 1))  # which optional args: one draw
        for i, arg in enumerate(ARGS):
            if i < 2 or extra & (1 << (i - 2)):
                annotations[f"{PREFIX}{name}.{arg}"] = draw(s.values[confined][arg])
    for _ in range(draw(st.integers(0, 3))):
        arg = draw(st.sampled_from(ARGS + ["unknown", "", "archive-to.x", "MOUNT-POINT"]))
        form = draw(st.integers(0, 5))
        if form == 0:
            key = draw(free_text)
        else:
            name = draw(archive_names)
            key = [f"{PREFIX}{name}.{arg}", f"{PREFIX}{name}", PREFIX, f"{PREFIX}.{arg}",
                   f"other.prefix.{arg}"][form - 1]  # fmt: skip
        annotations[key] = draw(s.stray_values[confined].get(arg, s.other_values))
    return annotations


def asked_paths(*maps: object) -> set[str]:
    return {v for m in maps if isinstance(m, dict) for v in m.values() if isinstance(v, str)}


@st.composite
def cli_args(draw, s: Strategies, confined: bool) -> list[str]:
    args: list[str] = []
    if draw(st.booleans()):
        args += ["--log-level", draw(log_levels)]
    if confined:
        for allowed in draw(s.allow_dirs):
            args += ["--allow-dir", allowed]
    if draw(st.integers(0, 9)) == 0:
        args += ["--mount-program", draw(st.sampled_from(["/nonexistent", "", "fuse"]))]
    return args


def encode(value: object, how: int) -> bytes:
    """JSON bytes: ASCII-escaped, raw UTF-8 (lone surrogates kept: invalid UTF-8), or UTF-16."""
    if how == 0:
        return json.dumps(value).encode()
    text = json.dumps(value, ensure_ascii=False)
    return text.encode("utf-16" if how == 2 else "utf-8", "surrogatepass")


@st.composite
def mangled(draw, data: bytes) -> bytes:
    """data cut short, or with bytes inserted, or as it is."""
    how = draw(st.integers(0, 3))
    if how == 0 or not data:
        return data
    at = draw(st.integers(0, len(data)))
    if how == 1:
        return data[:at]
    return data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]


@st.composite
def state_inputs(draw, s: Strategies) -> Input:
    """stdin of every shape: raw bytes, deep or huge JSON, states with wrong types."""
    bundle = os.fsencode(s.world.bundle)
    kind = draw(st.sampled_from(["raw", "fixed", "deep", "huge", "state", "state"]))
    annotations: object = None
    if kind == "raw":
        stdin = draw(st.binary(max_size=300))
    elif kind == "fixed":
        stdin = draw(s.fixed_stdins)
    elif kind == "deep":
        n = draw(st.integers(1, SHALLOW) | st.integers(TOO_DEEP, 200_000))
        nested = b"[" * n + b"]" * n if draw(st.booleans()) else b'{"a":' * n + b"0" + b"}" * n
        with_bundle = b'{"bundle": "' + bundle + b'", "annotations": ' + nested + b"}"
        stdin = with_bundle if draw(st.booleans()) else nested
    elif kind == "huge":
        n = draw(st.integers(0, 1_000_000))
        field_ = draw(st.sampled_from(["bundle", "id", "annotations", "ociVersion"]))
        value: object = "x" * n if field_ != "annotations" else {f"{PREFIX}a.method": "x" * n}
        stdin = json.dumps({"bundle": str(s.world.bundle), field_: value}).encode()
    else:
        annotations = draw(s.annotations[False] | json_trees)
        state = draw(st.fixed_dictionaries(
            {}, optional={"ociVersion": json_trees, "id": json_values, "status": json_values,
                          "pid": json_values, "bundle": s.bundles,
                          "annotations": st.just(annotations)},
        ))  # fmt: skip
        stdin = draw(mangled(encode(state, draw(st.integers(0, 2)))))
    if draw(st.integers(0, 9)) == 0:
        return Input(draw(odd_args), stdin, asked=asked_paths(annotations), odd_args=True)
    return Input(draw(s.cli[False]), stdin, asked=asked_paths(annotations))


@st.composite
def annotation_inputs(draw, s: Strategies) -> Input:
    """A usable state and bundle; annotations in the state, in config.json, or both."""
    confined = draw(st.booleans())
    in_state = draw(s.annotations[confined])
    in_config = draw(st.none() | s.annotations[confined])
    bundle, config = s.world.bundle, None
    if in_config is not None:
        bundle = s.world.fuzz_bundle
        config = json.dumps({"mounts": s.world.mounts(), "annotations": in_config}).encode()
    state = {"ociVersion": "1.0.2", "id": "fuzz", "status": "stopped", "bundle": str(bundle),
             "annotations": in_state}  # fmt: skip
    if draw(st.integers(0, 4)) == 0:
        del state["annotations"]
    stdin = encode(state, draw(st.sampled_from([0, 0, 1])))
    return Input(draw(s.cli[confined]), stdin, config, asked_paths(in_state, in_config))


@st.composite
def config_inputs(draw, s: Strategies) -> Input:
    """A state naming the per-input bundle, whose config.json is malformed in every way."""
    annotations = draw(s.annotations[False])
    if draw(st.integers(0, 2)) == 0:
        config = draw(st.sampled_from([b"", b"[]", b"null", b"{", b"\xff", b"[" * 100_000])
                      | st.binary(max_size=100))  # fmt: skip
    else:
        value = draw(st.fixed_dictionaries(
            {},
            optional={"mounts": s.mounts, "annotations": st.just(annotations) | json_values,
                      "ociVersion": json_values, "hooks": json_values},
        ))  # fmt: skip
        config = draw(mangled(encode(value, draw(st.sampled_from([0, 0, 1])))))
    state_annotations = draw(st.none() | s.annotations[False])
    state: dict[str, object] = {"bundle": str(s.world.fuzz_bundle)}
    if state_annotations is not None:
        state["annotations"] = state_annotations
    return Input(draw(s.cli[False]), json.dumps(state).encode(), config,
                 asked_paths(annotations, state_annotations))  # fmt: skip


# --- the properties ----------------------------------------------------------------------


def fuzz(hook_main, world: World, inputs: st.SearchStrategy[Input], examples: int,
         known: list[Input] | None = None) -> None:  # fmt: skip
    """Run the known inputs, then `examples` generated ones, in-process; check each."""
    ran = 0

    def one(given_input: Input) -> None:
        nonlocal ran
        ran += 1
        check(lambda i: run_in_process(hook_main, world, i), world, given_input)

    test = given(inputs)(one)
    for known_input in known or []:
        test = example(known_input)(test)
    settings(max_examples=examples, **SETTINGS)(test)()
    assert ran >= examples, f"only {ran} inputs ran"


def known_inputs(world: World) -> list[Input]:
    """Inputs that broke the hook once: tried on every run, before the generated ones."""
    archive = {f"{PREFIX}data.mount-point": "/data", f"{PREFIX}data.archive-to": f"{world.out}/a"}
    odd_values = [("tar-content-owner", "1" * 5000), ("compression-level", "1" * 5000)]
    found = []
    for arg, value in odd_values:
        annotations = {**archive, f"{PREFIX}data.{arg}": value}
        stdin = json.dumps({"bundle": str(world.bundle), "annotations": annotations}).encode()
        found.append(Input([], stdin, asked=asked_paths(annotations)))
    return found


@pytest.fixture(scope="module")
def strategies(world: World) -> Strategies:
    return Strategies(world)


def test_fuzz_stdin(hook_main, world, strategies):
    fuzz(hook_main, world, state_inputs(strategies), 4000)


def test_fuzz_annotations(hook_main, world, strategies):
    fuzz(hook_main, world, annotation_inputs(strategies), 4000, known_inputs(world))


def test_fuzz_config_json(hook_main, world, strategies):
    fuzz(hook_main, world, config_inputs(strategies), 2500)


def test_installed_hook_ends_as_in_process(hook_main, hook_bin, world, strategies):
    """A few hundred inputs through the installed script too: same exit status, same checks."""
    inputs = st.one_of(
        state_inputs(strategies), annotation_inputs(strategies), config_inputs(strategies)
    )

    @settings(max_examples=200, **SETTINGS)
    @given(inputs)
    def one(given_input: Input) -> None:
        inside = check(lambda i: run_in_process(hook_main, world, i), world, given_input)
        outside = check(lambda i: run_subprocess(hook_bin, world, i), world, given_input)
        assert outside.status == inside.status, (inside, outside, given_input)

    one()
