#!/usr/bin/env python3
"""Benchmark the installed archive_overlay hook against cp / GNU tar / pigz / zstd.

Not part of the test suite. Must run as root (whiteouts are char devices made
with mknod, the opaque dir needs a trusted.* xattr, the --xfs mode mounts a
loop device). Uses only the standard library; run it with any python >= 3.9,
e.g. the test venv's:

    sudo /opt/archive_overlay-test/bin/python bench/bench.py              # ~1 GiB tree
    sudo /opt/archive_overlay-test/bin/python bench/bench.py --size-mb 200 --rounds 1
    sudo /opt/archive_overlay-test/bin/python bench/bench.py --small-files 50000
    sudo /opt/archive_overlay-test/bin/python bench/bench.py --xfs
    sudo /opt/archive_overlay-test/bin/python bench/bench.py --push 100   # image-push

It builds a deterministic (seeded) fixture shaped like a container's data
upperdir, caches it under --workdir, warms the page cache, then runs every
tool on it, alternating, for --rounds rounds, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "com.launchplatform.oci-hooks.archive-overlay."
ARCHIVE_NAME = "bench"
HOOK_METHODS = ("copy", "tar", "tar.gz", "tar.zst")
NO_OP = "no-op"  # the hook run with no archive annotations: its fixed start-up cost
FIXTURE_VERSION = 1  # bump when the generator changes, to rebuild cached fixtures
MIB = 1 << 20
SEGMENT = MIB  # medium and large files are written in segments of mixed content

# Standard tools, each the counterpart of one hook method. {src} is the fixture
# (upperdir), {out} the output path. GNU tar's defaults are kept (gnu format, no
# --xattrs): that is what people time, even though the hook writes PAX + xattrs.
STANDARD_TOOLS = {
    "cp -a": ("copy", "cp -a {src} {out}"),
    "tar -cf": ("tar", "tar -C {src} -cf {out} ."),
    "tar pax xattrs": ("tar", "tar --format=pax --xattrs -C {src} -cf {out} ."),
    "tar -czf": ("tar.gz", "tar -C {src} -czf {out} ."),
    "tar | pigz -6": ("tar.gz", "tar -C {src} -cf - . | pigz -6 > {out}"),
    "tar | zstd -T0": ("tar.zst", "tar -C {src} -cf - . | zstd -q -T0 > {out}"),
    # The same pipelines writing what the hook writes (PAX with xattrs): issue 13's yardsticks.
    "tar pax xattrs | pigz -6": (
        "tar.gz",
        "tar --format=pax --xattrs -C {src} -cf - . | pigz -6 > {out}",
    ),
    "tar pax xattrs | zstd -T0": (
        "tar.zst",
        "tar --format=pax --xattrs -C {src} -cf - . | zstd -q -T0 > {out}",
    ),
}
SPARSE_TOOLS = {  # files with holes: the standard tools that keep them
    "cp -a": ("copy", "cp -a {src} {out}"),
    "tar --sparse": ("tar", "tar --format=pax --sparse -C {src} -cf {out} ."),
    "tar --sparse | pigz": ("tar.gz", "tar --format=pax --sparse -C {src} -cf - . | pigz > {out}"),
    "tar --sparse | zstd": (
        "tar.zst",
        "tar --format=pax --sparse -C {src} -cf - . | zstd -q -T0 > {out}",
    ),
}
XFS_TOOLS = {
    "cp -a": ("copy", "cp -a {src} {out}"),  # coreutils >= 9 reflinks by default
    "cp -a --reflink=never": ("copy", "cp -a --reflink=never {src} {out}"),
}
# The hook makes its output durable before it returns (syncfs for copy, fsync for a
# tar file); so, unless --no-sync, the standard tools' time includes the same.
SYNC = {"copy": " && sync -f {out}", "tar": " && sync {out}"}
GZIP6_REFERENCE = "tar -czf"  # the "gzip -6" size the other outputs are compared with

# ---------------------------------------------------------------------------
# Fixture


_VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "container image layer overlay volume data archive request response error warning info debug "
    "user session token timeout retry connection database index query table column row value "
    "http https GET POST PUT DELETE status latency bytes duration service worker queue message"
)
WORDS = _VOCABULARY.split()


class Content:
    """Seeded file content: ~45% log-like text (gzip -6: ~0.3), ~45% random, ~10% zeros.

    Together gzip -6 shrinks it to ~0.6, like a typical data volume.
    """

    def __init__(self, rng: random.Random, pool_size: int = 16 * MIB) -> None:
        self.rng = rng
        self.pool = self._text(pool_size)

    def _text(self, size: int) -> bytes:
        rng, lines, n = self.rng, [], 0
        t = rng.randrange(1_600_000_000, 1_700_000_000)
        while n < size:
            t += rng.randrange(5)
            words = " ".join(rng.choices(WORDS, k=rng.randrange(4, 16)))
            line = (
                f"ts={t}.{rng.randrange(1000):03d} level={rng.choice(('info', 'debug', 'warn'))} "
                f'req={rng.getrandbits(32):08x} msg="{words}" n={rng.randrange(100000)}\n'
            )
            lines.append(line)
            n += len(line)
        return "".join(lines).encode()[:size]

    def chunk(self, n: int) -> bytes:
        kind = self.rng.random()
        if kind < 0.45:
            off = self.rng.randrange(len(self.pool) - n + 1)
            return self.pool[off : off + n]
        if kind < 0.90:
            return self.rng.randbytes(n)
        return bytes(n)


@dataclass
class Fixture:
    root: Path  # holds upper/ (the tree), lower/ and work/ (empty, for the mount options)
    entries: int = 0  # files, dirs, links, ... in upper, including upper itself
    data_bytes: int = 0  # sum of regular file sizes (hardlinked data counted once)

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def stamp(self) -> Path:
        return self.root / "fixture.json"


def _write_file(path: Path, content: Content, size: int, mode: int = 0o644) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, SEGMENT)
            f.write(content.chunk(n))
            left -= n
    os.chmod(path, mode)


def build_data_fixture(root: Path, size_mb: int, seed: int) -> None:
    """A data upperdir: ~20k small files, ~200 medium, 4 large at 1 GiB (scaled by size)."""
    rng = random.Random(seed)
    content = Content(rng)
    upper = root / "upper"
    total = size_mb * MIB
    scale = size_mb / 1024
    n_small, n_medium = max(1, round(20000 * scale)), max(1, round(200 * scale))
    small_files: list[Path] = []
    written = 0

    for i in range(n_small):  # 0-16 KiB, 40 per directory, 3 levels deep
        d = upper / "srv" / f"app{i // 2000:02d}" / f"d{i // 40:04d}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.randrange(16 * 1024 + 1)
        mode = rng.choice((0o644, 0o644, 0o644, 0o600, 0o755))
        path = d / f"f{i:05d}.{rng.choice(('log', 'json', 'txt', 'dat'))}"
        _write_file(path, content, size, mode)
        small_files.append(path)
        written += size
    medium = upper / "var" / "lib" / "db"
    medium.mkdir(parents=True)
    medium_files = []
    for i in range(n_medium):  # ~1 MiB
        size = rng.randrange(MIB // 2, 3 * MIB // 2)
        path = medium / f"segment-{i:04d}.db"
        _write_file(path, content, size)
        medium_files.append(path)
        written += size
    large = upper / "var" / "lib" / "blobs"
    large.mkdir(parents=True)
    large_size = max(MIB, (total - written) // 4)
    for i in range(4):  # ~150 MiB each at the default size
        _write_file(large / f"blob-{i}.bin", content, large_size)

    # Hardlinks (1% of the small files, 2 medium), symlinks, whiteouts, an opaque dir.
    links = upper / "links"
    links.mkdir()
    for i, src in enumerate(rng.sample(small_files, max(1, len(small_files) // 100))):
        os.link(src, links / f"hard-{i:04d}")
    for i, src in enumerate(medium_files[:2]):
        os.link(src, links / f"hard-medium-{i}")
    for i in range(300):
        target = rng.choice(small_files).relative_to(upper)
        if i % 3 == 0:
            target = Path("/", target)  # absolute, as inside the container
        elif i % 3 == 1:
            target = Path("..", target)
        else:
            target = Path("../does-not-exist", f"x{i}")  # dangling
        os.symlink(target, links / f"sym-{i:03d}")
    for i in range(8):  # whiteouts: files and dirs deleted from the image
        d = upper / ("srv/app00" if i % 2 else "var/lib")
        os.mknod(d / f"deleted-{i}", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    opaque = upper / "etc" / "app"
    opaque.mkdir(parents=True)
    os.setxattr(opaque, "trusted.overlay.opaque", b"y")
    for i in range(20):
        _write_file(opaque / f"conf-{i}.ini", content, rng.randrange(4096))
    os.setxattr(upper / "var" / "lib" / "db", "user.comment", b"bench fixture")
    (upper / "srv" / "empty").mkdir()
    os.mkfifo(upper / "srv" / "fifo")
    for i, path in enumerate(small_files[::10]):  # some files owned by a non-root user
        os.chown(path, 1000, 1000)
    _fix_times(upper)


def build_small_files_fixture(root: Path, count: int) -> None:
    """count empty files, 1000 per directory: measures per-entry overhead."""
    upper = root / "upper"
    for i in range(count):
        d = upper / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:06d}").touch()
    _fix_times(upper)


def build_sparse_fixture(root: Path, count: int) -> None:
    """count files of 2 GiB each holding 20 KiB of data at a few offsets: a VM disk
    image or a database file with holes.  It costs its data, not its size."""
    upper = root / "upper"
    rng = random.Random(count)
    for i in range(count):
        fd = os.open(upper / f"disk{i}.img", os.O_WRONLY | os.O_CREAT, 0o644)
        for offset in (0, 1 << 20, 700 << 20, (2 << 30) - 8192):
            os.pwrite(fd, rng.randbytes(5 * 1024), offset)
        os.ftruncate(fd, 2 << 30)
        os.close(fd)
    _fix_times(upper)


def build_dirs_fixture(root: Path, count: int) -> None:
    """count empty directories, 1000 per parent: memory must not grow with them."""
    upper = root / "upper"
    for i in range(count):
        d = upper / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir()
        os.mkdir(d / f"e{i:07d}")
    _fix_times(upper)


def build_hardlinks_fixture(root: Path, count: int) -> None:
    """count hardlink groups, each a file in a/ with its second link in b/: every group
    stays open until the walk reaches b/, the worst case for the hook's memory."""
    upper = root / "upper"
    for d in ("a", "b"):
        for i in range(0, count, 1000):
            (upper / d / f"{i // 1000:04d}").mkdir(parents=True)
    for i in range(count):
        first = upper / "a" / f"{i // 1000:04d}" / f"f{i:07d}"
        first.touch()
        os.link(first, upper / "b" / f"{i // 1000:04d}" / f"f{i:07d}")
    _fix_times(upper)


