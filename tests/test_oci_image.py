"""The oci-image methods commit each run as a tagged revision of an OCI image layout.

First with overlays mounted here: placeholders in paths, the layout's
contents (blobs checked against their digests and sizes), 8 hooks at once,
SIGKILL at chosen system calls (strace injects it), and bad input. Then the
loop users run, with real tools only: podman (rootful, rootless native,
rootless fuse-overlayfs) mounts the tagged revision, a container changes it,
the hook commits the next revision, three times; umoci unpacks each revision,
skopeo shows its history, and a real registry (Debian's docker-registry)
takes the revisions and gives revision 3 to a podman with another storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    Overlay,
    archive_annotations,
    project_version,
    requires_root,
    state_json,
    write_bundle,
)
from engines import (
    FUSE_OVERLAYFS,
    TEST_USER,
    Podman,
    User,
    build_oci_image,
    ensure_fuse_device,
    ensure_user,
    remove_tree,
    require,
    run,
    run_readme_with_podman,
    scratch_dir,
)
from engines import run as run_tool
from test_oci_layer import (
    BB_IMAGE,
    LISTING,
    Tree,
    assert_same_tree,
    build_tools_rootfs,
    list_host_tree,
    parse_listing,
    podman_run_args,
    read_log,
    require_tools,
    sha256_file,
)
from test_safety import (
    TMP_MARK,
    HookRun,
    finish,
    hook,
    mounted,
    random_files,
    small_tree,
    start_hook,
    tmpfs,  # noqa: F401 - a fixture
)
from trees import dir_mtimes, seen_through, snapshot

pytestmark = requires_root

REF_NAME = "org.opencontainers.image.ref.name"
COMMITTED_BY_ID = "com.launchplatform.oci-hooks.archive-overlay.container"
COMMITTED_BY_ARCHIVE = "com.launchplatform.oci-hooks.archive-overlay.archive"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TIME_RE = r"\d{8}T\d{6}\.\d{6}Z"


# --- the hook on a hand-made overlay ------------------------------------------------------


def image_args(layout: Path, tag: str = "data", method: str = "oci-image", **more: str) -> dict:
    return {"archive_to": str(layout), "method": method, "image_tag": tag, **more}


def image_state(tmp_path: Path, ovl: Overlay, archives: dict[str, dict[str, str]],
                container: str = "c0ffee") -> str:  # fmt: skip
    """A state JSON (container id `container`) whose config mounts ovl at /data."""
    annotations: dict[str, str] = {}
    for name, args in archives.items():
        annotations.update(archive_annotations(name, mount_point="/data", **args))
    bundle = write_bundle(tmp_path / "bundle", [ovl.mount_entry("/data")], annotations)
    state = json.loads(state_json(bundle))
    state["id"] = container
    return json.dumps(state)


def written_manifest(run: HookRun, archive: str = "data") -> str:
    """The manifest digest the hook's log line gives for an archive."""
    for line in run.log.splitlines():
        if "archive written" in line and f" archive={archive} " in f" {line} ":
            found = re.search(r" manifest=(sha256:[0-9a-f]{64}) ", line + " ")
            assert found, line
            return found.group(1)
    raise AssertionError(f"no archive written line for {archive}:\n{run.log}")


# --- reading a layout as image-spec says, checking every blob ------------------------------


def blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def check_blob(layout: Path, descriptor: dict) -> Path:
    path = blob(layout, descriptor["digest"])
    assert path.is_file(), f"{descriptor['digest']} referenced but missing"
    assert path.stat().st_size == descriptor["size"], f"{path}: wrong size"
    assert sha256_file(path) == descriptor["digest"], f"{path}: wrong digest"
    return path


def check_layout(layout: Path) -> dict:
    """index.json, each manifest, config and layer it references: present and whole."""
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2, index
    for descriptor in index["manifests"]:
        manifest = json.loads(check_blob(layout, descriptor).read_text())
        assert manifest.get("mediaType", MANIFEST) == descriptor["mediaType"] == MANIFEST
        config = json.loads(check_blob(layout, manifest["config"]).read_text())
        assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"]), config
        for layer in manifest["layers"]:
            check_blob(layout, layer)
    leftovers = [p for p in layout.rglob("*") if TMP_MARK in p.name]
    assert leftovers == [], f"temporaries left: {leftovers}"
    return index


def tagged(index: dict, tag: str) -> list[str]:
    return [
        d["digest"] for d in index["manifests"] if d.get("annotations", {}).get(REF_NAME) == tag
    ]


def read_json_blob(layout: Path, digest: str) -> dict:
    return json.loads(blob(layout, digest).read_text())


# --- placeholders ---------------------------------------------------------------------------


