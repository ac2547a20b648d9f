"""bench/bench.py's chain modes run small: --chain and --squash build a chain with the
installed hook through real overlays, time the hook's commits on it (without a merge, with
the older half merged, with all merged) against tar | pigz and umoci unpack + tar | pigz,
and print a table whose layer counts the layout must bear out.  Not a timing test: the
figures are whatever this machine gives."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires_root
from engines import require

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"
REF_NAME = "org.opencontainers.image.ref.name"


def table(stdout: str) -> dict[str, list[str]]:
    """The chain table's rows by their first cell (markdown escapes undone)."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith(("| run |", "| --- |")):
            cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def run_bench(hook_bin: Path, workdir: Path, *args: str) -> dict[str, list[str]]:
    for tool in ("umoci", "pigz", "skopeo", "/usr/bin/time"):  # GNU time: the hook's peak RSS
        require(shutil.which(tool) is not None, f"{tool} not installed")
    cmd = [sys.executable, str(BENCH), "--hook", str(hook_bin), "--workdir", str(workdir),
           "--rounds", "2", "--base-files", "50", *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return table(done.stdout)


def tip_layers(layout: Path, tag: str) -> int:
    """The layers of a revision, as skopeo reads the layout."""
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{layout}:{tag}"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return len(json.loads(raw)["layers"])


def check_rows(rows: dict[str, list[str]], layers: int) -> None:
    depth = layers + 1
    expected = {  # row: (revision layers, layers merged); the older half of depth's own
        "hook commit on the data image (a 2-layer revision)": (2, 0),
        f"hook commit on the {depth}-layer tip, image-max-layers={depth + 1} (no merge)":
            (depth + 1, 0),
        f"hook commit on the {depth}-layer tip, image-max-layers={depth}: merges the older "
        "half": (depth + 1 - (depth // 2) + 1, depth // 2),
        f"hook commit on the {depth}-layer tip, image-max-layers=3: merges all {layers}":
            (3, layers),
    }  # fmt: skip
    for name, (revision, merged) in expected.items():
        assert name in rows, f"{name!r} missing from {list(rows)}"
        cells = rows[name]
        assert (int(cells[0]), int(cells[1])) == (revision, merged), (name, cells)
        wall, own, rss = float(cells[2]), float(cells[3]), float(cells[7])
        assert 0 < own <= wall, (name, cells)
        assert 8 < rss < 64, f"{name}: peak RSS {rss} MiB, the hook's own process"
    for stick, col in (("tar pax xattrs | pigz -6 of the run's upperdir", 4),
                       ("umoci unpack + tar pax xattrs | pigz -6 of the chain", 5)):  # fmt: skip
        assert stick in rows and rows[stick][col] == "1.00", (stick, rows.get(stick))


@requires_root
@pytest.mark.parametrize("mode", ["--chain", "--squash"])
def test_bench_chain_modes(hook_bin: Path, tmp_path: Path, mode: str) -> None:
    layers = 3
    extra = ["--chain-kib", "16"] if mode == "--chain" else ["--squash-files", "4"]
    rows = run_bench(hook_bin, tmp_path, mode, str(layers), *extra)
    check_rows(rows, layers)
    if mode == "--squash":
        assert f"merge_layers of the {layers} (squash_driver.py, no commit)" in rows
    # The chain it built, as skopeo reads it; the timed commits went to copies of it.
    layout = next(tmp_path.glob("*/img"))
    assert [tip_layers(layout, f"r{i}") for i in range(1, layers + 1)] == [2, 3, 4]
    index = json.loads((layout / "index.json").read_text())
    tags = [m.get("annotations", {}).get(REF_NAME) for m in index["manifests"]]
    assert tags == ["base", "r1", "r2", "r3"]
