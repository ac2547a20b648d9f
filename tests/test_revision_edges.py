"""The revision loop at its edges (issue 16), each case reproduced with the tool that found it.

A base without history (umoci insert --no-history) that buildah and podman must
still build on; SIGKILL at every step of a commit, then `umoci gc` and skopeo;
a container that stops twice (podman start twice); a container id that is not
UTF-8; two hooks in the same second with {time}; names as long as NAME_MAX.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import requires_root
from engines import Podman, build_rootfs, remove_tree, run, scratch_dir
from test_oci_image import check_layout, image_args, image_state, tagged, written_manifest
from test_oci_layer import require_tools
from test_safety import hook, mounted, small_tree

pytestmark = requires_root


@pytest.fixture
def engine_dir() -> Iterator[Path]:
    """A world-reachable scratch dir with a short, lowercase name (podman's `oci:` refs)."""
    base = scratch_dir("ao-re-")
    base.chmod(0o755)
    try:
        yield base
    finally:
        remove_tree(base)


def non_empty_history(config: dict) -> int:
    return sum(1 for h in config.get("history", []) if not h.get("empty_layer"))


# --- 2. a base without history ------------------------------------------------------------


def test_revision_on_a_base_without_history_is_built_on_by_buildah_and_podman(
    hook_bin, make_overlay, tmp_path, engine_dir
):
    """umoci insert --no-history makes a 2-layer base with no history; the revision on it
    must list one non-empty history entry per layer, or buildah commit and podman commit of
    a container made from it fail ("history lists 2 non-empty layers, but we have 4 layers on disk")."""
    require_tools("umoci", "buildah", "podman", "runc", "skopeo")
    layout = engine_dir / "layout"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:data"])
    rootfs = build_rootfs(engine_dir / "rootfs")
    run(["umoci", "insert", "--no-history", "--image", f"{layout}:data", str(rootfs), "/"])
    extra = engine_dir / "extra"
    extra.mkdir()
    (extra / "from-the-base.txt").write_text("second base layer\n")
    run(["umoci", "insert", "--no-history", "--image", f"{layout}:data", str(extra), "/etc"])
    base_config = json.loads(run(["skopeo", "inspect", "--config", f"oci:{layout}:data"]).stdout)
    assert non_empty_history(base_config) == 0 and len(base_config["rootfs"]["diff_ids"]) == 2

    ovl = small_tree(make_overlay())
    commit = hook(hook_bin, image_state(tmp_path, ovl, {"data": image_args(layout)}))
    assert commit.returncode == 0, commit.log
    check_layout(layout)

    podman = Podman(engine_dir / "p")
    try:
        podman.setup()
        podman.load(f"oci:{layout}:data", "localhost/revision")
        podman("create", "--name", "from-revision", "localhost/revision", "/bin/true")
        podman("commit", "--quiet", "from-revision", "localhost/by-podman")
        buildah = podman.as_user(["buildah", "--storage-driver", "overlay"])
        work = run([*buildah, "from", "--quiet", "--pull-never", f"oci:{layout}:data"]).stdout
        made = run([*buildah, "commit", "--quiet", work.strip(), "localhost/by-buildah"])
        assert made.returncode == 0
        for image in ("localhost/by-buildah", "localhost/by-podman"):
            layers = json.loads(podman("image", "inspect", image).stdout)[0]["RootFS"]["Layers"]
            assert len(layers) == 4, (image, layers)  # the revision's 3 and the commit's
    finally:
        run([*podman.as_user(["buildah", "rm", "--all"])], check=False)
        podman.teardown()
    config = json.loads(run(["skopeo", "inspect", "--config", f"oci:{layout}:data"]).stdout)
    assert non_empty_history(config) == len(config["rootfs"]["diff_ids"]) == 3, config
    padding, ours = config["history"][:2], config["history"][2]
    assert not any(h.get("created_by", "").startswith("archive_overlay") for h in padding)
    assert all("recorded no history" in h["comment"] for h in padding), padding
    assert ours["created_by"].startswith("archive_overlay ")


# --- 4. a killed commit's temporaries and `umoci gc` ----------------------------------------

# A commit's steps after the layer's first write: fsyncs of the layer (1), the blobs dir (2),
# config and blobs dir (3, 4), manifest and blobs dir (5, 6), index.json (7), the layout (8);
# renames of the layer, config, manifest (into blobs/sha256) and index.json (1-4).
COMMIT_STEPS = (
    [("write", 1)] + [("fsync", n) for n in range(1, 9)] + [("renameat", n) for n in range(1, 5)]
)


@pytest.mark.parametrize(
    ("syscall", "when"), COMMIT_STEPS, ids=[f"{s}-{n}" for s, n in COMMIT_STEPS]
)
def test_sigkill_at_any_step_of_a_commit_leaves_a_layout_umoci_gc_and_skopeo_accept(
    hook_bin, make_overlay, tmp_path, syscall, when
):
    """Nothing but digest-named blobs in blobs/sha256, even after a SIGKILL (how podman and
    runc end a hook past its timeout): `umoci gc` refuses a layout holding anything else."""
    require_tools("strace", "umoci", "skopeo")
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    first = hook(hook_bin, image_state(tmp_path, ovl, {"data": image_args(layout)}, "first"))
    assert first.returncode == 0, first.log
    with mounted(ovl) as merged:
        (merged / "second").write_text("a new layer, config and manifest\n")
    state = image_state(tmp_path, ovl, {"data": image_args(layout)}, "second")
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}", "-e",
         f"inject={syscall}:signal=KILL:when={when}", str(hook_bin)],
        input=state.encode(), capture_output=True, env={}, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode in (-9, 137), (proc.returncode, proc.stderr.decode())
    blobs = [p.name for p in (layout / "blobs" / "sha256").iterdir()]
    run(["umoci", "gc", "--layout", str(layout)])  # before the fix: "invalid digest"
    assert all(re.fullmatch("[0-9a-f]{64}", name) for name in blobs), blobs
    run(["skopeo", "inspect", f"oci:{layout}:data"])
    after = hook(hook_bin, state)  # the next run removes the dead one's temporaries, commits
    assert after.returncode == 0, after.log
    assert tagged(check_layout(layout), "data") == [written_manifest(after)]
    run(["umoci", "gc", "--layout", str(layout)])
    run(["skopeo", "inspect", f"oci:{layout}:data"])
