#!/usr/bin/env python3
"""Compare gzip/zstd writers for the tar.gz / tar.zst methods of archive_overlay.

Not part of the test suite. Run with the test venv's python (it needs isal,
zlib-ng and zstandard):

    /opt/archive_overlay-test/bin/python bench/compressor_study.py [--size-mb 300]

It writes a deterministic mixed data file (text-like, random, zeros; gzip -6
shrinks it to about 0.6), then compresses it once with each candidate in a
child process, feeding write() with 128 KiB chunks, and prints a markdown
table of wall seconds, CPU seconds, output size, size relative to gzip -6,
peak RSS of the child, and whether the output is one gzip member that
``gzip -t`` accepts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

CHUNK = 128 * 1024

_VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "container image layer overlay volume data archive request response error warning info debug "
    "user session token timeout retry connection database index query table column row value "
    "http https GET POST PUT DELETE status latency bytes duration service worker queue message"
)
WORDS = _VOCABULARY.split()


def text_block(rng: random.Random, size: int) -> bytes:
    """Log-like lines: timestamps, levels, words and numbers (gzip -6: ~0.3)."""
    out = []
    n = 0
    levels = ("info", "debug", "warn", "error")
    t = rng.randrange(1_600_000_000, 1_700_000_000)
    while n < size:
        t += rng.randrange(0, 5)
        words = " ".join(rng.choices(WORDS, k=rng.randrange(4, 16)))
        line = (
            f"ts={t}.{rng.randrange(1000):03d} level={rng.choice(levels)} "
            f'req={rng.getrandbits(32):08x} msg="{words}" n={rng.randrange(100000)}\n'
        )
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def make_data(path: Path, size: int, seed: int = 1) -> None:
    """Blocks of 64 KiB..4 MiB: ~42% text-like, ~45% random, ~13% zeros."""
    rng = random.Random(seed)
    written = 0
    with open(path, "wb") as f:
        while written < size:
            n = min(size - written, rng.randrange(64 * 1024, 4 * 1024 * 1024))
            kind = rng.random()
            if kind < 0.42:
                f.write(text_block(rng, n))
            elif kind < 0.87:
                f.write(rng.randbytes(n))
            else:
                f.write(bytes(n))
            written += n


# Each candidate: (name, kind, arg). kind "py" runs PY_WRITER with arg as the
# opener expression; kind "sh" runs a shell pipeline reading $IN writing $OUT.
CANDIDATES = [
    ("gzip (stdlib) -1", "py", "gzip.open(out, 'wb', compresslevel=1)"),
    ("gzip (stdlib) -6", "py", "gzip.open(out, 'wb', compresslevel=6)"),
    *[
        (f"isal igzip -{lv} single", "py", f"isal.igzip.open(out, 'wb', compresslevel={lv})")
        for lv in range(4)
    ],
    *[
        (
            f"isal igzip_threaded -{lv} t=2",
            "py",
            f"isal.igzip_threaded.open(out, 'wb', compresslevel={lv}, threads=2)",
        )
        for lv in range(4)
    ],
    *[
        (
            f"zlib-ng gzip_ng_threaded -{lv} t=2",
            "py",
            f"zlib_ng.gzip_ng_threaded.open(out, 'wb', compresslevel={lv}, threads=2)",
        )
        for lv in range(1, 7)
    ],
    ("zlib-ng gzip_ng -1 single", "py", "zlib_ng.gzip_ng.open(out, 'wb', compresslevel=1)"),
    (
        "zstandard -3 threads=-1",
        "py",
        "zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(open(out, 'wb'))",
    ),
    ("gzip -6 (GNU)", "sh", 'gzip -6 -c < "$IN" > "$OUT"'),
    ("pigz -6", "sh", 'pigz -6 -c < "$IN" > "$OUT"'),
    ("zstd -T0 (-3)", "sh", 'zstd -q -T0 -c < "$IN" > "$OUT"'),
]

PY_WRITER = f"""
CHUNK = {CHUNK}
import sys, importlib
for module in ("gzip", "isal.igzip", "isal.igzip_threaded", "zlib_ng.gzip_ng",
               "zlib_ng.gzip_ng_threaded", "zstandard"):
    try:
        importlib.import_module(module)
        globals()[module.split(".")[0]] = importlib.import_module(module.split(".")[0])
    except ImportError:
        pass
inp, out, expr = sys.argv[1], sys.argv[2], sys.argv[3]
w = eval(expr)
with open(inp, 'rb') as f:
    while True:
        b = f.read(CHUNK)
        if not b:
            break
        w.write(b)
