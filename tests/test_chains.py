"""Revision chains that last: retention (image-keep), the collector and its lock.

The hook commits real overlays' upperdirs; what it leaves is checked with tools we
did not write (umoci gc, skopeo inspect) and by reading every blob a descriptor names.
The collector's lock is proven with commits held stopped (SIGSTOP) between their
blobs and their index.json, 8 committers with retention at once, and SIGKILL at
every step of a collection.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Overlay, archive_annotations, requires_root, state_json, write_bundle
from engines import TEST_USER, Podman, build_oci_image, ensure_user, remove_tree, scratch_dir
from engines import run as run_tool
from test_oci_image import (
    blob,
    check_layout,
    image_args,
    image_state,
    loop_podman,
    read_json_blob,
    tagged,
    unpacked_view,
    written_manifest,
)
from test_oci_layer import (
    LISTING,
    Tree,
    assert_same_tree,
    build_tools_rootfs,
    parse_listing,
    podman_run_args,
    read_log,
    require_tools,
)
from test_safety import HookRun, finish, hook, mounted, small_tree, start_hook
from trees import Tree as StrictTree
from trees import dir_mtimes, seen_through
from trees import snapshot as tree_snapshot

pytestmark = requires_root

BASE_DIGEST = "org.opencontainers.image.base.digest"
MERGED = "com.launchplatform.oci-hooks.archive-overlay.merged"


def commit(hook_bin: Path, tmp_path: Path, ovl, layout: Path, tag: str = "data",
           container: str = "c", **more: str):  # fmt: skip
    state = image_state(tmp_path / f"state-{container}", ovl,
                        {"data": image_args(layout, tag, **more)}, container=container)  # fmt: skip
    run = hook(hook_bin, state)
    assert run.returncode == 0, run.log
    return written_manifest(run), run


def blob_names(layout: Path) -> set[str]:
    return {p.name for p in (layout / "blobs" / "sha256").iterdir()}


def reachable(layout: Path) -> set[str]:
    """Every blob index.json reaches, read as image-spec says (the test's own mark)."""
    index = json.loads((layout / "index.json").read_text())
    names = set()
    for descriptor in index["manifests"]:
        manifest = read_json_blob(layout, descriptor["digest"])
        for d in [descriptor, manifest["config"], *manifest["layers"]]:
            names.add(d["digest"].removeprefix("sha256:"))
    return names


def chain_of(layout: Path, digest: str) -> list[str]:
    chain = []
    while digest and blob(layout, digest).exists():
        chain.append(digest)
        digest = read_json_blob(layout, digest).get("annotations", {}).get(BASE_DIGEST)
    return chain


# --- retention ------------------------------------------------------------------------------


def test_image_keep_keeps_the_newest_of_the_chain_and_every_tagged_revision(
    hook_bin, make_overlay, tmp_path
):
    """Two tags in one layout: image-keep=2 on `data` drops data's older revisions from
    index.json and their blobs from the layout, never `other`'s nor a tagged one; what
    is left is whole, and umoci gc finds nothing more to remove."""
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    other = [commit(hook_bin, tmp_path, ovl, layout, "other", f"o{i}")[0] for i in range(2)]
    pinned, _ = commit(hook_bin, tmp_path, ovl, layout, "data", "d0")
    commit(hook_bin, tmp_path, ovl, layout, "pinned", "p0", image_base=pinned)  # tags d0's child
    # `keep` names d0 itself: a revision with a ref name is never removed
    index = json.loads((layout / "index.json").read_text())
    for d in index["manifests"]:
        if d["digest"] == pinned:
            d["annotations"] = {"org.opencontainers.image.ref.name": "keep"}
    (layout / "index.json").write_text(json.dumps(index))
    data = [pinned]
    for i in range(1, 6):
        digest, run = commit(hook_bin, tmp_path, ovl, layout, "data", f"d{i}", image_keep="2")
        data.append(digest)
        assert "layout collected" in run.log, run.log
        index = check_layout(layout)
        listed = [d["digest"] for d in index["manifests"]]
        # the two newest of data's chain, d0 (ref name `keep`), other's and pinned's
        assert set(data[-2:]) <= set(listed) and pinned in listed
        assert not set(data[1:-2]) & set(listed), (i, listed)
        assert set(other) <= set(listed) and tagged(index, "other") == [other[-1]]
        assert blob_names(layout) == reachable(layout)
        assert tagged(index, "data") == [digest]
    before = blob_names(layout)
    run_tool(["umoci", "gc", "--layout", str(layout)])
    assert blob_names(layout) == before  # nothing unreachable was left
    for tag in ("data", "other", "keep", "pinned"):
        run_tool(["skopeo", "inspect", f"oci:{layout}:{tag}"])
    # a revision retention removed: naming it as image-base fails, the layout unchanged
    snapshot = {p: p.read_bytes() for p in layout.rglob("*") if p.is_file()}
    state = image_state(tmp_path / "gone", ovl,
                        {"data": image_args(layout, image_base=data[2])}, container="late")  # fmt: skip
    run = hook(hook_bin, state)
    assert run.returncode == 1, run.log
    assert data[2] in run.error_for("data") and "no such blob" in run.error_for("data")
    assert {p: p.read_bytes() for p in layout.rglob("*") if p.is_file()} == snapshot


def test_without_image_keep_nothing_is_removed(hook_bin, make_overlay, tmp_path):
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    digests = [commit(hook_bin, tmp_path, ovl, layout, container=f"c{i}")[0] for i in range(4)]
    index = check_layout(layout)
    assert [d["digest"] for d in index["manifests"]] == digests
    (layout / "blobs" / "sha256" / ("0" * 64)).write_bytes(b"not referenced")
    _, run = commit(hook_bin, tmp_path, ovl, layout, container="c4")
    assert "layout collected" not in run.log and ("0" * 64) in blob_names(layout)


# --- the collector and the commits in flight -------------------------------------------------

HOLD_LOCK = """import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


def waiting_in_lock(pid: int, timeout: float = 30) -> None:
    """Until the process sleeps in a POSIX lock wait (the kernel's wchan says so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        if "lock" in wchan or "setlk" in wchan:  # fcntl_setlk, locks_lock_inode_wait
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never waited in a lock (wchan {wchan!r})")


def test_a_collection_never_takes_a_running_commits_blobs(hook_bin, make_overlay, tmp_path):
    """Commit A writes its blobs, then waits for index.lock (held here) and is stopped
    there (SIGSTOP). Commit B, with image-keep=1, commits and would collect: A's blobs
    are reached by nothing yet, but A holds blobs/sha256 locked, so B leaves them. A resumed:
    its revision is whole. umoci gc, which takes no lock, would have removed them."""
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    commit(hook_bin, tmp_path, ovl, layout, container="first")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(layout / "index.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
    with mounted(ovl) as merged:
        (merged / "only-in-a").write_bytes(os.urandom(1 << 16))
    a = start_hook(hook_bin, image_state(tmp_path / "a", ovl, {"data": image_args(layout)},
                                         container="a"))  # fmt: skip
    try:
        waiting_in_lock(a.pid)
        os.kill(a.pid, signal.SIGSTOP)
    finally:
        holder.communicate(b"release\n", timeout=10)
    a_blobs = blob_names(layout) - reachable(layout)
    assert len(a_blobs) == 3, a_blobs  # A's layer, config and manifest, not yet indexed
    try:
        _, b = commit(hook_bin, tmp_path, ovl, layout, container="b", image_keep="1")
        assert "collection left to the next commit" in b.log, b.log
        assert a_blobs <= blob_names(layout)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    run_a = finish(a)
    assert run_a.returncode == 0, run_a.log
    index = check_layout(layout)  # every blob of every descriptor, A's included
    assert tagged(index, "data") == [written_manifest(run_a)]
    _, c = commit(hook_bin, tmp_path, ovl, layout, container="c", image_keep="1")
    assert "layout collected" in c.log
    assert blob_names(layout) == reachable(layout)
    check_layout(layout)


def test_8_committers_with_retention_never_leave_a_descriptor_without_its_blobs(
    hook_bin, make_overlay, tmp_path
):
    """8 processes each commit 4 revisions with image-keep=2 at once (started together
    behind a barrier: the index lock held until all wait), while a reader takes the index
    lock again and again and checks every blob every descriptor reaches."""
    ovls = []
    for i in range(8):
        ovl = make_overlay(f"o{i}")
        with mounted(ovl) as merged:
            (merged / f"file{i}").write_bytes(os.urandom(1 << 15))
        ovls.append(ovl)
    layout = tmp_path / "layout"
    commit(hook_bin, tmp_path, ovls[0], layout, container="seed")
    problems: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        fd = os.open(layout / "index.lock", os.O_RDWR)
        try:
            while not stop.is_set():
                fcntl.lockf(fd, fcntl.LOCK_EX)
                try:
                    index = json.loads((layout / "index.json").read_text())
                    for d in index["manifests"]:
                        manifest = read_json_blob(layout, d["digest"])
                        for ref in [manifest["config"], *manifest["layers"]]:
                            if not blob(layout, ref["digest"]).exists():
                                problems.append(f"{d['digest']} names missing {ref['digest']}")
                except (OSError, ValueError) as exc:
                    problems.append(repr(exc))
                finally:
                    fcntl.lockf(fd, fcntl.LOCK_UN)
                time.sleep(0.005)
        finally:
            os.close(fd)

    def committer(i: int) -> list[int]:
        codes = []
        for n in range(4):
            tag = "shared" if i % 2 else f"own-{i}"
            state = image_state(tmp_path / f"s{i}-{n}", ovls[i],
                                {"data": image_args(layout, tag, image_keep="2")},
                                container=f"w{i}-{n}")  # fmt: skip
            proc = start_hook(hook_bin, state)
            codes.append(finish(proc).returncode)
        return codes

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(layout / "index.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
    results: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, committer(i)))
               for i in range(8)]  # fmt: skip
    for t in threads:
        t.start()
    time.sleep(3)  # the first commit of each waits behind the held lock: a barrier
    holder.communicate(b"release\n", timeout=10)
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.join(timeout=600)
    stop.set()
    watcher.join()
    assert all(results[i] == [0] * 4 for i in range(8)), results
    assert problems == [], problems[:5]
    index = check_layout(layout)
    assert len(tagged(index, "shared")) == 1
    # a last commit collects what the contended ones had to leave
    _, last = commit(hook_bin, tmp_path, ovls[0], layout, "shared", "last", image_keep="2")
    assert "layout collected" in last.log
    assert blob_names(layout) == reachable(layout)
    run_tool(["umoci", "gc", "--layout", str(layout)])
    assert blob_names(layout) == reachable(layout)


@pytest.mark.parametrize("when", [1, 2, 3])
def test_sigkill_during_a_collection_leaves_a_whole_layout(hook_bin, make_overlay, tmp_path,
                                                           when):  # fmt: skip
    """SIGKILL at the 1st, 2nd, 3rd blob removal of a collection: index.json was
    rewritten first, so every descriptor still has its blobs; the next commit finishes
    the collection."""
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    for i in range(4):
        with mounted(ovl) as merged:
            (merged / f"run{i}").write_bytes(os.urandom(1 << 12))
        commit(hook_bin, tmp_path, ovl, layout, container=f"c{i}")
    with mounted(ovl) as merged:
        (merged / "killed").write_bytes(os.urandom(1 << 12))  # a new layer: no unlink before
    state = image_state(tmp_path / "killed", ovl, {"data": image_args(layout, image_keep="1")},
                        container="killed")  # fmt: skip
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=unlinkat",
         "-e", f"inject=unlinkat:signal=KILL:when={when}", str(hook_bin)],
        input=state.encode(), capture_output=True, env={}, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stderr.decode()
    index = check_layout(layout)
    assert len(index["manifests"]) == 1  # the dropped ones left index.json first
    _, run = commit(hook_bin, tmp_path, ovl, layout, container="next", image_keep="1")
    assert "layout collected" in run.log
    assert blob_names(layout) == reachable(layout)
    run_tool(["umoci", "gc", "--layout", str(layout)])
    run_tool(["skopeo", "inspect", f"oci:{layout}:data"])


