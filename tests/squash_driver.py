"""Merge the layers an image has above its base into one, with archive_overlay.merge_layers.

    python squash_driver.py LAYOUT TIP BASE NEW_TAG [--zstd]

Image TIP (a ref name in the OCI layout LAYOUT) must start with the layers of
image BASE; the layers above them are merged, the base's are read for what
they hold.  The merged layer goes into blobs/sha256 under its digest, then a
config and manifest (the base's layers, then the merged one) tagged NEW_TAG.
Prints one JSON line: the layer's descriptor, entries written, seconds spent
merging, and this process's peak RSS in KiB.  Used by tests/test_squash.py and
bench/bench.py; run with the interpreter of the venv that holds the hook.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import archive_overlay as ao

REF_NAME = "org.opencontainers.image.ref.name"


def read_blob(layout: Path, digest: str) -> dict:
    return json.loads((layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_text())


def put_blob(layout: Path, value: dict, media_type: str) -> dict:
    data = json.dumps(value).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}


def tagged(layout: Path, index: dict, tag: str) -> dict:
    entry = next(m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag)
    return read_blob(layout, entry["digest"])


def main(layout: Path, tip: str, base: str, new_tag: str, zstd: bool) -> int:
    index = json.loads((layout / "index.json").read_text())
    tip_manifest, base_manifest = tagged(layout, index, tip), tagged(layout, index, base)
    below = base_manifest["layers"]
    assert tip_manifest["layers"][: len(below)] == below, "TIP is not on top of BASE"
    merged = tip_manifest["layers"][len(below) :]
    archive = ao.Archive("squash")
    archive.method = "oci-image+zstd" if zstd else "oci-image"
    stats = ao.Stats()
    blobs_fd = os.open(layout / "blobs" / "sha256", os.O_RDONLY | os.O_DIRECTORY)
    tmp = layout / f".squash{ao.TMP_MARK}{os.getpid()}"
    out_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    start = time.monotonic()
    try:
        descriptor = ao.merge_layers(blobs_fd, merged, below, out_fd, archive, stats)
    except ao.ArchiveError as exc:
        print(f"ArchiveError: {exc}", file=sys.stderr)
        tmp.unlink()
        return 1
    seconds = time.monotonic() - start
    os.fsync(out_fd)
    os.close(out_fd)
    tmp.rename(layout / "blobs" / "sha256" / descriptor["digest"].removeprefix("sha256:"))
    config = read_blob(layout, base_manifest["config"]["digest"])
    config["rootfs"]["diff_ids"].append(descriptor["diff_id"])
    config.setdefault("history", []).append({"created_by": f"squash_driver {tip}"})
    manifest = dict(base_manifest)
    manifest["config"] = put_blob(layout, config, base_manifest["config"]["mediaType"])
    manifest["layers"] = [*below, {k: descriptor[k] for k in ("mediaType", "digest", "size")}]
    entry = put_blob(layout, manifest, "application/vnd.oci.image.manifest.v1+json")
    index["manifests"].append({**entry, "annotations": {REF_NAME: new_tag}})
    (layout / "index.json").write_text(json.dumps(index))
    print(json.dumps({
        "descriptor": descriptor, "entries": stats.entries, "seconds": seconds,
        "maxrss_kib": peak_rss_kib(),
    }))  # fmt: skip
    return 0


def peak_rss_kib() -> int:
    """This process's peak RSS: VmHWM, which starts anew at exec (getrusage's ru_maxrss
    keeps the high-water mark of whatever process forked this one, pytest included)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--zstd"]
    sys.exit(main(Path(args[0]), args[1], args[2], args[3], "--zstd" in sys.argv))
