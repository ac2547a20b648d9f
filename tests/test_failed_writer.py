"""A failed archive's writers are closed before its file: nothing of it is written later.

The tar writers buffer what they write (a buffered writer on the archive's fd, which
it does not own, and a compressor's threads in front of it).  When an archive fails
with data still in them, they must be shut down before the fd is closed: a writer
finalised later (Python 3.13 does so during the run) writes its stale bytes into a
closed fd ("Exception ignored in: <_io.BufferedWriter ...>: Bad file descriptor") or,
once the number is reused, into the next archive's file.

Archive a fills a small tmpfs (ENOSPC mid-stream, with incompressible data in every
buffer); archive b, of the same method, is written after it in the same run and must
come out whole, as GNU tar (and, for a layer, its descriptor's digests) says.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import (
    Overlay,
    archive_annotations,
    requires_root,
    state_json,
    write_bundle,
)

pytestmark = requires_root

DATA_FILES = 6
DATA_SIZE = 3 << 20  # incompressible, so every writer holds some when the tmpfs is full
FULL_SIZE = "2m"  # the tmpfs archive a fails in: after its first buffers went through

TAR_FLAGS = {"tar": [], "tar.gz": ["-z"], "tar.zst": ["--zstd"], "oci-layer": ["-z"],
             "oci-layer+zstd": ["--zstd"]}  # fmt: skip


@pytest.fixture
def random_overlay(make_overlay) -> Overlay:
    ovl = make_overlay()
    ovl.mount()
    for i in range(DATA_FILES):
        (ovl.merged / f"data-{i}").write_bytes(os.urandom(DATA_SIZE))
    (ovl.merged / "small").write_text("after the big files\n")
    return ovl


@pytest.fixture
def full_dir(tmp_path: Path):
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FULL_SIZE}", "tmpfs", str(full)],
                   check=True)  # fmt: skip
    yield full
    subprocess.run(["umount", str(full)], check=False)


def listing(archive: Path, method: str) -> dict[str, str]:
    """name -> sha256 of each regular member, as GNU tar reads the archive."""
    out = archive.parent / "extracted"
    out.mkdir()
    result = subprocess.run(
        ["tar", *TAR_FLAGS[method], "-xf", str(archive), "-C", str(out)],
        check=False, capture_output=True,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
    return {
        str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("method", sorted(TAR_FLAGS))
def test_after_a_failed_archive_the_next_one_is_whole(
    random_overlay, full_dir, run_hook, tmp_path, method
):
    out = tmp_path / "out"
    annotations = {
        **archive_annotations("a", mount_point="/data", archive_to=str(full_dir / "a"),
                              method=method),
        **archive_annotations("b", mount_point="/data", archive_to=str(out / "b"),
                              method=method),
    }  # fmt: skip
    bundle = write_bundle(tmp_path / "bundle", [random_overlay.mount_entry()], annotations)
    result = run_hook(state_json(bundle))
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Exception ignored" not in stderr and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "level=error" in line]
    assert len(errors) == 1 and "archive=a" in errors[0], stderr
    assert "No space left on device" in errors[0], stderr
    assert os.listdir(full_dir) == [], "archive a left something behind"

    expected = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(random_overlay.upper.iterdir())
    }
    assert listing(out / "b", method) == expected
    if method.startswith("oci-layer"):
        descriptor = json.loads((out / "b.json").read_text())
        data = (out / "b").read_bytes()
        assert descriptor["size"] == len(data)
        assert descriptor["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