FIXTURE_BUILDERS = {
    "small-files": build_small_files_fixture,
    "sparse": build_sparse_fixture,
    "dirs": build_dirs_fixture,
    "hardlinks": build_hardlinks_fixture,
}


def _fix_times(upper: Path) -> None:
    """Deterministic mtimes (ns), bottom-up so directory times stick."""
    t = 1_700_000_000_123_456_789
    for dirpath, dirnames, filenames in os.walk(upper, topdown=False):
        for name in sorted(filenames + dirnames):
            os.utime(os.path.join(dirpath, name), ns=(t, t), follow_symlinks=False)
            t += 1_000_003
        os.utime(dirpath, ns=(t, t))


def count_tree(top: Path) -> tuple[int, int]:
    """(entries including top, bytes of regular files with hardlinks counted once)."""
    entries, size, seen = 1, 0, set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            entries += 1
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_size
    return entries, size


def ensure_fixture(root: Path, params: dict) -> Fixture:
    """Build the fixture under root, or reuse it if it was built with the same params."""
    fx = Fixture(root)
    params = dict(params, version=FIXTURE_VERSION)
    if fx.stamp.exists():
        saved = json.loads(fx.stamp.read_text())
        if saved.get("params") == params:
            fx.entries, fx.data_bytes = saved["entries"], saved["data_bytes"]
            return fx
    if root.exists():
        shutil.rmtree(root)
    for d in ("upper", "lower", "work"):
        (root / d).mkdir(parents=True)
    log(f"building fixture {root} {params} ...")
    t0 = time.monotonic()
    if params["kind"] in FIXTURE_BUILDERS:
        FIXTURE_BUILDERS[params["kind"]](root, params["count"])
    else:
        build_data_fixture(root, params["size_mb"], params["seed"])
    fx.entries, fx.data_bytes = count_tree(fx.upper)
    info = {"params": params, "entries": fx.entries, "data_bytes": fx.data_bytes}
    fx.stamp.write_text(json.dumps(info))
    log(
        f"fixture built in {time.monotonic() - t0:.0f}s: {fx.entries} entries, "
        f"{fx.data_bytes / 1e6:.0f} MB"
    )
    return fx


def warm_cache(top: Path) -> None:
    """One untimed read of every file, so all tools start from a warm page cache."""
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                with open(path, "rb") as f:
                    while f.read(4 * MIB):
                        pass


# ---------------------------------------------------------------------------
# Running and measuring


@dataclass
class Sample:
    wall: float
    cpu: float  # user + system seconds of the whole child tree
    maxrss_kib: int  # largest single process of the child tree (getrusage semantics)
    out_bytes: int
    disk_bytes: int  # filesystem space the output took (statvfs delta, after sync)


@dataclass
class Tool:
    name: str
    method: str  # the hook method it stands for
    hook: bool
    argv: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    error: str = ""

    def median(self, attr: str) -> float:
        values = sorted(getattr(s, attr) for s in self.samples)
        return values[len(values) // 2]


GNU_TIME = "/usr/bin/time"


def run_measured(argv: list[str], stdin: bytes | None, env: dict | None) -> tuple:
    """Run argv; return (returncode, stderr, wall s, cpu s, maxrss KiB).

    wait4's rusage covers the child and every descendant it waited for (a shell
    pipeline's tar and pigz, tar's gzip): cpu is the whole tree's, maxrss the
    largest single process of the tree. A child forked from this (large) python
    process inherits its RSS high-water mark until exec, so when GNU time is
    installed the command runs under it and its %M (measured from a tiny
    parent) is used instead.
    """
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as rss_file:
        wrapped = argv
        if os.access(GNU_TIME, os.X_OK):
            wrapped = [GNU_TIME, "-o", rss_file.name, "-f", "maxrss=%M", *argv]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            wrapped, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, env=env
        )
        if stdin:
            proc.stdin.write(stdin)
        proc.stdin.close()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        maxrss = ru.ru_maxrss
        for line in rss_file.read().splitlines():
            if line.startswith("maxrss="):
                maxrss = int(line[len("maxrss=") :])
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    rc = os.waitstatus_to_exitcode(status)
    return rc, stderr, wall, ru.ru_utime + ru.ru_stime, maxrss


def disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def output_size(path: Path) -> int:
    if path.is_dir():
        return count_tree(path)[1]
    return path.stat().st_size if path.exists() else 0


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def hook_stdin(scratch: Path, fx: Fixture, method: str, out: Path) -> bytes:
    """Write a bundle whose config.json names the fixture as /data's upperdir; return the state."""
    bundle = scratch / f"bundle-{method}"
    bundle.mkdir(exist_ok=True)
    annotations = {
        f"{PREFIX}{ARCHIVE_NAME}.mount-point": "/data",
        f"{PREFIX}{ARCHIVE_NAME}.archive-to": str(out),
        f"{PREFIX}{ARCHIVE_NAME}.method": method,
    }
    if method == NO_OP:
        annotations = {}  # the hook starts, reads the state and config, finds nothing to do
    mount = {
        "destination": "/data",
        "type": "overlay",
        "source": str(scratch / "merged-not-mounted"),
        "options": [
            f"lowerdir={fx.root / 'lower'}",
            f"upperdir={fx.upper}",
            f"workdir={fx.root / 'work'}",
            "private",
        ],
    }
    config = {"ociVersion": "1.0.2", "mounts": [mount], "annotations": annotations}
    (bundle / "config.json").write_text(json.dumps(config))
    state = {
        "ociVersion": "1.0.2",
        "id": f"bench-{method}",
        "status": "stopped",
        "pid": 0,
        "bundle": str(bundle),
    }
    return json.dumps(state).encode()


def output_path(scratch: Path, tool: Tool) -> Path:
    suffix = "" if tool.method == "copy" else "." + tool.method
    slug = "".join(c if c.isalnum() else "-" for c in tool.name).strip("-")
    return scratch / f"out-{slug}{suffix}"


def run_tool(
    tool: Tool, fx: Fixture, scratch: Path, hook_args: list[str], check: bool, sync: bool
) -> None:
    out = output_path(scratch, tool)
    remove(out)
    if tool.hook:
        stdin = hook_stdin(scratch, fx, tool.method, out)
        tool.argv = [*hook_args]
        env: dict | None = {}  # engines run hooks with an empty environment
    else:
        template = (STANDARD_TOOLS | XFS_TOOLS | SPARSE_TOOLS)[tool.name][1]
        if sync:
            template = f"( {template} ){SYNC['copy' if tool.method == 'copy' else 'tar']}"
        cmd = template.format(src=shlex.quote(str(fx.upper)), out=shlex.quote(str(out)))
        tool.argv = ["sh", "-c", cmd]
        stdin, env = None, None
    os.sync()  # start every run without dirty pages of the previous one
    free_before = disk_free(scratch)
    rc, stderr, wall, cpu, rss = run_measured(tool.argv, stdin, env)
    if tool.method == NO_OP and rc == 0:
        tool.samples.append(Sample(wall, cpu, rss, 0, 0))
        log(f"{tool.name}: {wall:.2f}s cpu {cpu:.2f}s rss {rss // 1024} MiB")
        return
    if rc != 0 or not out.exists():
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        tool.error = f"exit {rc}: {tail or '(no stderr)'}"
        log(f"{tool.name} FAILED: {tool.error}")
        remove(out)
        return
    size = output_size(out)
    os.sync()
    disk = free_before - disk_free(scratch)
    if not out.is_dir():  # XFS frees the previous output's blocks late: its delta can be < 0
        disk = out.stat().st_blocks * 512
    if check:
        problem = check_output(tool, fx, out)
        if problem:
            tool.error = problem
            log(f"{tool.name}: {problem}")
    tool.samples.append(Sample(wall, cpu, rss, size, disk))
    log(f"{tool.name}: {wall:.2f}s cpu {cpu:.2f}s rss {rss // 1024} MiB out {size / 1e6:.1f} MB")
    remove(out)


def check_output(tool: Tool, fx: Fixture, out: Path) -> str:
    """Cheap sanity check (untimed, first round): entry count and data bytes."""
    if tool.method == "copy":
        entries, size = count_tree(out)
        if (entries, size) != (fx.entries, fx.data_bytes):
            return (
                f"copy has {entries} entries / {size} bytes, fixture {fx.entries} / {fx.data_bytes}"
            )
        return ""
    decompress = {"tar": "cat", "tar.gz": "gzip -dc", "tar.zst": "zstd -dcq"}[tool.method]
    cmd = f"{decompress} {shlex.quote(str(out))} | tar -tf - | wc -l"
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=False)
    listed = int(r.stdout.strip() or 0)
    if listed != fx.entries:
        return f"archive lists {listed} entries, fixture has {fx.entries}: {r.stderr.strip()}"
    return ""


# ---------------------------------------------------------------------------
# Report


def md(text: str) -> str:
    """Escape a table cell."""
    return text.replace("|", "\\|")


def fmt_size(n: float) -> str:
    return f"{n / 1e6:.1f}" if n >= 10e6 else f"{n / 1e6:.3f}"


def print_tables(
    tools: list[Tool], fx: Fixture, title: str, per_entry: bool, disk: bool, note: str
) -> None:
    print(f"\n### {title}\n")
    print(
        f"upperdir: {fx.entries} entries, {fx.data_bytes / 1e6:.0f} MB of file data; "
        f"{os.cpu_count()} CPUs; median of {max(len(t.samples) for t in tools)} round(s); "
        f"{note}; load average at the end {os.getloadavg()[0]:.2f}\n"
    )
    ref = next((t for t in tools if t.name == GZIP6_REFERENCE and t.samples), None)
    ref_size = ref.median("out_bytes") if ref else None
    header = ["tool", "median wall s"]
    header += ["µs/entry", "entries/s"] if per_entry else ["MB/s"]
    header += ["CPU s", "output MB", "output / gzip -6", "peak RSS MiB"]
    header += ["disk used MB"] if disk else []
    print("| " + " | ".join(header) + " |")
    print("| --- |" + " ---: |" * (len(header) - 1))
    for t in tools:
        name = t.name if t.hook else md(t.name)
        if not t.samples:
            why = t.error.strip().splitlines()[-1][:120] if t.error else "not run"
            print(f"| {name} | FAILED: {md(why)} |" + " |" * (len(header) - 2))
            continue
        wall = t.median("wall")
        row = [name + (" ⚠" if t.error else ""), f"{wall:.2f}"]
        if t.method == NO_OP:
            row += ["-", "-"] if per_entry else ["-"]
        elif per_entry:
            row += [f"{wall / fx.entries * 1e6:.1f}", f"{fx.entries / wall:.0f}"]
        else:
            row += [f"{fx.data_bytes / wall / 1e6:.0f}"]
        size = t.median("out_bytes")
        row += [f"{t.median('cpu'):.2f}", fmt_size(size) if t.method != NO_OP else "-"]
        row += [f"{size / ref_size:.3f}" if ref_size and t.method not in ("copy", NO_OP) else "-"]
        row += [f"{max(s.maxrss_kib for s in t.samples) / 1024:.0f}"]
        row += [fmt_size(t.median("disk_bytes"))] if disk else []
        print("| " + " | ".join(row) + " |")
    pairs = [(h, s) for h in tools if h.hook for s in tools if not s.hook and s.method == h.method]
    if pairs:
        # CPU too: on a loaded machine wall times wander, CPU seconds much less.
        print(
            "\n| hook method | vs standard tool | hook s | tool s | hook / tool time | hook / tool CPU |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for h, s in pairs:
            if h.samples and s.samples:
                hw, sw = h.median("wall"), s.median("wall")
                cpu = h.median("cpu") / max(s.median("cpu"), 0.005)
                row = f"{hw:.2f} | {sw:.2f} | {hw / sw:.2f} | {cpu:.2f}"
                print(f"| {h.method} | {md(s.name)} | {row} |")
            else:
                print(f"| {h.method} | {md(s.name)} | - | - | - | - |")
    problems = [t for t in tools if t.error]
    for t in problems:
        print(f"\n⚠ {'hook ' + t.method if t.hook else t.name}: {t.error}")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# XFS (reflink) mode


MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-i", "4096"],  # journaled; inodes for --small-files
}