# --- squashing: image-max-layers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_images() -> Iterator[Path]:
    """A world-reachable dir with an OCI layout holding `bb` (busybox, xattr tools) and
    `squash` (the data image of the squash loop)."""
    require_tools("podman", "runc", "umoci", "skopeo")
    base = scratch_dir("ao-ch-")
    base.chmod(0o755)
    try:
        build_oci_image(base / "img", "bb", build_tools_rootfs(base / "rootfs"))
        build_oci_image(base / "img", "squash", write_squash_data(base / "data"))
        yield base
    finally:
        remove_tree(base)


# `sh -c SQUASH_LOOP sh /data N`: the listing before, run N's changes, the listing after.
# Over the runs: files added, rewritten and deleted in later runs (deleted ones that the
# base has, brought back and deleted again, and ones it never had), a directory deleted and
# recreated, a file replaced by a directory and back, hardlinks whose data-holding name is
# deleted or rewritten later (each link lives six runs: the tree stays small, and listing
# it in each of 300 containers stays quick), symlinks, FIFOs, owners, modes and xattrs.
SQUASH_CHANGES = """(
set -e
cd "$1"; n=$2; p=$((n - 1)); q=$((n - 2))
echo "added in run $n" > "added-$n.txt"
ln "added-$n.txt" "link-$n"
rm -f "link-$((n - 6))"
echo "changed in run $n" >> changing.txt
d="doomed-$((n % 10)).txt"
if [ -e "$d" ]; then rm "$d"; else echo "back in run $n" > "$d"; fi
[ "$n" -gt 1 ] && echo "rewritten in run $n" > "added-$p.txt"
[ "$n" -gt 2 ] && rm "added-$q.txt" && rm -f "gone-$q"
echo "gone later" > "gone-$n"
rm -r redo
mkdir -p redo/sub
echo "redone in run $n" > "redo/sub/r-$n.txt"
if [ -d toggle ]; then rm -r toggle; echo "a file again in run $n" > toggle
else rm -f toggle; mkdir toggle; echo "in a dir in run $n" > toggle/inner; fi
ln -sf "added-$n.txt" newest
rm -f fifo; mkfifo fifo
chmod 0$((600 + n % 2 * 40)) keep/k.txt
chown "$n:$((n + 1))" changing.txt
setfattr -n user.run -v "run $n" keep
) || exit 3
"""
SQUASH_LOOP = LISTING + "echo '#####'\n" + SQUASH_CHANGES + LISTING
SQUASH_RUNS = 300
SQUASH_MAX_LAYERS = 16  # 82 merges over 300 runs, most of them of merged layers