def test_placeholders_in_archive_to_success_and_image_tag(hook_bin, make_overlay, tmp_path):
    ovl = small_tree(make_overlay())
    out = tmp_path / "out"
    archives = {
        "tarred": {"archive_to": f"{out}/{{name}}-{{id}}-{{time}}.tar.gz", "method": "tar.gz",
                   "success": f"{out}/{{name}}-{{time}}.ok"},
        "image": image_args(out / "layout-{id}", tag="rev-{time}",
                            success=f"{out}/{{{{literal}}}}-{{name}}.ok"),
    }  # fmt: skip
    run = hook(hook_bin, image_state(tmp_path, ovl, archives, container="abc123"))
    assert run.returncode == 0, run.log
    names = {p.name for p in out.iterdir()}
    oks = [n for n in names if n.startswith("tarred-") and n.endswith(".ok")]
    assert len(oks) == 1, names
    stamp = oks[0].removeprefix("tarred-").removesuffix(".ok")
    assert re.fullmatch(TIME_RE, stamp), names
    # the same {time} in every archive of the run
    assert names == {"layout-abc123", f"tarred-abc123-{stamp}.tar.gz", f"tarred-{stamp}.ok",
                     "{literal}-image.ok"}  # fmt: skip
    index = check_layout(out / "layout-abc123")
    assert tagged(index, f"rev-{stamp}") == [written_manifest(run, "image")]


@pytest.mark.parametrize(
    ("arg", "value", "words"),
    [
        ("archive_to", "/tmp/x-{nope}", "unknown placeholder {nope}"),
        ("archive_to", "/tmp/x-{id", "unknown placeholder {id"),
        ("success", "/tmp/x-}", "a lone }"),
        ("image_tag", "rev-{Time}", "unknown placeholder {Time}"),
        ("image_tag", "bad tag", "image-tag 'bad tag' is not a valid ref name"),
        ("image_tag", "-{time}", "is not a valid ref name"),
        ("image_tag", "", "needs an image-tag"),
    ],
)
def test_bad_placeholder_or_tag_fails_that_archive(hook_bin, make_overlay, tmp_path, arg, value,
                                                    words):  # fmt: skip
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    archives = {"bad": image_args(layout) | {arg: value},
                "good": image_args(tmp_path / "good")}  # fmt: skip
    run = hook(hook_bin, image_state(tmp_path, ovl, archives))
    assert run.returncode == 1, run.log
    line = run.error_for("bad")
    assert words in line and "Traceback" not in run.log, line
    assert not layout.exists() and not (value.startswith("/") and Path(value).exists())
    check_layout(tmp_path / "good")


def test_container_id_that_is_not_one_path_component_is_refused(hook_bin, make_overlay, tmp_path):
    ovl = small_tree(make_overlay())
    archives = {"data": {"archive_to": f"{tmp_path}/out/{{id}}", "method": "tar"}}
    run = hook(hook_bin, image_state(tmp_path, ovl, archives, container="../escape"))
    assert run.returncode == 1, run.log
    assert "the id is missing, or is not one path component" in run.error_for("data")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()


# --- revisions ------------------------------------------------------------------------------


def test_revisions_stack_and_the_old_tag_holder_stays(hook_bin, make_overlay, tmp_path):
    """Three commits: each on the last, the layer byte for byte the oci-layer file."""
    ovl = small_tree(make_overlay())
    layout, plain = tmp_path / "layout", tmp_path / "plain.tar.gz"
    digests = []
    for i in range(3):
        archives = {"data": image_args(layout),
                    "plain": {"archive_to": str(plain), "method": "oci-layer"}}  # fmt: skip
        run = hook(hook_bin, image_state(tmp_path, ovl, archives, container=f"run{i}"))
        assert run.returncode == 0, run.log
        digests.append(written_manifest(run))
        index = check_layout(layout)
        assert tagged(index, "data") == [digests[-1]]
        assert [d["digest"] for d in index["manifests"]] == digests  # earlier ones stay
        manifest = read_json_blob(layout, digests[-1])
        descriptor = json.loads(Path(f"{plain}.json").read_text())
        assert manifest["layers"][-1] == {k: descriptor[k] for k in ("mediaType", "digest", "size")}
        assert blob(layout, descriptor["digest"]).read_bytes() == plain.read_bytes()
        config = read_json_blob(layout, manifest["config"]["digest"])
        assert config["rootfs"]["diff_ids"][-1] == descriptor["diff_id"]
        assert len(manifest["layers"]) == i + 1
        history = config["history"][-1]
        assert history["created_by"].startswith("archive_overlay ")
        assert history["comment"] == f"container run{i} archive data"
        annotations = manifest["annotations"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
                            annotations["org.opencontainers.image.created"])  # fmt: skip
        if i:
            assert annotations["org.opencontainers.image.base.digest"] == digests[-2]
            assert annotations["org.opencontainers.image.base.name"] == "data"
            previous = read_json_blob(layout, digests[-2])
            assert manifest["layers"][:-1] == previous["layers"]
        else:
            assert set(annotations) == {"org.opencontainers.image.created", COMMITTED_BY_ID,
                                        COMMITTED_BY_ARCHIVE}  # fmt: skip
        origin = (annotations[COMMITTED_BY_ID], annotations[COMMITTED_BY_ARCHIVE])
        assert origin == (f"run{i}", "data"), annotations
        assert {REF_NAME: "data", COMMITTED_BY_ID: f"run{i}", COMMITTED_BY_ARCHIVE: "data"} == (
            index["manifests"][-1]["annotations"])  # fmt: skip
        if i:  # the tag moved off the former holder; who committed it stays
            assert index["manifests"][-2]["annotations"] == {COMMITTED_BY_ID: f"run{i - 1}",
                                                             COMMITTED_BY_ARCHIVE: "data"}  # fmt: skip
    run_tool(["umoci", "gc", "--layout", str(layout)])  # earlier revisions are referenced
    assert [d["digest"] for d in check_layout(layout)["manifests"]] == digests
    # image-base by digest: a branch from revision 1, tagged apart
    archives = {"data": image_args(layout, tag="branch", image_base=digests[0])}
    run = hook(hook_bin, image_state(tmp_path, ovl, archives, container="branch"))
    assert run.returncode == 0, run.log
    index = check_layout(layout)
    branch = read_json_blob(layout, written_manifest(run))
    assert len(branch["layers"]) == 2 and tagged(index, "data") == [digests[-1]]
    assert branch["annotations"]["org.opencontainers.image.base.digest"] == digests[0]
    assert "org.opencontainers.image.base.name" not in branch["annotations"]