w.close()
"""


def run_child(argv: list[str], env: dict | None = None) -> tuple[float, float, int]:
    """Run argv; return (wall s, cpu s of the child tree, peak RSS KiB of the child tree)."""
    # GNU time reports the child's peak RSS measured from a tiny parent: a child
    # forked from python keeps python's RSS high-water mark until it execs.
    with tempfile.NamedTemporaryFile("r") as rss_file:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(
            ["/usr/bin/time", "-o", rss_file.name, "-f", "%M", *argv], check=True, env=env
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        maxrss = int(rss_file.read().split()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, maxrss


def available(candidate: tuple[str, str, str]) -> bool:
    """Whether the candidate's python module or command is installed."""
    _, kind, arg = candidate
    if kind == "py":
        return importlib.util.find_spec(arg.split(".")[0]) is not None
    return shutil.which(arg.split()[0]) is not None


def gzip_members(path: Path) -> int:
    """Number of complete gzip members in path."""
    members = 0
    d = zlib.decompressobj(31)
    with open(path, "rb") as f:
        while b := f.read(64 * 1024):
            while b:
                d.decompress(b)  # output discarded
                if not d.eof:
                    break
                members += 1
                b = d.unused_data
                d = zlib.decompressobj(31)
    return members


def measure_one(name: str, kind: str, arg: str, data: Path, out: Path) -> None:
    if kind == "py":
        argv = [sys.executable, "-c", PY_WRITER, str(data), str(out), arg]
        env = None
    else:
        argv = ["sh", "-c", arg]
        env = dict(os.environ, IN=str(data), OUT=str(out))
    wall, cpu, rss = run_child(argv, env)
    print(f"RESULT\t{name}\t{wall:.3f}\t{cpu:.3f}\t{out.stat().st_size}\t{rss}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=300)
    p.add_argument("--workdir", default="/var/tmp/archive_overlay-compressor-study")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: NAME KIND ARG
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"data-{a.size_mb}.bin"
    if a.one:
        measure_one(*a.one, data, work / "out")
        return
    if not data.exists() or data.stat().st_size != a.size_mb << 20:
        print(f"writing {data} ...", file=sys.stderr)
        make_data(data, a.size_mb << 20)
    with open(data, "rb") as f:  # warm the page cache
        while f.read(1 << 24):
            pass
    size = data.stat().st_size
    candidates = [c for c in CANDIDATES if available(c)]
    rows: dict[str, list[tuple[float, float, int, int]]] = {}
    checks: dict[str, tuple[int, bool]] = {}
    for _ in range(a.rounds):
        for name, kind, arg in candidates:
            # A fresh parent per candidate so RUSAGE_CHILDREN's maxrss is its own.
            r = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--size-mb",
                    str(a.size_mb),
                    "--workdir",
                    str(work),
                    "--one",
                    name,
                    kind,
                    arg,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT\t"))
            _, _, wall, cpu, osize, rss = line.split("\t")
            rows.setdefault(name, []).append((float(wall), float(cpu), int(osize), int(rss)))
            out = work / "out"
            if name not in checks and not name.startswith("zst"):
                t = subprocess.run(["gzip", "-t", str(out)], check=False, capture_output=True)
                checks[name] = (gzip_members(out), t.returncode == 0)
            os.unlink(out)
            print(f"{name}: {wall}s", file=sys.stderr)
    ref = sorted(rows["gzip -6 (GNU)"])[len(rows["gzip -6 (GNU)"]) // 2][2]
    print(
        f"\ninput: {size / 1e6:.0f} MB, gzip -6 ratio {ref / size:.3f}, "
        f"{os.cpu_count()} CPUs, median of {a.rounds}\n"
    )
    print(
        "| writer | wall s | MB/s | CPU s | output MB | vs gzip -6 | peak RSS MiB "
        "| gzip members | gzip -t |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, _, _ in candidates:
        rs = sorted(rows[name])
        wall, cpu, osize, rss = rs[len(rs) // 2]
        members, ok = checks.get(name, (None, None))
        print(
            f"| {name} | {wall:.2f} | {size / wall / 1e6:.0f} | {cpu:.2f} | {osize / 1e6:.1f} "
            f"| {osize / ref:.3f} | {rss / 1024:.0f} | {'-' if members is None else members} "
            f"| {'-' if ok is None else ('ok' if ok else 'FAIL')} |"
        )


if __name__ == "__main__":
    if shutil.which("gzip") is None:
        sys.exit("gzip not found")
    main()