def write_squash_data(root: Path) -> Path:
    for d in ("keep", "redo/sub"):
        (root / d).mkdir(parents=True, exist_ok=True)
    files = {"keep/k.txt": "kept\n", "changing.txt": "first line\n", "redo/old.txt": "old\n",
             "redo/sub/y.txt": "y\n", "toggle": "a file in the base\n"}  # fmt: skip
    files |= {f"doomed-{n}.txt": f"doomed {n}\n" for n in range(10)}
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def check_revision(layout: Path, digest: str, max_layers: int, runs: int) -> dict:
    """Within max_layers; as many non-empty history entries as layers; every run listed."""
    manifest = read_json_blob(layout, digest)
    config = read_json_blob(layout, manifest["config"]["digest"])
    layers, history = manifest["layers"], config["history"]
    assert len(layers) <= max_layers, len(layers)
    assert len(config["rootfs"]["diff_ids"]) == len(layers)
    assert len([h for h in history if not h.get("empty_layer")]) == len(layers), history
    ran = [h for h in history if h.get("created_by", "").count(" ") == 1
           and h["created_by"].startswith("archive_overlay ")]  # fmt: skip
    assert len(ran) == runs, history
    return manifest


def podman_image_view(podman: Podman, image: str) -> Tree:
    """`podman image mount` of an image, listed by the host's busybox (rootless: in the
    user's namespace, where the mount is)."""
    script = 'p=$(podman image mount "$1") && busybox sh -c "$2" sh "$p"; s=$?; ' \
             'podman image unmount "$1" >/dev/null; exit $s'  # fmt: skip
    cmd = ["busybox", "sh", "-c", script, "sh", image, LISTING]
    if podman.user is not None:
        cmd = ["podman", "unshare", *cmd]
    return parse_listing(run_tool(podman.as_user(cmd)).stdout)