@pytest.mark.parametrize("same_tag", [True, False], ids=["same-tag", "different-tags"])
def test_8_hooks_commit_to_one_layout_at_once(hook_bin, make_overlay, tmp_path, same_tag):
    """None lost: every manifest in index.json, the tag on exactly one, every blob whole."""
    ovl = make_overlay()
    with mounted(ovl) as merged:
        random_files(merged, 4, 64 << 10)
    layout = tmp_path / "layout"  # made by the hooks themselves, all at once
    layout.mkdir()
    procs = []
    # A barrier: the lock is held until all 8 are seen blocked in it (proof they contend);
    # then it is released, and all 8 make the layout and commit at once.
    with holding_index_lock(layout) as holder:
        for i in range(8):
            tag = "data" if same_tag else f"data-{i}"
            method = "oci-image+zstd" if i % 2 else "oci-image"
            state = image_state(tmp_path / f"s{i}", ovl,
                                {"data": image_args(layout, tag, method)},
                                container=f"hook{i}")  # fmt: skip
            procs.append(start_hook(hook_bin, state))
        waiting = wait_blocked_in_lock(procs, layout / "index.lock", holder)
        assert len(waiting) == 8, f"only {len(waiting)} of 8 hooks reached the lock"
        assert not (layout / "index.json").exists()
    runs = [finish(p) for p in procs]
    assert [r.returncode for r in runs] == [0] * 8, "\n".join(r.log for r in runs)
    written = [written_manifest(r) for r in runs]
    index = check_layout(layout)
    listed = [d["digest"] for d in index["manifests"]]
    assert sorted(listed) == sorted(written), (listed, written)
    if same_tag:
        assert len(tagged(index, "data")) == 1 and tagged(index, "data")[0] in written
    else:
        assert all(tagged(index, f"data-{i}") == [written[i]] for i in range(8))


def test_the_hook_waits_for_the_index_lock(hook_bin, make_overlay, tmp_path):
    """Another process holds the fcntl lock on index.lock: the hook waits, then commits."""
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    state = image_state(tmp_path, ovl, {"data": image_args(layout)})
    assert hook(hook_bin, state).returncode == 0
    old_index = (layout / "index.json").read_bytes()
    with holding_index_lock(layout) as holder:
        waiting = start_hook(hook_bin, state)
        # blocked IN the lock: fcntl(F_SETLKW) on index.lock, not merely slow
        assert wait_blocked_in_lock([waiting], layout / "index.lock", holder) == [waiting.pid]
        assert waiting.poll() is None and (layout / "index.json").read_bytes() == old_index
    run = finish(waiting)
    assert run.returncode == 0, run.log
    assert tagged(check_layout(layout), "data") == [written_manifest(run)]