class LoopFs:
    """A filesystem in a sparse image file, loop-mounted; unmounted and removed on exit."""

    def __init__(self, fstype: str, image: Path, size_bytes: int) -> None:
        self.fstype, self.image, self.size = fstype, image, size_bytes
        self.mnt = image.with_suffix(".mnt")

    def __enter__(self) -> Path:
        self.image.unlink(missing_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        subprocess.run([*MKFS[self.fstype], str(self.image)], check=True)
        self.mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mnt)], check=True)
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", str(self.mnt)], check=False)
        self.mnt.rmdir()
        self.image.unlink(missing_ok=True)


def ext4_without_journal(path: Path) -> bool:
    """Whether path is on an ext4 without a journal.

    There every new inode is checked against recently (60 s) deleted ones, so
    creating files right after deleting many (the previous run's output) costs
    ~0.7 ms each, for every tool alike: use --ext4 (or --xfs) to measure on a
    normal filesystem instead.
    """
    dev = os.stat(path).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[2] == want and fields[sep + 1] == "ext4":
                name = os.path.basename(fields[sep + 2])
                has_journal = any(Path("/proc/fs/jbd2").glob(f"{name}-*"))
                return Path("/proc/fs/ext4", name).exists() and not has_journal
    return False


# ---------------------------------------------------------------------------
# Start-up (--startup): the fixed cost every container stop pays, since the
# engine waits for the hook. Whole processes, run as engines run the hook.


def small_upperdir_states(base: Path) -> dict[str, bytes]:
    """State JSONs for a run with nothing to archive and for a tar.gz of a one-file upperdir."""
    for d in ("upper", "lower", "work"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "upper" / "greeting").write_bytes(b"hello\n")
    fx = Fixture(base, entries=2, data_bytes=6)
    return {
        NO_OP: hook_stdin(base, fx, NO_OP, base / "unused"),
        "tar.gz": hook_stdin(base, fx, "tar.gz", base / "out.tar.gz"),
    }


def interpreter_of(script: Path) -> str | None:
    """The interpreter a console script names on its #! line; None for a binary."""
    with open(script, "rb") as f:
        first = f.readline()
    return first[2:].split()[0].decode() if first.startswith(b"#!") else None


def startup_runs(hook_args: list[str], go_hook: Path | None) -> list[tuple[str, list[str], str]]:
    """(row name, argv, state to pipe) for each row, the yardstick first."""
    # Debian's python3, which the README's install makes the hook's venv from (a python3
    # found on PATH may be a wrapper, e.g. pyenv's shim, that takes far longer to start).
    python3 = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3")
    runs = [("`python3 -c pass`", [python3, "-c", "pass"], NO_OP)]
    hook_python = interpreter_of(Path(hook_args[0]))
    if hook_python:  # the two libraries the design requires, imported plainly
        runs.append(("`import click` (hook's python)", [hook_python, "-c", "import click"], NO_OP))
        floor = [hook_python, "-c", "import click, structlog"]
        runs.append(("`import click, structlog` (hook's python)", floor, NO_OP))
    runs.append(("hook, nothing to archive", hook_args, NO_OP))
    runs.append(("hook, one-file upperdir to tar.gz", hook_args, "tar.gz"))
    if go_hook:
        runs.append(("Go hook, nothing to archive", [str(go_hook)], NO_OP))
        runs.append(("Go hook, one-file upperdir to tar.gz", [str(go_hook)], "tar.gz"))
    return runs


def time_once(argv: list[str], stdin: bytes) -> tuple[int, float, float]:
    """(exit status, wall s, cpu s) of one run: empty environment, state piped, output dropped."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={}
    )
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # python3 -c pass exits without reading it
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    return os.waitstatus_to_exitcode(status), wall, ru.ru_utime + ru.ru_stime


def bench_startup(base: Path, hook_args: list[str], go_hook: Path | None, rounds: int) -> int:
    shutil.rmtree(base, ignore_errors=True)
    states = small_upperdir_states(base)
    runs = startup_runs(hook_args, go_hook)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in runs}
    failed: dict[str, str] = {}
    for r in range(rounds + 1):  # round 0 warms up, untimed
        for name, argv, state in runs[r % len(runs) :] + runs[: r % len(runs)]:
            (base / "out.tar.gz").unlink(missing_ok=True)  # each archive run writes it anew
            rc, wall, cpu = time_once(argv, states[state])
            if rc != 0 or (state == "tar.gz" and not (base / "out.tar.gz").is_file()):
                failed[name] = f"exit {rc}, archive {'written' if rc == 0 else 'missing'}"
            elif r:
                samples[name].append((wall, cpu))
    print_startup_table(runs, samples, failed, rounds)
    shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


def print_startup_table(runs: list, samples: dict, failed: dict, rounds: int) -> None:
    """Medians, and each run's ratio to the yardstick's run of the same round (median)."""
    print("\n### Start-up: one run of the hook, whole process\n")
    print(
        f"{os.cpu_count()} CPUs; median of {rounds} rounds, the runs alternating; empty "
        f"environment, state JSON piped; load average at the end {os.getloadavg()[0]:.2f}\n"
    )
    yardstick = samples[runs[0][0]]
    print(
        "| run | median wall ms | wall / python3 -c pass | median CPU ms | CPU / python3 -c pass |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, _, _ in runs:
        if name in failed:
            print(f"| {name} | FAILED: {failed[name]} | | | |")
            continue
        walls, cpus = [w for w, _ in samples[name]], [c for _, c in samples[name]]
        wall_ratios = [w / y[0] for w, y in zip(walls, yardstick)]
        cpu_ratios = [c / y[1] for c, y in zip(cpus, yardstick) if y[1] > 0]
        print(
            f"| {name} | {median(walls) * 1e3:.1f} | {median(wall_ratios):.2f} "
            f"| {median(cpus) * 1e3:.1f} | {median(cpu_ratios):.2f} |"
        )


# ---------------------------------------------------------------------------
# --push: what image-push adds to an oci-image commit, against skopeo copy


PUSH_REGISTRY = """version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {root}
http:
  addr: 127.0.0.1:{port}