def podman_chain(rootless: bool, loop_images: Path, hook_bin: Path, tmp_path: Path) -> None:
    """SQUASH_RUNS podman runs, each mounting the last revision (an image mount) and
    changing it; the hook commits each with image-max-layers=SQUASH_MAX_LAYERS."""
    user = ensure_user(TEST_USER) if rootless else None
    key = "sl" if rootless else "sf"
    with loop_podman(loop_images, key, hook_bin, user, data="squash") as (podman, layout, log):
        base_layer = read_json_blob(layout, tagged(check_layout(layout), "data")[0])["layers"][0]
        last: Tree | None = None
        merges = kept = 0
        layers: list[dict] = []
        merged_last = False
        for n in range(1, SQUASH_RUNS + 2):
            pinned = tagged(json.loads((layout / "index.json").read_text()), "data")[0]
            # by the id podman pull prints: no tag to move (one podman process less a run)
            image = podman("pull", "--quiet", f"oci:{layout}:data").stdout.split()[-1]
            where = f"{'rootless' if rootless else 'rootful'} run {n}"
            if merged_last:  # podman mounts the merged revision as the container saw it
                assert last is not None
                assert_same_tree(last, podman_image_view(podman, image),
                                 f"podman image mount, {where}")  # fmt: skip
            if n > SQUASH_RUNS:
                break
            annotations = archive_annotations(
                "data", mount_point="/data", archive_to=str(layout), image_tag="data",
                image_base=pinned, method="oci-image", image_max_layers=str(SQUASH_MAX_LAYERS),
            )  # fmt: skip
            mark = len(log.read_text()) if log.exists() else 0
            proc = podman(*podman_run_args(annotations, image, True, SQUASH_LOOP,
                                           "/data", str(n)), check=False)  # fmt: skip
            diag = (f"\n[{where}] podman exit {proc.returncode}, stderr:\n{proc.stderr}"
                    f"--- hook log (end):\n{read_log(log)[-4000:]}")  # fmt: skip
            assert proc.returncode == 0, diag
            before_text, _, after_text = proc.stdout.partition("#####\n")
            before, after = parse_listing(before_text), parse_listing(after_text)
            if last is not None:
                assert_same_tree(last, before, f"{where}'s /data before its changes", diag)
            last = after
            run_log = HookRun(0, read_log(log)[mark:])
            merged_last = 'event="layers merged"' in run_log.log
            merges += merged_last
            manifest = check_revision(layout, written_manifest(run_log), SQUASH_MAX_LAYERS, n)
            assert manifest["layers"][0] == base_layer, diag  # the base's own, byte for byte
            kept += merged_last and manifest["layers"][1] == layers[1]  # an older merge kept
            layers = manifest["layers"]
            if merged_last:
                work = tmp_path / ("unpack-rootless" if rootless else "unpack-rootful")
                work.mkdir(exist_ok=True)
                assert_same_tree(after, unpacked_view(layout, False, work), f"umoci, {where}",
                                 diag)  # fmt: skip
        assert merges >= SQUASH_RUNS // 5 and kept >= merges // 2, (merges, kept)
        history = json.loads(run_tool(["skopeo", "inspect", "--config",
                                       f"oci:{layout}:data"]).stdout)["history"]  # fmt: skip
        comments = [h.get("comment", "") for h in history if not h.get("empty_layer")]
        assert any("runs merged into one layer" in c for c in comments), history