@contextmanager
def holding_index_lock(layout: Path) -> Iterator[subprocess.Popen]:
    """Another process holds the fcntl lock on layout/index.lock until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(layout / "index.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        yield holder
    finally:
        holder.communicate(b"release\n", timeout=10)  # closing the file drops the lock


# fcntl's system call number, and F_SETLKW (the blocking lock request), by machine
FCNTL_SYSCALL = {"x86_64": 72, "aarch64": 25}
F_SETLKW = 7


def blocked_in_lock(pid: int, lock: Path) -> bool:
    """Some thread of pid sleeps in fcntl(fd, F_SETLKW, ...) with fd open on `lock`
    (/proc/PID/task/TID/syscall names the call a blocked thread is in, and its args)."""
    number = FCNTL_SYSCALL[os.uname().machine]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tasks:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
        except OSError:
            continue
        if len(fields) < 3 or fields[0] != str(number) or int(fields[2], 16) != F_SETLKW:
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}") == str(lock):
                return True
    return False


def wait_blocked_in_lock(procs: list[subprocess.Popen], lock: Path,
                         holder: subprocess.Popen, timeout: float = 60) -> list[int]:  # fmt: skip
    """The pids of procs seen blocked in the lock on `lock` at once (all, or those that were
    when `timeout` ran out, or when one of them ended)."""
    deadline = time.monotonic() + timeout
    while True:
        blocked = [p.pid for p in procs if blocked_in_lock(p.pid, lock)]
        ended = any(p.poll() is not None for p in procs)
        if len(blocked) == len(procs) or ended or time.monotonic() > deadline:
            return blocked
        time.sleep(0.05)


HOLD_LOCK = """import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


# --- SIGKILL at chosen system calls -----------------------------------------------------------

# After the layout holds revision 1, a commit renames, in order: the layer, the
# config, the manifest, index.json; and fsyncs: the layer (1), the blobs dir
# (2), config and its dir (3, 4), manifest (5, 6), index.json (7), the layout (8).
KILL_POINTS = [  # (syscall, its invocation, index.json then, blobs added, a temporary left)
    ("fsync", 1, "old", 0, True),  # the layer written, not yet renamed
    ("renameat", 1, "old", 0, True),  # the layer about to be renamed
    ("renameat", 2, "old", 1, True),  # the config about to be renamed
    ("renameat", 3, "old", 2, True),  # the manifest about to be renamed
    ("renameat", 4, "old", 3, True),  # index.json about to be renamed
    ("fsync", 8, "new", 3, False),  # index.json renamed, its directory not yet fsync'd
]


def blob_names(layout: Path) -> set[str]:
    return {p.name for p in (layout / "blobs" / "sha256").iterdir()}


@pytest.mark.parametrize(("syscall", "when", "index_is", "added", "temporary"), KILL_POINTS,
                         ids=[f"{p[0]}-{p[1]}" for p in KILL_POINTS])  # fmt: skip
def test_sigkill_leaves_the_old_or_the_whole_new_revision(hook_bin, make_overlay, tmp_path,
                                                          syscall, when, index_is, added,
                                                          temporary):  # fmt: skip
    if shutil.which("strace") is None:
        pytest.fail("strace missing (apt-get install strace)")
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    first = hook(hook_bin, image_state(tmp_path, ovl, {"data": image_args(layout)}, "first"))
    assert first.returncode == 0, first.log
    old_index, old_blobs = (layout / "index.json").read_bytes(), blob_names(layout)
    with mounted(ovl) as merged:
        (merged / "second").write_text("a new layer, config and manifest\n")
    state = image_state(tmp_path, ovl, {"data": image_args(layout)}, "second")
    inject = f"inject={syscall}:signal=KILL:when={when}"
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}", "-e", inject,
         str(hook_bin)], input=state.encode(), capture_output=True, env={}, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode in (-9, 137), (proc.returncode, proc.stderr.decode())
    new_blobs = blob_names(layout) - old_blobs
    assert len([n for n in new_blobs if TMP_MARK not in n]) == added, new_blobs
    left = [p.name for p in layout.rglob("*") if TMP_MARK in p.name]
    assert bool(left) == temporary, left
    index_now = (layout / "index.json").read_bytes()
    index = json.loads(index_now)
    if index_is == "old":
        assert index_now == old_index
    else:
        assert len(index["manifests"]) == 2
        assert tagged(index, "data") != tagged(json.loads(old_index), "data")
    for descriptor in index["manifests"]:  # never a descriptor whose blobs are missing
        manifest = json.loads(check_blob(layout, descriptor).read_text())
        for needed in [manifest["config"], *manifest["layers"]]:
            check_blob(layout, needed)
    after = hook(hook_bin, state)  # the next run goes on, and cleans up
    assert after.returncode == 0, after.log
    index = check_layout(layout)
    assert tagged(index, "data") == [written_manifest(after)]


@pytest.mark.parametrize("when", [1, 2], ids=["before-oci-layout", "before-index.json"])
def test_sigkill_while_creating_the_layout(hook_bin, make_overlay, tmp_path, when):
    """Killed before renaming oci-layout, or index.json, into a new layout: the next run
    makes the layout and commits."""
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    state = image_state(tmp_path, ovl, {"data": image_args(layout)})
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=renameat", "-e",
         f"inject=renameat:signal=KILL:when={when}", str(hook_bin)],
        input=state.encode(), capture_output=True, env={}, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode in (-9, 137), (proc.returncode, proc.stderr.decode())
    assert not (layout / "index.json").exists()
    assert (layout / "oci-layout").exists() == (when == 2)
    after = hook(hook_bin, state)
    assert after.returncode == 0, after.log
    assert tagged(check_layout(layout), "data") == [written_manifest(after)]