"""


def private_containers_namespace(scratch: Path) -> None:
    """This process in a mount namespace of its own whose /etc/containers and /var/lib are
    overlays onto scratch: the registries.conf.d entry and skopeo's blob-info cache stay
    here."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0:
        sys.exit(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    for target in ("/etc/containers", "/var/lib"):
        over = scratch / target.strip("/").replace("/", "-")
        for d in ("upper", "work"):
            (over / d).mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={target},upperdir={over}/upper,workdir={over}/work"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, target], check=True)


def start_registry(root: Path) -> tuple[subprocess.Popen, str]:
    """A plain-HTTP docker-registry on a free port, marked insecure in registries.conf.d."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root.mkdir(parents=True)
    (root / "config.yml").write_text(PUSH_REGISTRY.format(root=root / "storage", port=port))
    conf = Path(f"/etc/containers/registries.conf.d/90-bench-{port}.conf")
    conf.write_text(f'[[registry]]\nlocation = "127.0.0.1:{port}"\ninsecure = true\n')
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(150):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("docker-registry did not start")


def commit_state(scratch: Path, fx: Fixture, layout: Path, push: str | None) -> bytes:
    stdin = hook_stdin(scratch, fx, "oci-image", layout)
    config_path = scratch / "bundle-oci-image" / "config.json"
    config = json.loads(config_path.read_text())
    config["annotations"][f"{PREFIX}{ARCHIVE_NAME}.image-tag"] = "data"
    if push:
        config["annotations"][f"{PREFIX}{ARCHIVE_NAME}.image-push"] = push
    config_path.write_text(json.dumps(config))
    return stdin


def bench_push(a: argparse.Namespace, hook_args: list[str]) -> int:
    """Each round: a new layer (one file of the fixture changes), committed without a push,
    then with image-push to registry A; then skopeo copy of that same revision to registry
    B, which has none of it: the upload the push does, done by hand."""
    for tool in ("docker-registry", "skopeo"):
        if not shutil.which(tool):
            sys.exit(f"--push needs {tool}")
    base = a.workdir / "push"
    shutil.rmtree(base, ignore_errors=True)
    scratch = base / "scratch"
    scratch.mkdir(parents=True)
    private_containers_namespace(base / "ns")
    params = {"kind": "data", "size_mb": a.push, "seed": a.seed}
    fx = ensure_fixture(a.workdir / f"fixture-data-{a.push}-s{a.seed}", params)
    warm_cache(fx.upper)
    registries = [start_registry(base / f"registry-{n}") for n in "ab"]
    host_a, host_b = (host for _, host in registries)
    stamp = fx.upper / "bench-push-round"
    times: dict[str, list[float]] = {"commit": [], "commit + image-push": [], "push": [],
                                     "skopeo copy": []}  # fmt: skip
    layer_bytes = 0
    try:
        for r in range(a.rounds):
            for key, push in (("commit", None), ("commit + image-push", f"{host_a}/bench:r{r}")):
                stamp.write_text(f"{key} {r} {time.time()}\n")  # a new layer every commit
                layout = scratch / f"layout-{r}-{len(push or '')}"
                stdin = commit_state(scratch, fx, layout, push)
                os.sync()
                rc, stderr, wall, _, _ = run_measured(hook_args, stdin, {})
                if rc != 0:
                    sys.exit(f"hook failed: {stderr}")
                times[key].append(wall)
            pushed = re.search(r'event="revision pushed" .* seconds=([0-9.]+)', stderr)
            times["push"].append(float(pushed.group(1)) if pushed else float("nan"))
            layer_bytes = max(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
            cmd = [
                "skopeo",
                "copy",
                "--quiet",
                f"oci:{layout}:data",
                f"docker://{host_b}/bench:r{r}",
            ]
            rc, stderr, wall, _, _ = run_measured(cmd, None, None)
            if rc != 0:
                sys.exit(f"skopeo copy failed: {stderr}")
            times["skopeo copy"].append(wall)
            log(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    finally:
        stamp.unlink(missing_ok=True)
        for proc, _ in registries:
            proc.terminate()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n### image-push: {a.push} MiB data upperdir, layer {layer_bytes / 1e6:.1f} MB "
          f"(gzip), local docker-registry over HTTP, {a.rounds} rounds\n")  # fmt: skip
    print("| step | median wall s | range s |\n| --- | ---: | ---: |")
    labels = {"commit": "hook oci-image commit", "commit + image-push": "hook commit + image-push",
              "push": "of which the push (hook's log)",
              "skopeo copy": "skopeo copy of the same revision (empty registry)"}  # fmt: skip
    for key, values in times.items():
        print(f"| {labels[key]} | {median(values):.2f} | {min(values):.2f}–{max(values):.2f} |")
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    return 0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


# ---------------------------------------------------------------------------
# Chains (--squash, --chain): commits on a revision chain the hook built, the commit that
# merges layers, against re-flattening the chain with umoci unpack + tar | pigz.  Every
# hook row is the installed hook as a whole process (empty environment, state JSON piped)
# committing a run's upperdir made through a real overlay; each run starts from a fresh
# copy of the chain's layout, so all rounds do the same work.

SQUASH_DRIVER = Path(__file__).resolve().parent.parent / "tests" / "squash_driver.py"
SQUASH_FILE_SIZE = 8 << 10
SQUASH_BASE_FILES = 2000
SQUASH_VERSION = 2  # bump when the chain generator changes
CHAIN_VERSION = 1
DEFAULT_MAX_LAYERS = 100  # archive_overlay.DEFAULT_MAX_LAYERS (bench.py imports nothing of it)
FLATTEN = "umoci unpack + tar pax xattrs | pigz -6 of the chain"
LAYER_BY_HAND = "tar pax xattrs | pigz -6 of the run's upperdir"


def squash_run_changes(merged: Path, i: int, files: int, content: Content) -> None:
    """Run i's changes: `files` new files, a quarter of run i-1's rewritten, a quarter of
    run i-2's deleted, a directory deleted and made again, a base file deleted."""
    new = merged / f"run{i}"
    new.mkdir()
    for j in range(files):
        _write_file(new / f"f{j}", content, SQUASH_FILE_SIZE)
    for j in range(0, files, 4):
        if (merged / f"run{i - 1}" / f"f{j}").exists():
            _write_file(merged / f"run{i - 1}" / f"f{j}", content, SQUASH_FILE_SIZE)
        if (merged / f"run{i - 2}" / f"f{j + 1}").exists():
            (merged / f"run{i - 2}" / f"f{j + 1}").unlink()
    shutil.rmtree(merged / "churn", ignore_errors=True)
    (merged / "churn").mkdir()
    (merged / "churn" / f"c{i}").write_text(f"{i}\n")
    (merged / "base" / f"b{i}").unlink(missing_ok=True)  # when the data image has it


def chain_run_changes(merged: Path, i: int, size: int) -> None:
    """A --chain run: one new file of `size` random bytes (the same bytes for a run i)."""
    (merged / "runs").mkdir(exist_ok=True)
    (merged / "runs" / f"run{i}.bin").write_bytes(random.Random(i).randbytes(size))


def make_run(root: Path, name: str, lowers: list[str], change) -> list[str]:
    """root/name/u: a run's upperdir, made by change(merged) through a real overlay whose
    lowers (paths relative to root) are the earlier runs' upperdirs; its mount options."""
    run = root / name
    shutil.rmtree(run, ignore_errors=True)
    for d in ("u", "w", "m"):
        (run / d).mkdir(parents=True)
    options = [f"lowerdir={':'.join(reversed(lowers))}", f"upperdir={run}/u",
               f"workdir={run}/w"]  # fmt: skip
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(options),
                    str(run / "m")], cwd=root, check=True)  # fmt: skip
    try:
        change(run / "m")
    finally:
        subprocess.run(["umount", str(run / "m")], check=True)
    return options


def commit_bundle(bundle: Path, options: list[str], layout: Path, tag: str, base: str,
                  **args: str) -> bytes:  # fmt: skip
    """bundle/config.json committing the overlay of `options` to layout as tag on base (more
    annotation args in `args`); the state JSON to pipe to the hook."""
    args = {"mount-point": "/data", "archive-to": str(layout), "method": "oci-image",
            "image-tag": tag, "image-base": base, **args}  # fmt: skip
    annotations = {f"{PREFIX}{ARCHIVE_NAME}.{k}": v for k, v in args.items()}
    mount = {"destination": "/data", "type": "overlay", "source": str(bundle / "m"),
             "options": options}  # fmt: skip
    config = {"ociVersion": "1.0.2", "mounts": [mount], "annotations": annotations}
    (bundle / "config.json").write_text(json.dumps(config))
    state = {"ociVersion": "1.0.2", "id": bundle.name, "status": "stopped", "bundle": str(bundle)}
    return json.dumps(state).encode()