def test_300_podman_runs_each_see_what_the_last_left(loop_images: Path, hook_bin: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
    """300 runs of podman, rootful and rootless (native overlay) side by side, with
    image-max-layers=16: each container mounts the last revision and sees exactly what the
    last one left (entry by entry, checksums); after every merge, umoci's unpacking and
    `podman image mount` equal what the container saw; the data image's layer stays
    first, and the history lists every run."""
    require_tools("runuser", "newuidmap", "newgidmap")
    with ThreadPoolExecutor(2) as pool:
        chains = [pool.submit(podman_chain, rootless, loop_images, hook_bin, tmp_path)
                  for rootless in (False, True)]  # fmt: skip
        for chain in chains:
            chain.result()


def snapshot(root: Path) -> StrictTree:
    """tests/trees.py's strict description of the tree (owners, modes, content, nanosecond
    mtimes, every xattr, devices, targets, hardlink groups), but for directories' mtimes:
    an overlay's merged view shows the times of its upperdir's directories, which the
    kernel sets as a run makes entries in them, not what the run left in the layer."""
    return seen_through(tree_snapshot(root), (dir_mtimes,))


def change_tree(merged: Path, n: int) -> None:
    """Run n's changes, made through the overlay as a container would make them."""
    (merged / f"added-{n}").write_text(f"added in run {n}\n")
    os.link(merged / f"added-{n}", merged / f"link-{n}")
    with open(merged / "changing", "a") as f:
        f.write(f"changed in run {n}\n")
    if n > 1:
        (merged / f"added-{n - 1}").write_text(f"rewritten in run {n}\n")  # link-(n-1) keeps
    if n > 2:
        (merged / f"added-{n - 2}").unlink()  # link-(n-2) keeps the data
        shutil.rmtree(merged / f"dir-{n - 2}")
    (merged / f"dir-{n}" / "sub").mkdir(parents=True)
    (merged / f"dir-{n}" / "sub" / "f").write_bytes(os.urandom(64))
    doomed = merged / f"base-{n % 7}"
    if doomed.exists():
        doomed.unlink()
    else:
        doomed.write_text(f"back in run {n}\n")
    shutil.rmtree(merged / "redo")
    (merged / "redo" / "sub").mkdir(parents=True)
    (merged / "redo" / "sub" / f"r-{n}").write_text("redone\n")
    toggle = merged / "toggle"
    if toggle.is_dir():
        shutil.rmtree(toggle)
        toggle.write_text(f"a file again in run {n}\n")
    else:
        toggle.unlink()
        toggle.mkdir()
        (toggle / "inner").write_text(f"in a dir in run {n}\n")
    newest = merged / "newest"
    newest.unlink(missing_ok=True)
    newest.symlink_to(f"added-{n}")
    fifo = merged / "fifo"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    dev = merged / "dev-null"
    dev.unlink(missing_ok=True)
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3 + n % 2))
    keep = merged / "keep" / "k"
    os.chmod(keep, 0o600 + (n % 2) * 0o40)
    os.chown(merged / "changing", n, n + 1)
    os.setxattr(merged / "keep", "user.run", f"run {n}".encode())
    os.utime(keep, ns=(n * 10**9 + 123, n * 10**9 + 456789))