# --- bad input: one error line, the layout unchanged -----------------------------------------


def layout_with_revision(hook_bin: Path, tmp_path: Path, ovl: Overlay, layout: Path) -> None:
    """A first revision, committed by another container than the tests' next run."""
    state = image_state(tmp_path, ovl, {"data": image_args(layout)}, container="earlier")
    run = hook(hook_bin, state)
    assert run.returncode == 0, run.log


def rewrite_base_config(layout: Path, change) -> None:
    """Give the tagged revision a config changed by `change` (a manifest change for 'media')."""
    index = json.loads((layout / "index.json").read_text())
    descriptor = index["manifests"][-1]
    manifest = read_json_blob(layout, descriptor["digest"])
    config = read_json_blob(layout, manifest["config"]["digest"])
    change(manifest, config)
    data = json.dumps(config).encode()
    manifest["config"]["digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
    manifest["config"]["size"] = len(data)
    blob(layout, manifest["config"]["digest"]).write_bytes(data)
    data = json.dumps(manifest).encode()
    descriptor["digest"], descriptor["size"] = (
        "sha256:" + hashlib.sha256(data).hexdigest(),
        len(data),
    )
    blob(layout, descriptor["digest"]).write_bytes(data)
    (layout / "index.json").write_text(json.dumps(index))


def not_a_config(manifest: dict, config: dict) -> None:
    manifest["config"]["mediaType"] = "application/vnd.oci.empty.v1+json"


def no_rootfs(manifest: dict, config: dict) -> None:
    del config["rootfs"]


BAD_LAYOUTS = {
    "no-oci-layout": (lambda layout: (layout / "oci-layout").unlink(), "no oci-layout"),
    "not-a-layout-at-all": (lambda layout: (layout / "oci-layout").rename(layout / "other"),
                            "no oci-layout"),
    "index-not-json": (lambda layout: (layout / "index.json").write_text("{\"manifests\": ["),
                       "index.json is not valid JSON"),
    "index-not-an-index": (lambda layout: (layout / "index.json").write_text("[]"),
                           "index.json is not a JSON object"),
    "index-bad-annotations": (
        lambda layout: (layout / "index.json").write_text(
            '{"schemaVersion": 2, "manifests": [{"digest": "sha256:0", "annotations": []}]}'),
        "index.json holds a malformed descriptor"),
    "base-config-not-an-image-config": (lambda layout: rewrite_base_config(layout, not_a_config),
                                        "not an image config"),
    "base-config-without-rootfs": (lambda layout: rewrite_base_config(layout, no_rootfs),
                                   "is not an image config"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_LAYOUTS)
def test_bad_layout_fails_with_one_line_and_is_left_alone(hook_bin, make_overlay, tmp_path, case):
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    layout_with_revision(hook_bin, tmp_path, ovl, layout)
    spoil, words = BAD_LAYOUTS[case]
    spoil(layout)
    before = snapshot(layout)
    run = hook(hook_bin, image_state(tmp_path, ovl, {"data": image_args(layout)}))
    assert run.returncode == 1, run.log
    errors = [line for line in run.log.splitlines() if "level=error" in line]
    assert len(errors) == 1 and words in errors[0] and str(layout) in errors[0], run.log
    assert "archive=data" in errors[0] and "Traceback" not in run.log
    assert snapshot(layout) == before


def test_named_base_in_a_layout_not_there_makes_nothing(hook_bin, make_overlay, tmp_path):
    ovl = small_tree(make_overlay())
    archives = {"absent": image_args(tmp_path / "absent", image_base="data"),
                "empty": image_args(tmp_path / "empty", image_base="data")}  # fmt: skip
    (tmp_path / "empty").mkdir()
    run = hook(hook_bin, image_state(tmp_path, ovl, archives))
    assert run.returncode == 1, run.log
    assert "No such file or directory" in run.error_for("absent")
    assert "is not an OCI image layout: it is empty" in run.error_for("empty")
    assert not (tmp_path / "absent").exists() and list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("base", ["missing", "sha256:" + "0" * 64, "bad base"])
def test_named_base_that_is_missing_writes_nothing(hook_bin, make_overlay, tmp_path, base):
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    layout_with_revision(hook_bin, tmp_path, ovl, layout)
    before = snapshot(layout)
    archives = {"data": image_args(layout, image_base=base)}
    run = hook(hook_bin, image_state(tmp_path, ovl, archives))
    assert run.returncode == 1, run.log
    assert base in run.error_for("data")
    assert snapshot(layout) == before


def test_full_disk_and_read_only_layout_are_left_alone(hook_bin, make_overlay, tmp_path, tmpfs):  # noqa: F811
    ovl = make_overlay()
    with mounted(ovl) as merged:
        (merged / "small").write_text("small\n")
    small = tmpfs("small", "size=1m")
    layout_with_revision(hook_bin, tmp_path, ovl, small / "layout")
    ro = tmpfs("ro", "size=1m")
    layout_with_revision(hook_bin, tmp_path, ovl, ro / "layout")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    with mounted(ovl) as merged:
        random_files(merged, 3, 1 << 20)  # 3 MiB: more than the tmpfs holds
    before = {path: seen_through(snapshot(path), (dir_mtimes,)) for path in (small, ro)}
    archives = {"full": image_args(small / "layout"), "ro": image_args(ro / "layout")}
    run = hook(hook_bin, image_state(tmp_path, ovl, archives))
    assert run.returncode == 1, run.log
    assert "No space left on device" in run.error_for("full"), run.log
    assert "Read-only file system" in run.error_for("ro"), run.log
    assert len([line for line in run.log.splitlines() if "level=error" in line]) == 2, run.log
    assert "Traceback" not in run.log
    assert {path: seen_through(snapshot(path), (dir_mtimes,)) for path in (small, ro)} == before


def test_allow_dir_applies_to_the_layout(hook_bin, make_overlay, tmp_path):
    ovl = small_tree(make_overlay())
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    archives = {"in": image_args(allowed / "layout"), "out": image_args(outside / "layout")}
    run = hook(hook_bin, image_state(tmp_path, ovl, archives), "--allow-dir", str(allowed))
    assert run.returncode == 1, run.log
    assert "outside the allowed directories" in run.error_for("out")
    assert not outside.exists()
    check_layout(allowed / "layout")


# --- the loop with podman: run, revision, the next run mounts it ---------------------------

# `sh -c LOOP sh /data N`: the listing before, run N's changes, the listing after.
RUN_CHANGES = """(
set -e
cd "$1"
echo "added in run $2" > "added-$2.txt"
echo "changed in run $2" >> changing.txt
rm "doomed-$2.txt"
rm -r redo
mkdir -p redo/sub
echo "redone in run $2" > "redo/sub/r-$2.txt"
) || exit 3
"""
LOOP = LISTING + "echo '#####'\n" + RUN_CHANGES + LISTING
RUNS = 3


def write_loop_data(root: Path) -> Path:
    for d in ("keep", "redo/sub"):
        (root / d).mkdir(parents=True, exist_ok=True)
    files = {
        "keep/k.txt": "kept\n",
        "changing.txt": "first line\n",
        "redo/old.txt": "old\n",
        "redo/sub/y.txt": "y\n",
    } | {f"doomed-{n}.txt": f"doomed {n}\n" for n in range(1, 4)}
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def assert_run_changes(view: Tree, n: int, diag: str) -> None:
    """After run n: what runs 1..n added, changed and deleted; redo/ as run n made it."""
    names = set(view.items)
    assert {f"added-{i}.txt" for i in range(1, n + 1)} <= names, diag
    assert not {f"doomed-{i}.txt" for i in range(1, n + 1)} & names, diag
    assert {f"doomed-{i}.txt" for i in range(n + 1, RUNS + 1)} <= names, diag
    assert {p for p in names if p.startswith("redo/")} == {"redo/sub", f"redo/sub/r-{n}.txt"}, diag
    assert view.items["keep/k.txt"].kind == "file", diag


@dataclass(frozen=True)
class LoopScenario:
    name: str
    key: str  # a short dir name: podman's runroot must stay within 50 characters
    rootless: bool = False
    fuse: bool = False
    registry: bool = False  # also push each revision to a registry, pull it on another podman


LOOP_SCENARIOS = [
    LoopScenario("rootful-native", "rf", registry=True),
    LoopScenario("rootless-native", "rn", rootless=True),
    LoopScenario("rootless-fuse", "rx", rootless=True, fuse=True),
]


@pytest.fixture(scope="module")
def loop_images() -> Iterator[Path]:
    """A world-reachable dir with an OCI layout holding `bb` (busybox, getfattr) and `data`."""
    require_tools("podman", "runc")
    base = scratch_dir("ao-oi-")
    base.chmod(0o755)
    try:
        build_oci_image(base / "img", "bb", build_tools_rootfs(base / "rootfs"))
        build_oci_image(base / "img", "data", write_loop_data(base / "data"))
        yield base
    finally:
        remove_tree(base)


def user_tool(podman: Podman, *cmd: str) -> subprocess.CompletedProcess:
    """A tool run as podman's user, in its user namespace when rootless (containers-storage)."""
    if podman.user is None:
        return run(podman.as_user(list(cmd)))
    return run(podman.as_user(["podman", "unshare", *cmd]))


@contextmanager
def loop_podman(loop_images: Path, key: str, hook_bin: Path, user: User | None = None,
                fuse: bool = False, data: str = "data") -> Iterator[tuple[Podman, Path, Path]]:  # fmt: skip
    """A podman with a storage of its own in loop_images/key, the hook installed (its log
    and the revisions' directory, the only one it may write, in there too), busybox and
    the data image loaded, and the data image copied once into the layout revs/data as
    the README shows: (podman, layout, log); all of it removed afterwards."""
    root = loop_images / key
    podman = Podman(root, user=user, fuse=fuse)
    revs, log = root / "revs", root / "hook.log"
    layout = revs / "data"
    try:
        podman.setup()
        revs.mkdir()
        if user is not None:
            os.chown(revs, user.uid, user.gid)
        podman.install_hook(hook_bin, log, allow_dir=revs)
        podman.load(f"oci:{loop_images / 'img'}:bb", BB_IMAGE)
        podman.load(f"oci:{loop_images / 'img'}:{data}", "localhost/data:start")
        user_tool(podman, "skopeo", "copy", "--quiet", "containers-storage:localhost/data:start",
                  f"oci:{layout}:data")  # fmt: skip
        yield podman, layout, log
    finally:
        podman.teardown()


def unpacked_view(layout: Path, zstd: bool, work: Path) -> Tree:
    """umoci's unpacking of the layout's `data`; zstd layers go through skopeo as gzip first."""
    if zstd:  # umoci 0.4.7 knows only gzip layers
        gzip_layout = work / "as-gzip"
        shutil.rmtree(gzip_layout, ignore_errors=True)
        run(["skopeo", "copy", "--quiet", "--dest-compress-format", "gzip", f"oci:{layout}:data",
             f"oci:{gzip_layout}:data"])  # fmt: skip
        layout = gzip_layout
    bundle = work / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    run(["umoci", "unpack", "--image", f"{layout}:data", str(bundle)])
    return list_host_tree(bundle / "rootfs")


@pytest.mark.parametrize("scenario", LOOP_SCENARIOS, ids=lambda s: s.name)
def test_each_run_commits_a_revision_the_next_run_mounts(scenario: LoopScenario,
                                                         loop_images: Path, hook_bin: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    if scenario.rootless:
        require_tools("runuser", "newuidmap", "newgidmap")
    if scenario.fuse:
        require(Path(FUSE_OVERLAYFS).exists() and Path("/dev/fuse").exists(), "no fuse-overlayfs")
        ensure_fuse_device()
    if scenario.registry:
        require(shutil.which("docker-registry") is not None, "docker-registry not installed")
    user = ensure_user(TEST_USER) if scenario.rootless else None
    if user is not None:
        proc = run(["runuser", "-u", user.name, "--", str(hook_bin), "--help"], check=False)
        assert proc.returncode == 0, f"{user.name} cannot run the hook {hook_bin}:\n{proc.stderr}"
    with loop_podman(loop_images, scenario.key, hook_bin, user, scenario.fuse) as loop:
        podman, layout, log = loop
        with registry_for(scenario, tmp_path) as reg:
            views = loop_three_times(podman, layout, log, scenario, tmp_path, reg)
            if reg is not None:
                check_another_machine(reg, loop_images, views[-1], tmp_path)
        history = json.loads(run(["skopeo", "inspect", "--config", f"oci:{layout}:data"]).stdout)
        ours = history["history"][-RUNS:]
        created_by = f"archive_overlay {project_version()}"
        assert [h["created_by"] for h in ours] == [created_by] * RUNS, history
        assert all(re.fullmatch(r"container [0-9a-f]{64} archive data", h["comment"])
                   for h in ours), ours  # fmt: skip


def loop_three_times(podman: Podman, layout: Path, log: Path, scenario: LoopScenario,
                     tmp_path: Path, reg: Registry | None) -> list[Tree]:  # fmt: skip
    views: list[Tree] = []
    for n in range(1, RUNS + 1):
        pinned = user_tool(podman, "skopeo", "inspect", "--format", "{{.Digest}}",
                           f"oci:{layout}:data").stdout.strip()  # fmt: skip
        image = f"localhost/data:in{n}"
        podman.load(f"oci:{layout}:data", image)
        zstd = n == 2  # the second revision's layer is zstd
        annotations = archive_annotations(
            "data", mount_point="/data", archive_to=str(layout), image_tag="data",
            image_base=pinned, method="oci-image+zstd" if zstd else "oci-image",
        )  # fmt: skip
        proc = podman(*podman_run_args(annotations, image, True, LOOP, "/data", str(n)),
                      check=False)  # fmt: skip
        diag = (f"\n[{scenario.name} run {n}] podman exit {proc.returncode}, stderr:\n"
                f"{proc.stderr}--- hook log:\n{read_log(log)}")  # fmt: skip
        assert proc.returncode == 0, diag
        before_text, _, after_text = proc.stdout.partition("#####\n")
        before, after = parse_listing(before_text), parse_listing(after_text)
        if views:  # the container mounted exactly what the last one left
            assert_same_tree(views[-1], before, f"run {n}'s /data before its changes", diag)
        assert_run_changes(after, n, diag)
        views.append(after)
        index = check_layout(layout)
        digest = written_manifest(HookRun(0, read_log(log).splitlines()[-1]))
        assert tagged(index, "data") == [digest], diag
        manifest = read_json_blob(layout, digest)
        assert manifest["annotations"]["org.opencontainers.image.base.digest"] == pinned, diag
        assert len(manifest["layers"]) == n + 1, diag
        work = tmp_path / f"unpack{n}"
        work.mkdir()
        has_zstd = n >= 2  # from revision 2 on, the image holds a zstd layer
        assert_same_tree(after, unpacked_view(layout, has_zstd, work), f"umoci, rev {n}", diag)
        if reg is not None:
            reg.push(layout, n, manifest, diag)
    last = podman(*podman_run_args({}, podman_loaded(podman, layout), False, LISTING, "/data"))
    assert_same_tree(views[-1], parse_listing(last.stdout), "a container of revision 3")
    return views


def podman_loaded(podman: Podman, layout: Path) -> str:
    podman.load(f"oci:{layout}:data", "localhost/data:final")
    return "localhost/data:final"


# --- a real registry ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REGISTRY_CONFIG = """version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
http:
  addr: 127.0.0.1:{port}
"""
UPLOAD_RE = re.compile(r"PUT /v2/data/blobs/uploads/\S*digest=sha256%3A([0-9a-f]{64})")


@dataclass
class Registry:
    """Debian's docker-registry (CNCF distribution) on 127.0.0.1, its storage and log in tmp."""

    port: int
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def has_blob(self, digest: str) -> bool:
        request = urllib.request.Request(f"http://{self.host}/v2/data/blobs/{digest}",
                                         method="HEAD")  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status == 200
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return False
            raise

    def uploads(self) -> list[str]:
        return ["sha256:" + d for d in UPLOAD_RE.findall(self.log.read_text(errors="replace"))]

    def push(self, layout: Path, n: int, manifest: dict, diag: str) -> None:
        """Revision n to data:rev<n>: only its new layer and its config go over the wire."""
        new = {manifest["layers"][-1]["digest"], manifest["config"]["digest"]}
        old = {layer["digest"] for layer in manifest["layers"][:-1]}
        if n > 1:
            assert all(self.has_blob(d) for d in old), diag
            assert not any(self.has_blob(d) for d in new), diag
        before = len(self.uploads())
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:data",
             f"docker://{self.host}/data:rev{n}"])  # fmt: skip
        uploaded = set(self.uploads()[before:])
        assert uploaded == (new if n > 1 else new | old), (uploaded, new, diag)
        assert all(self.has_blob(d) for d in new | old), diag


@contextmanager
def registry_for(scenario: LoopScenario, tmp_path: Path) -> Iterator[Registry | None]:
    if not scenario.registry:
        yield None
        return
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(REGISTRY_CONFIG.format(storage=tmp_path / "registry", port=port))
    log = tmp_path / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        reg = Registry(port, log)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{reg.host}/v2/", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"registry not up:\n{log.read_text()}"
                time.sleep(0.2)
        yield reg
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_another_machine(reg: Registry, images: Path, expected: Tree, tmp_path: Path) -> None:
    """A podman with a storage of its own pulls revision 3 from the registry and mounts it."""
    other = Podman(images / "m2")
    try:
        other.setup()
        other.load(f"oci:{images / 'img'}:bb", BB_IMAGE)
        other("pull", "--quiet", "--tls-verify=false", f"{reg.host}/data:rev3")
        proc = other(*podman_run_args({}, f"{reg.host}/data:rev3", False, LISTING, "/data"))
        assert_same_tree(expected, parse_listing(proc.stdout), "revision 3 from the registry")
    finally:
        other.teardown()


# --- the README's worked example, as written --------------------------------------------------


def test_readme_revision_loop(hook_bin: Path) -> None:
    """The README's loop block, run by bash as written, with rootful podman set up as the
    README says (the hook in a hooks dir, --allow-dir /srv/revisions), in a private mount
    namespace whose /srv is a fresh tmpfs."""
    require_tools("podman", "runc", "jq", "unshare")
    proc, diag = run_readme_with_podman(hook_bin, "revision-loop", "/srv/revisions", {},
                                        "mount -t tmpfs tmpfs /srv")  # fmt: skip
    assert proc.returncode == 0, diag
    lines = proc.stdout.splitlines()
    assert lines[-4:] == ["hello", "run 1", "run 2", "run 3"], diag
    comments = [
        line for line in lines if re.fullmatch(r"container [0-9a-f]{64} archive data", line)
    ]
    assert len(comments) == 3 and len(lines) == 7, diag