def build_squash_chain(root: Path, hook: Path, layers: int, files: int, seed: int,
                       base_files: int) -> Path:  # fmt: skip
    """The --squash chain: each run as squash_run_changes makes it."""
    params = {"version": SQUASH_VERSION, "layers": layers, "files": files, "seed": seed,
              "base_files": base_files}  # fmt: skip
    return build_chain(root, hook, layers, params,
                       lambda m, i, content: squash_run_changes(m, i, files, content))  # fmt: skip


def build_chain(root: Path, hook: Path, layers: int, params: dict, changes) -> Path:
    """A layout: a data image (umoci) tagged base, then `layers` revisions r1, r2, ...
    committed by the hook (image-max-layers high enough that none merges) from real
    overlays (lowers: the earlier upperdirs root/r<i>/u on the unpacked data image
    root/unpacked/rootfs), each run's changes made by changes(merged, i, content).  Kept
    under root while params match."""
    stamp = root / "chain.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return root / "img"
    shutil.rmtree(root, ignore_errors=True)
    content = Content(random.Random(params["seed"]), pool_size=4 * MIB)
    (root / "data" / "base").mkdir(parents=True)
    for j in range(params["base_files"]):
        _write_file(root / "data" / "base" / f"b{j}", content, SQUASH_FILE_SIZE)
    layout = root / "img"
    for cmd in (["umoci", "init", "--layout", str(layout)],
                ["umoci", "new", "--image", f"{layout}:base"],
                ["umoci", "insert", "--image", f"{layout}:base", str(root / "data"), "/"],
                ["umoci", "unpack", "--image", f"{layout}:base", str(root / "unpacked")]):  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    lowers, tag = ["unpacked/rootfs"], "base"
    for i in range(1, layers + 1):
        options = make_run(root, f"r{i}", lowers, lambda m, i=i: changes(m, i, content))
        state = commit_bundle(root / f"r{i}", options, layout, f"r{i}", tag,
                              **{"image-max-layers": str(layers + 1)})  # fmt: skip
        subprocess.run([str(hook)], input=state, env={}, check=True, capture_output=True)
        lowers.append(f"r{i}/u")
        tag = f"r{i}"
        if i % 10 == 0 or i == layers:
            log(f"chain {root.name}: revision {i}/{layers} committed")
    stamp.write_text(json.dumps(params))
    return layout


def fresh_copy(layout: Path, copy: Path) -> None:
    """copy: the layout as it is, its blobs hardlinked (the hook never writes into a file
    it did not create: blobs and index.json are renamed into place), the rest copied."""
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(layout / "blobs"), str(copy / "blobs")], check=True)
    for entry in layout.iterdir():
        if entry.name != "blobs":
            subprocess.run(["cp", "-a", str(entry), str(copy / entry.name)], check=True)


REF_NAME = "org.opencontainers.image.ref.name"


def layer_descriptors(layout: Path, tag: str) -> list[dict]:
    """The layers of the revision tag names in layout."""
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag)
    blob = layout / "blobs" / "sha256" / entry["digest"].removeprefix("sha256:")
    return json.loads(blob.read_text())["layers"]


@dataclass
class ChainRow:
    """One row: argv timed each round.  A hook row (stdin: its state JSON) commits the tag
    `bench` on the tag `tip` of a fresh copy of layout; the merge driver (no stdin) merges
    in such a copy too."""

    name: str
    argv: list[str]
    stdin: bytes | None = None
    layout: Path | None = None  # the chain (hook rows and the merge driver)
    copy: Path | None = None  # where each run's fresh copy of it goes
    tip: str = ""
    output: Path | None = None  # what a yardstick writes (its size reported)
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    own_seconds: list[float] = field(default_factory=list)  # the hook's log: seconds=
    layers: int = 0  # the new revision's layers (the hook's log)
    merged: int = 0  # layers merged into one (the hook's log)
    written: int = 0  # bytes of layers written (new layer + merged layer), or output bytes


def run_chain_row(row: ChainRow, scratch: Path) -> None:
    if row.copy is not None:
        fresh_copy(row.layout, row.copy)
    os.sync()
    rc, stderr, wall, cpu, rss = run_measured(row.argv, row.stdin, {} if row.stdin else None)
    if rc != 0:
        sys.exit(f"{row.name} failed (exit {rc}): {stderr.strip()[-2000:]}")
    row.walls.append(wall)
    row.cpus.append(cpu)
    row.rss.append(rss)
    if row.stdin is not None:  # the hook: what its log says it did, checked in the layout
        line = next((x for x in stderr.splitlines() if 'event="archive written"' in x), "")
        layers, seconds = re.search(r" layers=(\d+)", line), re.search(r" seconds=([0-9.]+)", line)
        if not (layers and seconds):
            sys.exit(f"{row.name}: no 'archive written' line in the hook's log: {stderr}")
        merged = re.search(r'event="layers merged" .* layers=(\d+)', stderr)
        row.layers, row.merged = int(layers.group(1)), int(merged.group(1)) if merged else 0
        row.own_seconds.append(float(seconds.group(1)))
        new = layer_descriptors(row.copy, "bench")
        old = {d["digest"] for d in layer_descriptors(row.copy, row.tip)}
        if len(new) != row.layers:
            sys.exit(f"{row.name}: the revision has {len(new)} layers, the log says {row.layers}")
        row.written = sum(d["size"] for d in new if d["digest"] not in old)
    elif row.copy is not None:  # the merge driver: its layer is the squashed tag's last
        row.written = layer_descriptors(row.copy, "squashed")[-1]["size"]
    if row.output is not None:
        row.written = row.output.stat().st_size
    log(f"{row.name}: {wall:.2f}s cpu {cpu:.2f}s rss {rss // 1024} MiB")
    shutil.rmtree(scratch / "bundle", ignore_errors=True)
    for path in (row.output, row.copy):
        if path is not None:
            remove(path)