def unpacked(layout: Path, tag: str, work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    run_tool(["umoci", "unpack", "--image", f"{layout}:{tag}", str(work)])
    return work / "rootfs"


def commit_over(hook_bin: Path, tmp_path: Path, layout: Path, rootfs: Path, n: int,
                container: str, **args: str) -> tuple[HookRun, StrictTree]:  # fmt: skip
    """Container `container` (its upperdir kept between its runs) makes run n's changes
    in a real overlay on rootfs, then the hook commits them; what the run left."""
    ovl = Overlay(tmp_path / f"ovl-{container}")
    for d in (ovl.upper, ovl.work, ovl.merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={rootfs},upperdir={ovl.upper},workdir={ovl.work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(ovl.merged)], check=True)
    try:
        change_tree(ovl.merged, n)
        expected = snapshot(ovl.merged)
    finally:
        subprocess.run(["umount", str(ovl.merged)], check=True)
    mount = {
        "destination": "/data",
        "type": "overlay",
        "source": "overlay",
        "options": [f"lowerdir={rootfs}", f"upperdir={ovl.upper}", f"workdir={ovl.work}"],
    }
    annotations = archive_annotations("data", mount_point="/data", archive_to=str(layout),
                                      method="oci-image", **args)  # fmt: skip
    state = json.loads(state_json(write_bundle(tmp_path / f"bundle-{container}", [mount],
                                               annotations)))  # fmt: skip
    state["id"] = container
    return hook(hook_bin, json.dumps(state)), expected


HAND_RUNS = 120


def test_120_runs_each_mounting_the_last_revision(hook_bin, tmp_path):
    """120 runs, image-max-layers=7 (112 merges; the 300-run chains are podman's): each
    run mounts the last revision (as umoci unpacks it) under a real overlay, changes it,
    and the hook commits it; the next unpacking equals what the run left, entry by entry;
    every revision stays within 7 layers with its base image's layer first, and its
    history lists every run.  Past the first merges, merged layers fill half the room, and
    merges take layers between merged ones (what lies below them, merged layers included,
    decides the whiteouts kept)."""
    seed = tmp_path / "seed"
    (seed / "keep").mkdir(parents=True)
    (seed / "keep" / "k").write_text("kept\n")
    (seed / "changing").write_text("first line\n")
    (seed / "redo").mkdir()
    (seed / "redo" / "old").write_text("old\n")
    (seed / "toggle").write_text("a file in the base\n")
    for i in range(7):
        (seed / f"base-{i}").write_text(f"base {i}\n")
    layout = tmp_path / "layout"
    build_oci_image(layout, "data", seed)
    base_layer = read_json_blob(layout, tagged(check_layout(layout), "data")[0])["layers"][0]
    expected: StrictTree | None = None
    for n in range(1, HAND_RUNS + 1):
        rootfs = unpacked(layout, "data", tmp_path / "bundle")
        if expected is not None:
            assert snapshot(rootfs) == expected, f"revision {n - 1} is not what run {n - 1} left"
        pinned = tagged(json.loads((layout / "index.json").read_text()), "data")[0]
        run, expected = commit_over(hook_bin, tmp_path, layout, rootfs, n, f"run{n}",
                                    image_tag="data", image_base=pinned,
                                    image_max_layers="7")  # fmt: skip
        assert run.returncode == 0, run.log
        manifest = check_revision(layout, written_manifest(run), 7, n)
        assert manifest["layers"][0] == base_layer
        shutil.rmtree(tmp_path / f"ovl-run{n}")
    assert snapshot(unpacked(layout, "data", tmp_path / "bundle")) == expected
    history = json.loads(run_tool(["skopeo", "inspect", "--config",
                                   f"oci:{layout}:data"]).stdout)["history"]  # fmt: skip
    assert sum(1 for h in history if h.get("comment", "").startswith("container ")) == HAND_RUNS


def merge_line(run: HookRun) -> str:
    lines = [line for line in run.log.splitlines() if 'event="layers merged"' in line]
    assert len(lines) == 1, run.log
    return lines[0]


def test_a_merge_of_the_same_base_is_recognised_and_not_merged_again(hook_bin, tmp_path):
    """Two containers start from the revision before a merge (pinned by image-base), and
    one of them stops twice (its second commit goes on the base of its first): the first
    commit merges, records which layers of which base it merged, and the others take that
    merged layer as it is; umoci unpacks each revision as its container left it."""
    seed = tmp_path / "seed"
    (seed / "keep").mkdir(parents=True)
    (seed / "keep" / "k").write_text("kept\n")
    (seed / "changing").write_text("first line\n")
    (seed / "redo").mkdir()
    (seed / "toggle").write_text("a file in the base\n")
    layout = tmp_path / "layout"
    build_oci_image(layout, "data", seed)
    for n in range(1, 4):
        rootfs = unpacked(layout, "data", tmp_path / "bundle")
        run, _ = commit_over(hook_bin, tmp_path, layout, rootfs, n, f"run{n}", image_tag="data",
                             image_max_layers="4")  # fmt: skip
        assert run.returncode == 0 and "layers merged" not in run.log, run.log
    tip = tagged(json.loads((layout / "index.json").read_text()), "data")[0]
    assert len(read_json_blob(layout, tip)["layers"]) == 4
    rootfs = unpacked(layout, "data", tmp_path / "tip")
    merged_layer = None
    for n, container, tag, reused in [(4, "a", "a", False), (5, "b", "b", True),
                                      (6, "a", "a", True)]:  # fmt: skip
        pin = {"image_base": tip} if container == "b" or n == 4 else {}
        run, expected = commit_over(hook_bin, tmp_path, layout, rootfs, n, container,
                                    image_tag=tag, image_max_layers="4", **pin)  # fmt: skip
        assert run.returncode == 0, run.log
        assert f"reused={str(reused).lower()}" in merge_line(run), run.log
        manifest = read_json_blob(layout, written_manifest(run))
        assert manifest["annotations"][BASE_DIGEST] == tip
        assert manifest["annotations"][MERGED] == f"{tip} 1 2"
        assert len(manifest["layers"]) == 4
        merged_layer = merged_layer or manifest["layers"][1]
        assert manifest["layers"][1] == merged_layer, (n, manifest["layers"])
        assert snapshot(unpacked(layout, tag, tmp_path / f"check{n}")) == expected, n


def test_the_default_keeps_a_long_chain_within_every_engines_limit(hook_bin, loop_images, tmp_path):
    """140 commits with the default image-max-layers, more than podman 4.3 (128), Docker
    (125) or any engine mounts: the revision has at most 100 layers, podman runs it as a
    container's own image and mounts it as an image, and buildah commits on top of it."""
    layout = tmp_path / "layout"
    run_tool(["skopeo", "copy", "--quiet", f"oci:{loop_images / 'img'}:bb", f"oci:{layout}:app"])
    for n in range(1, 141):
        upper = tmp_path / "upper"
        shutil.rmtree(upper, ignore_errors=True)
        upper.mkdir()
        (upper / "count").write_text(f"{n}\n")
        mount = {"destination": "/data", "type": "overlay", "source": "overlay",
                 "options": ["lowerdir=/nonexistent", f"upperdir={upper}"]}  # fmt: skip
        annotations = archive_annotations("root", mount_point="/data", archive_to=str(layout),
                                          method="oci-image", image_tag="app")  # fmt: skip
        state = json.loads(state_json(write_bundle(tmp_path / "bundle", [mount], annotations)))
        state["id"] = f"run{n}"  # another container each time: each commit stacks on the tag
        run = hook(hook_bin, json.dumps(state))
        assert run.returncode == 0, run.log
        manifest = check_revision(layout, written_manifest(run, "root"), 100, n)
    assert len(manifest["layers"]) <= 100
    podman = Podman(loop_images / "dl")
    try:
        podman.setup()
        podman.load(f"oci:{layout}:app", "localhost/long:latest")
        out = podman("run", "--rm", "--network", "none", "localhost/long:latest", "cat", "/count")
        assert out.stdout == "140\n", out
        mount = "type=image,source=localhost/long:latest,destination=/data"
        out = podman("run", "--rm", "--network", "none", "--mount", mount,
                     "localhost/long:latest", "cat", "/data/count")  # fmt: skip
        assert out.stdout == "140\n", out
        env = podman.env()
        container = run_tool(["buildah", "from", "--pull-never", "localhost/long:latest"],
                             env=env).stdout.strip()  # fmt: skip
        run_tool(["buildah", "commit", container, "localhost/on-top:latest"], env=env)
    finally:
        podman.teardown()


def test_a_base_with_too_many_layers_of_its_own_fails_before_writing(hook_bin, make_overlay,
                                                                      tmp_path):  # fmt: skip
    """image-max-layers 3 on a base of 3 layers (none the hook's): the archive fails naming
    the limit and the base, and the layout is unchanged, file for file."""
    layout = tmp_path / "layout"
    for i in range(3):
        seed = tmp_path / f"seed{i}"
        seed.mkdir()
        (seed / f"layer{i}").write_text(f"{i}\n")
        if i == 0:
            build_oci_image(layout, "data", seed)
        else:
            run_tool(["umoci", "insert", "--image", f"{layout}:data", str(seed), "/"])
    ovl = small_tree(make_overlay())
    snapshot_before = {p: p.read_bytes() for p in layout.rglob("*") if p.is_file()}
    state = image_state(tmp_path, ovl, {"data": image_args(layout, image_max_layers="3")})
    run = hook(hook_bin, state)
    assert run.returncode == 1, run.log
    line = run.error_for("data")
    assert "image-max-layers 3" in line and "base data has 3 layers" in line, line
    assert {p: p.read_bytes() for p in layout.rglob("*") if p.is_file()} == snapshot_before
    state = image_state(tmp_path, ovl, {"data": image_args(layout, image_max_layers="4")})
    assert hook(hook_bin, state).returncode == 0


BAD_COUNTS = [("image_keep", v, "1 or more") for v in ("0", "-1", "two", "1.5")] + [
    ("image_max_layers", v, "2 or more") for v in ("1", "0", "x", "")
]


@pytest.mark.parametrize(("arg", "value", "words"), BAD_COUNTS)
def test_a_bad_count_fails_that_archive(hook_bin, make_overlay, tmp_path, arg, value, words):
    """image-keep or image-max-layers not a count they take: one error line naming the
    annotation, nothing written."""
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    state = image_state(tmp_path, ovl, {"data": image_args(layout, **{arg: value})})
    run = hook(hook_bin, state)
    assert run.returncode == 1, run.log
    line = run.error_for("data")
    name = arg.replace("_", "-")
    assert name in line and words in line and "Traceback" not in run.log, line
    assert not layout.exists()


@pytest.mark.parametrize(("arg", "method", "out"), [
    ("image_keep", "tar", "out.tar"), ("image_max_layers", "oci-layer", "out.tar.gz"),
])  # fmt: skip
def test_a_count_on_another_method_fails_that_archive(hook_bin, make_overlay, tmp_path, arg,
                                                      method, out):  # fmt: skip
    ovl = small_tree(make_overlay())
    archive_to = tmp_path / out
    state = image_state(tmp_path, ovl, {"data": {"archive_to": str(archive_to), "method": method,
                                                 arg: "3"}})  # fmt: skip
    run = hook(hook_bin, state)
    assert run.returncode == 1, run.log
    assert f"{arg.replace('_', '-')} is only for oci-image" in run.error_for("data")
    assert not archive_to.exists()


def rewrite_revision(layout: Path, tag: str, change) -> None:
    """The tagged revision with its config changed by `change`: new blobs, index.json."""
    index = json.loads((layout / "index.json").read_text())
    descriptor = next(d for d in index["manifests"] if d.get("annotations", {}).get(
        "org.opencontainers.image.ref.name") == tag)  # fmt: skip
    manifest = read_json_blob(layout, descriptor["digest"])
    config = read_json_blob(layout, manifest["config"]["digest"])
    change(config)

    def put(value: dict) -> dict:
        data = json.dumps(value).encode()
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    manifest["config"].update(put(config))
    descriptor.update(put(manifest))
    (layout / "index.json").write_text(json.dumps(index))


def test_history_of_tens_of_thousands_of_runs_is_compacted(hook_bin, make_overlay, tmp_path):
    """A revision whose history lists 20,000 merged runs (a config of 3 MiB): the
    next commit compacts the oldest entries into ones that count them, so the config stays
    under 1 MiB, skopeo and umoci read it, and the runs are all still counted."""
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    commit(hook_bin, tmp_path, ovl, layout, container="first")

    def many_runs(config: dict) -> None:
        runs = [{"created": f"2026-01-01T00:00:{i % 60:02}Z", "created_by": "archive_overlay 4.0.0",
                 "comment": f"container {i:064x} archive data", "empty_layer": True}
                for i in range(20_000)]  # fmt: skip
        config["history"] = runs + config["history"]

    rewrite_revision(layout, "data", many_runs)
    _, run = commit(hook_bin, tmp_path, ovl, layout, container="next")
    manifest = read_json_blob(layout, written_manifest(run))
    config_blob = blob(layout, manifest["config"]["digest"])
    assert config_blob.stat().st_size < 1 << 20
    history = json.loads(config_blob.read_text())["history"]
    counted = 0
    for entry in history:
        if entry.get("created_by", "").endswith("(compacted history)"):
            counted += int(entry["comment"].split(" ", 1)[0])
        elif entry.get("comment", "").startswith("container "):
            counted += 1
    assert counted == 20_002, counted
    assert len([h for h in history if not h.get("empty_layer")]) == len(manifest["layers"])
    run_tool(["skopeo", "inspect", "--config", f"oci:{layout}:data"])
    run_tool(["umoci", "unpack", "--image", f"{layout}:data", str(tmp_path / "unpacked")])