def chain_rows(a: argparse.Namespace, root: Path, layout: Path, layers: int, change,
               scratch: Path) -> list[ChainRow]:  # fmt: skip
    """The hook's commits of one run (change(merged)) on the data image and on the chain's
    tip, the yardsticks, and (with --squash) the merge driver."""
    hook, tip = str(a.hook), f"r{layers}"
    depth = layers + 1  # the tip's layers: the data image's one and the hook's
    base_run = make_run(root, "run-on-base", ["unpacked/rootfs"], change)
    chain = ["unpacked/rootfs", *(f"r{i}/u" for i in range(1, layers + 1))]
    tip_run = make_run(root, "run-on-tip", chain, change)
    rows: list[ChainRow] = []

    def commit(name: str, on: str, options: list[str], **args: str) -> ChainRow:
        bundle = root / f"bundle-{len(rows)}"
        shutil.rmtree(bundle, ignore_errors=True)
        bundle.mkdir()
        copy = scratch / f"layout-{len(rows)}"
        rows.append(ChainRow(name, [hook], commit_bundle(bundle, options, copy, "bench", on,
                                                         **args), layout, copy, on))  # fmt: skip
        return rows[-1]

    at_limit = {} if depth == DEFAULT_MAX_LAYERS else {"image-max-layers": str(depth)}
    commit("hook commit on the data image (a 2-layer revision)", "base", base_run)
    commit(f"hook commit on the {depth}-layer tip, image-max-layers={depth + 1} (no merge)",
           tip, tip_run, **{"image-max-layers": str(depth + 1)})  # fmt: skip
    commit(f"hook commit on the {depth}-layer tip, image-max-layers="
           f"{'100 (default)' if not at_limit else depth}: merges the older half", tip,
           tip_run, **at_limit)  # fmt: skip
    commit(f"hook commit on the {depth}-layer tip, image-max-layers=3: merges all {layers}",
           tip, tip_run, **{"image-max-layers": "3"})  # fmt: skip
    if a.squash is not None:
        python, copy = str(a.hook.parent / "python"), scratch / "layout-driver"
        rows.append(ChainRow(f"merge_layers of the {layers} (squash_driver.py, no commit)",
                             [python, str(SQUASH_DRIVER), str(copy), tip, "base", "squashed"],
                             layout=layout, copy=copy))  # fmt: skip
    flat, upper = scratch / "flat.tar.gz", root / "run-on-tip" / "u"
    rows.append(ChainRow(FLATTEN, ["sh", "-c", (
        f"umoci unpack --image {shlex.quote(f'{layout}:{tip}')} {scratch}/bundle && "
        f"tar --format=pax --xattrs -C {scratch}/bundle/rootfs -cf - . | pigz -6 > {flat} && "
        f"sync {flat}")], output=flat))  # fmt: skip
    out = scratch / "upper.tar.gz"
    rows.append(ChainRow(LAYER_BY_HAND, ["sh", "-c", (
        f"tar --format=pax --xattrs -C {upper} -cf - . | pigz -6 > {out} && sync {out}")],
        output=out))  # fmt: skip
    return rows


def bench_chain(a: argparse.Namespace, base: Path) -> int:
    """--squash LAYERS (runs of many small files) or --chain LAYERS (a 1 MiB file a run)."""
    if not os.access(a.hook, os.X_OK):
        sys.exit(f"--squash and --chain need the installed hook: {a.hook} not found")
    for tool in ("umoci", "pigz", "tar", "cp", GNU_TIME):
        if not shutil.which(tool):
            sys.exit(f"--squash and --chain need {tool}")  # GNU time: each process's peak RSS
    if a.squash is not None:
        layers, files = a.squash, a.squash_files
        root = base / f"squash-{layers}-{files}-{a.base_files}"
        layout = build_squash_chain(root, a.hook, layers, files, a.seed, a.base_files)
        content = Content(random.Random(a.seed + layers + 1), pool_size=4 * MIB)

        def change(merged: Path) -> None:
            squash_run_changes(merged, layers + 1, files, content)

        what = (f"{layers} layers written by the hook ({files} new files of "
                f"{SQUASH_FILE_SIZE >> 10} KiB a run, a quarter of the last run's rewritten, a "
                f"quarter of the one before deleted)")  # fmt: skip
    else:
        layers, size = a.chain, a.chain_kib << 10
        root = base / f"chain-{layers}-{a.chain_kib}-{a.base_files}"
        params = {"kind": "chain", "version": CHAIN_VERSION, "layers": layers,
                  "kib": a.chain_kib, "seed": a.seed, "base_files": a.base_files}  # fmt: skip
        layout = build_chain(root, a.hook, layers, params,
                             lambda merged, i, _: chain_run_changes(merged, i, size))  # fmt: skip

        def change(merged: Path) -> None:
            chain_run_changes(merged, layers + 1, size)

        what = (f"{layers} layers written by the hook, each run a new file of {a.chain_kib} "
                "KiB of random data")  # fmt: skip
    scratch = base / "chain-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    rows = chain_rows(a, root, layout, layers, change, scratch)
    warm_cache(root)
    for r in range(a.rounds):
        for row in rows[r % len(rows) :] + rows[: r % len(rows)]:
            run_chain_row(row, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    print_chain_table(rows, what, a.base_files, a.rounds)
    return 0


def print_chain_table(rows: list[ChainRow], what: str, base_files: int, rounds: int) -> None:
    """Medians; each ratio is the median over rounds of the row's time over the yardstick's
    in the same round."""
    print(f"\n### Chains: {what}, on a data image of {base_files} files of "
          f"{SQUASH_FILE_SIZE >> 10} KiB\n")  # fmt: skip
    print(f"{os.cpu_count()} CPUs; median of {rounds} rounds, the runs alternating; each hook "
          f"run on a fresh copy of the layout; load average at the end "
          f"{os.getloadavg()[0]:.2f}\n")  # fmt: skip
    sticks = {row.name: row.walls for row in rows if row.name in (FLATTEN, LAYER_BY_HAND)}
    print("| run | revision layers | layers merged | median wall s | hook's own s "
          "| / upperdir tar \\| pigz | / umoci unpack + tar \\| pigz | CPU s | peak RSS MiB "
          "| layers written MB |")  # fmt: skip
    print("| --- |" + " ---: |" * 9)
    for row in rows:
        ratios = [f"{median([w / y for w, y in zip(row.walls, sticks[s])]):.2f}"
                  for s in (LAYER_BY_HAND, FLATTEN)]  # fmt: skip
        own = f"{median(row.own_seconds):.3f}" if row.own_seconds else "-"
        hook = row.stdin is not None
        cells = [md(row.name), str(row.layers) if hook else "-",
                 str(row.merged) if hook else "-", f"{median(row.walls):.3f}", own, *ratios,
                 f"{median(row.cpus):.2f}", f"{max(row.rss) / 1024:.1f}",
                 fmt_size(row.written)]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")


# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mb", type=int, default=1024, help="fixture size (default 1024 MiB)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per tool (default 3)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/archive_overlay-bench"),
        help="fixture cache and scratch outputs (default %(default)s)",
    )
    p.add_argument(
        "--methods",
        help=f"hook methods to run, comma-separated (default {','.join(HOOK_METHODS)};"
        " copy only with --xfs)",
    )
    p.add_argument(
        "--tools",
        help="standard tools to run, comma-separated names as in the table (default all"
        " matching the methods)",
    )
    p.add_argument(
        "--hook",
        type=Path,
        default=Path("/opt/archive_overlay-test/bin/archive_overlay"),
        help="the installed hook (default %(default)s)",
    )
    p.add_argument(
        "--hook-arg", action="append", default=[], help="extra argument for the hook (repeatable)"
    )
    p.add_argument("--no-hook", action="store_true", help="only run the standard tools")
    p.add_argument("--no-tools", action="store_true", help="only run the hook")
    p.add_argument(
        "--xfs", action="store_true", help="on a loop-mounted XFS with reflink: hook copy vs cp -a"
    )
    p.add_argument(
        "--ext4",
        action="store_true",
        help="put the fixture and the outputs on a loop-mounted ext4 (with a journal)",
    )
    p.add_argument(
        "--small-files",
        type=int,
        nargs="?",
        const=50000,
        metavar="N",
        help="benchmark a tree of N empty files instead (default N 50000)",
    )
    for kind, default, what in (
        ("sparse", 2, "files of 2 GiB with 20 KiB of data each"),
        ("dirs", 1_000_000, "empty directories (memory)"),
        ("hardlinks", 200_000, "hardlink groups, second links in another directory (memory)"),
    ):
        p.add_argument(f"--{kind}", type=int, nargs="?", const=default, metavar="N",
                       help=f"benchmark a tree of N {what} instead (default N {default})")  # fmt: skip
    p.add_argument(
        "--startup",
        type=int,
        nargs="?",
        const=30,
        metavar="ROUNDS",
        help="time only the hook's start-up: no-op and one-file tar.gz runs against "
        "python3 -c pass (default 30 rounds)",
    )
    p.add_argument(
        "--go-hook",
        type=Path,
        help="with --startup, also time this built Go archive_overlay hook",
    )
    p.add_argument(
        "--squash",
        type=int,
        nargs="?",
        const=100,
        metavar="LAYERS",
        help="on a chain of LAYERS hook-written layers of many small files: the hook's commits"
        " that merge, merge_layers alone, against umoci unpack + tar | pigz of it (default 100)",
    )
    p.add_argument("--squash-files", type=int, default=200, metavar="N",
                   help="with --squash, new files a run writes (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--chain",
        type=int,
        nargs="?",
        const=DEFAULT_MAX_LAYERS - 1,
        metavar="LAYERS",
        help="the hook's commit on the data image, on a chain of LAYERS hook-written layers"
        " (without and with a merge), against tar | pigz of the run and umoci unpack + tar |"
        " pigz of the chain (default 99: the tip has 100 layers, the default limit)",
    )
    p.add_argument("--chain-kib", type=int, default=1024, metavar="KIB",
                   help="with --chain, data a run writes (default %(default)s)")  # fmt: skip
    p.add_argument("--base-files", type=int, default=SQUASH_BASE_FILES, metavar="N",
                   help="with --squash or --chain, files of 8 KiB in the data image the chain"
                   " stands on (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--push",
        type=int,
        nargs="?",
        const=100,
        metavar="MIB",
        help="time what image-push adds to an oci-image commit of a MIB data upperdir, against"
        " skopeo copy of the same revision, to local docker-registries (default 100 MiB)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--no-sync",
        action="store_true",
        help="don't add sync (syncfs/fsync, as the hook does) to the standard tools' time",
    )
    p.add_argument("--no-check", action="store_true", help="skip the first-round output checks")
    a = p.parse_args(argv)
    methods = a.methods or ("copy" if a.xfs else ",".join(HOOK_METHODS))
    a.methods = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = set(a.methods) - set(HOOK_METHODS)
    if unknown:
        p.error(f"unknown method(s): {', '.join(sorted(unknown))}")
    if a.xfs and a.ext4:
        p.error("--xfs and --ext4 exclude each other")
    if a.squash is not None and a.chain is not None:
        p.error("--squash and --chain exclude each other")
    if min(a.squash or 2, a.chain or 2) < 2:
        p.error("a chain needs 2 layers or more")
    if a.tools is not None:
        a.tools = [t.strip() for t in a.tools.split(",") if t.strip()]
        unknown = set(a.tools) - set(STANDARD_TOOLS | XFS_TOOLS | SPARSE_TOOLS)
        if unknown:
            p.error(f"unknown tool(s): {', '.join(sorted(unknown))}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench.py must run as root (mknod whiteouts, trusted.* xattrs, loop mounts)")
    fstype = "xfs" if a.xfs else "ext4" if a.ext4 else None
    need = ["cp", "tar", "gzip", "pigz", "zstd", "sh"] + (MKFS[fstype][:1] if fstype else [])
    missing = [n for n in need if not shutil.which(n)]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)}")
    run_hook = not a.no_hook
    if run_hook and not os.access(a.hook, os.X_OK):
        log(f"hook {a.hook} not found: running the standard tools only")
        run_hook = False

    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.squash is not None or a.chain is not None:
        return bench_chain(a, a.workdir)
    if a.startup is not None:
        if not run_hook:
            sys.exit("--startup needs the installed hook (--hook)")
        return bench_startup(
            a.workdir / "startup", [str(a.hook), *a.hook_arg], a.go_hook, a.startup
        )
    if a.push is not None:
        if not run_hook:
            sys.exit("--push needs the installed hook (--hook)")
        return bench_push(a, [str(a.hook), *a.hook_arg])
    special = {"small-files": a.small_files, "sparse": a.sparse, "dirs": a.dirs,
               "hardlinks": a.hardlinks}  # fmt: skip
    kind = next((k for k, n in special.items() if n is not None), None)
    if kind is not None:
        count = special[kind]
        params = {"kind": kind, "count": count}
        fx_name, title = f"fixture-{kind}-{count}", f"{count} {kind}"
    else:
        params = {"kind": "data", "size_mb": a.size_mb, "seed": a.seed}
        fx_name, title = f"fixture-data-{a.size_mb}-s{a.seed}", f"data upperdir, {a.size_mb} MiB"

    tools_spec = SPARSE_TOOLS if kind == "sparse" else STANDARD_TOOLS
    if a.xfs:  # cp -a reflinks there: compare with and without; tar methods as elsewhere
        tools_spec = {n: t for n, t in tools_spec.items() if t[0] != "copy"} | XFS_TOOLS
    if a.tools is not None:
        tools_spec = {n: t for n, t in tools_spec.items() if n in a.tools}
    tools: list[Tool] = [Tool("hook no-op", NO_OP, True)] if run_hook else []
    for m in a.methods:
        if run_hook:
            tools.append(Tool(f"hook {m}", m, True))
        if not a.no_tools:
            tools += [Tool(n, m, False) for n, (tm, _) in tools_spec.items() if tm == m]
    hook_args = [str(a.hook), *a.hook_arg]

    def bench(base: Path) -> None:
        fx = ensure_fixture(base / fx_name, params)
        scratch = base / "scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        warm_cache(fx.upper)
        for r in range(a.rounds):
            # Alternate: rotate the order each round so no tool always runs first.
            order = tools[r % len(tools) :] + tools[: r % len(tools)]
            for tool in order:
                if tool.error and not tool.samples:
                    continue  # failed before: don't retry every round
                run_tool(
                    tool,
                    fx,
                    scratch,
                    hook_args,
                    check=r == 0 and not a.no_check,
                    sync=not a.no_sync,
                )
        shutil.rmtree(scratch, ignore_errors=True)
        print_tables(
            tools,
            fx,
            title
            + ({"xfs": " on XFS (reflink=1, loop)", "ext4": " on ext4 (loop)"}.get(fstype, "")),
            per_entry=kind in ("small-files", "dirs", "hardlinks"),
            disk=a.xfs,
            note=note,
        )
        print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
        if run_hook:
            print(f"hook: {shlex.join(hook_args)}  (empty environment, state JSON on stdin)")

    note = "warm cache; standard tools " + (
        "without a final sync" if a.no_sync else "timed with a final sync/syncfs, as the hook"
    )
    if not fstype and ext4_without_journal(a.workdir):
        log(f"{a.workdir} is on ext4 without a journal: see --ext4")
        note += (
            "; NOTE: outputs on an ext4 without a journal, where creating files soon after"
            " deleting many is slow for every tool (see --ext4)"
        )
    if fstype:
        fixture_mb = a.size_mb if kind is None else 64 if kind == "sparse" else 1024
        image_bytes = (fixture_mb * 3 + 1024) * MIB
        if kind in ("small-files", "dirs", "hardlinks"):
            # ext4 gets an inode per 4 KiB: room for the fixture, a copy of it and a
            # tar of ~2 KiB per entry (a directory takes a 4 KiB block too).
            image_bytes = max(image_bytes, count * 24 * 1024)
        with LoopFs(fstype, a.workdir / f"bench-{fstype}.img", image_bytes) as mnt:
            bench(mnt)
    else:
        bench(a.workdir)
    return 1 if any(t.error for t in tools) else 0


if __name__ == "__main__":
    sys.exit(main())
