"""mount-point=/ : the container's own root filesystem, and the exclude arg.

A container with no image mount changes its root filesystem (adds a file,
changes and deletes files of the image, deletes and recreates a directory,
writes under an excluded directory and into a `-v SRC:/vol:O` overlay
volume), lists its root filesystem and exits. The hook archives `/` (with
podman's own entries excluded) and `/vol`:

  - the `copy` archive equals the rootfs upperdir, the excluded paths aside;
  - the `oci-layer` archive stacked on the image gives exactly the root
    filesystem the container left, entry by entry (umoci unpack, and podman
    pulling the stacked image back), excluded paths left out on both sides;
  - after podman unmounted the rootfs (the container exited, not removed),
    its config.json piped to the hook by hand finds the layer's `diff`, as
    under CRI-O, which runs poststop hooks only after unmounting.

Engines: podman rootful and rootless, native overlay and fuse-overlayfs; runc
with an overlay rootfs mounted here. Quick checks of exclude and of the
errors run on overlays mounted here.

The commit-on-exit loop: the container's own image in an OCI layout, three
runs, each committed by `oci-image` as the revision the next run starts from
(podman rootful and rootless, native overlay and fuse-overlayfs), and the
README's worked example of it, run as written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trees
from conftest import archive_annotations, is_root, state_json, write_bundle
from engines import (
    FUSE_OVERLAYFS,
    TEST_USER,
    Podman,
    User,
    build_oci_image,
    ensure_fuse_device,
    ensure_user,
    podman_version,
    remove_tree,
    require,
    run,
    run_readme_with_podman,
    runc_config,
    scratch_dir,
    unescape_mountinfo,
    wait_for_hook,
)
from test_archive import raw_member_names, read_members
from test_oci_image import (
    RUN_CHANGES,
    RUNS,
    assert_run_changes,
    check_layout,
    read_json_blob,
    tagged,
    user_tool,
    write_loop_data,
    written_manifest,
)
from test_oci_image import blob as layout_blob
from test_oci_layer import (
    HOST_PATH,
    Tree,
    assert_same_tree,
    build_tools_rootfs,
    check_descriptor,
    parse_listing,
    read_log,
    require_tools,
    unpack_stacked,
)
from test_safety import HookRun

# What podman 4.3 puts into every container's rootfs upperdir (measured, see
# test_podman_root_filesystem): bind-mount targets and /etc/mtab.
PODMAN_MADE = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/etc/mtab",
               "/run/.containerenv")  # fmt: skip
# Mount points: not the container's data (runc makes them where the image lacks them).
MOUNT_POINTS = ("/proc", "/sys", "/dev")
SCRATCH = "/opt/scratch"  # the container writes here too: excluded by the test
PODMAN_EXCLUDE = (*PODMAN_MADE, *MOUNT_POINTS, "/vol", SCRATCH)
RUNC_EXCLUDE = (*MOUNT_POINTS, SCRATCH)

# The container's changes to its own root filesystem.
ROOT_CHANGES = """set -e
echo new > /new.txt
echo more >> /etc/changed.txt
rm /etc/del.txt
rm -r /redo
mkdir /redo
echo fresh > /redo/fresh.txt
rm /opt/scratch/old.txt
echo tmp > /opt/scratch/tmp.txt
"""
VOL_CHANGES = """echo vol > /vol/new.txt
rm /vol/old.txt
"""

# `sh -c ROOT_LISTING sh DIR`: test_oci_layer's listing format, on DIR's own
# filesystem only (-xdev: not into /proc, /sys, /dev), without writing anything.
ROOT_LISTING = r"""cd "$1" || exit 1
busybox find . -xdev | busybox sort | while IFS= read -r p; do
  meta=$(busybox stat -c '%f %u %g %s %i %h' "$p")
  if [ -L "$p" ]; then extra=$(busybox readlink "$p")
  elif [ -f "$p" ]; then extra=$(busybox sha256sum "$p" | busybox cut -d' ' -f1)
  else extra=-
  fi
  echo "$p|$meta|$extra"
done
echo '#xattrs'
busybox find . -xdev | busybox sort | while IFS= read -r p; do
  /bin/getfattr -P -h -d -m '^user\.' -e hex "$p" 2>/dev/null  # path: see test_oci_layer
done
true
"""


def write_root_image(rootfs: Path) -> Path:
    """The busybox/getfattr rootfs plus the files ROOT_CHANGES changes."""
    build_tools_rootfs(rootfs)
    for d in ("redo/sub", "opt/scratch"):
        (rootfs / d).mkdir(parents=True)
    files = {"etc/changed.txt": "v1\n", "etc/del.txt": "del\n", "keep.txt": "keep\n",
             "redo/old.txt": "old\n", "redo/sub/y.txt": "y\n",
             "opt/scratch/old.txt": "old\n"}  # fmt: skip
    for name, text in files.items():
        (rootfs / name).write_text(text)
    return rootfs


def rel_of(path: str) -> str:
    return path.lstrip("/")


def is_excluded(rel: str, exclude: tuple[str, ...]) -> bool:
    return any(rel == rel_of(x) or rel.startswith(rel_of(x) + "/") for x in exclude)


def without(tree: Tree, exclude: tuple[str, ...]) -> Tree:
    """The listing with the excluded paths (and what they hold) left out."""
    return Tree(
        {p: i for p, i in tree.items.items() if not is_excluded(p, exclude)},
        {g for g in tree.links if not any(is_excluded(p, exclude) for p in g)},
        {p: x for p, x in tree.xattrs.items() if not is_excluded(p, exclude)},
    )


def list_host_root(root: Path) -> Tree:
    proc = run(["busybox", "sh", "-c", ROOT_LISTING, "sh", str(root)], env={"PATH": HOST_PATH})
    return parse_listing(proc.stdout)


def upperdir_in_log(log: str, archive: str) -> str:
    """The upperdir that the hook's "archive written" record names for an archive."""
    for line in log.splitlines():
        if "archive written" in line and re.search(rf"\barchive={archive}\b", line):
            found = re.search(r"\bupperdir=(\S+)", line)
            if found:
                return found.group(1)
    raise AssertionError(f"no archive written for {archive} in the hook log:\n{log}")


def assert_root_changes_seen(view: Tree, diag: str) -> None:
    """The container's view holds ROOT_CHANGES: else comparing with it proves little."""
    for gone in ("etc/del.txt", "redo/old.txt", "redo/sub", "opt/scratch/old.txt"):
        assert gone not in view.items, f"{gone} still there{diag}"
    for present in ("new.txt", "redo/fresh.txt", "keep.txt", "bin/busybox", "opt/scratch/tmp.txt"):
        assert present in view.items, f"{present} missing{diag}"


def assert_copy_is_upper(copy: Path, upper: Path, exclude: tuple[str, ...], diag: str) -> None:
    want = trees.snapshot(upper).without(lambda rel: is_excluded(rel, exclude))
    trees.assert_same_tree(want, trees.snapshot(copy), "the copy", diag)


# --- podman ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    key: str  # its dir: podman's runroot must stay within 50 characters
    rootless: bool = False
    fuse: bool = False
    commas: bool = False  # exclude given with commas (podman 4.3: the annotation CSV-quoted)
    exclude: bool = True  # the commit-on-exit loop: with the README's exclude list


SCENARIOS = [
    Scenario("rootful-native", "rf", commas=True),
    Scenario("rootful-fuse", "rx"),
    Scenario("rootless-native", "ln", rootless=True),
    Scenario("rootless-fuse", "lx", rootless=True, fuse=True, commas=True),
]

BB_IMAGE = "localhost/rootfs-bb"


@pytest.fixture(scope="module")
def root_image() -> Iterator[Path]:
    """A world-reachable dir with an OCI layout holding the image `bb`, and the vol source."""
    require_tools("podman", "runc")
    base = scratch_dir("ao-rt-")
    base.chmod(0o755)
    try:
        run(["umoci", "init", "--layout", str(base / "oci")])
        run(["umoci", "new", "--image", f"{base / 'oci'}:bb"])
        rootfs = write_root_image(base / "rootfs")
        run(["umoci", "insert", "--image", f"{base / 'oci'}:bb", str(rootfs), "/"])
        run(["chmod", "-R", "a+rX", str(base)])
        yield base
    finally:
        remove_tree(base)


def annotation_flags(key: str, value: str) -> list[str]:
    """podman 4.3 splits an --annotation value at commas unless it is CSV-quoted; podman 5.4
    takes the value as given, and would keep CSV quotes in the key and the value."""
    quoted = "," in value and podman_version() < (5,)
    return ["--annotation", f'"{key}={value}"' if quoted else f"{key}={value}"]


def root_annotations(out: Path, exclude: tuple[str, ...], sep: str) -> dict[str, str]:
    return {
        **archive_annotations("root", mount_point="/", archive_to=str(out / "root"),
                              exclude=sep.join(exclude)),
        **archive_annotations("layer", mount_point="/", archive_to=str(out / "root.tar.gz"),
                              method="oci-layer", exclude=sep.join(exclude)),
    }  # fmt: skip


def podman_flags(annotations: dict[str, str]) -> list[str]:
    flags = ["--network", "host", "--pull", "never"]
    for key, value in annotations.items():
        flags += annotation_flags(key, value)
    return flags


def debug_hook(podman: Podman) -> None:
    """The installed hook logs at debug level: how it found the root filesystem."""
    path = podman.hooks_dir / "archive-overlay.json"
    config = json.loads(path.read_text())
    config["hook"]["args"].append("--log-level=debug")
    path.write_text(json.dumps(config))


def found_by(log: str) -> set[str]:
    """How the hook found the root filesystem, from its debug records."""
    return set(re.findall(r'event="root filesystem" .*\bfound=(\S+)', log))


def wait_gone(podman: Podman, name: str, path: str) -> None:
    """podman's cleanup, after the hook, unmounts the rootfs (removing merged) and
    removes the upperdirs of overlay volumes."""
    for _ in range(300):
        if not os.path.lexists(path):
            return
        time.sleep(0.1)
    state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout
    raise AssertionError(f"{path} still there 30 s after {name} exited ({state})")


def mount_points(podman: Podman) -> set[str]:
    """Mount points where the hook runs: rootless podman mounts in a namespace of its own."""
    if podman.user is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    else:
        mountinfo = podman("unshare", "cat", "/proc/self/mountinfo").stdout
    return {unescape_mountinfo(line.split()[4]) for line in mountinfo.splitlines()}


def wait_unmounted(podman: Podman, name: str, path: str) -> None:
    """podman's cleanup, after the hook, unmounts the rootfs: podman 4.3 removes its
    `merged` dir, podman 5.4 leaves it there, empty."""
    for _ in range(300):
        if not os.path.lexists(path) or path not in mount_points(podman):
            return
        time.sleep(0.1)
    state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout
    raise AssertionError(f"{path} still mounted 30 s after {name} exited ({state})")


def hook_by_hand(podman: Podman, hook_bin: Path, log: Path, config: Path, bundle: Path,
                 annotations: dict[str, str]) -> subprocess.CompletedProcess:  # fmt: skip
    """The hook run as a runtime that unmounts first would: rootless in podman's namespace.

    The bundle holds the container's config.json with these annotations only
    (the container's own ask for the /vol volume, gone at cleanup).
    """
    spec = json.loads(config.read_text())
    spec["annotations"] = annotations
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(spec))
    bundle.chmod(0o755)
    state = state_json(bundle)
    cmd = [str(hook_bin), "--log-file", str(log), "--log-level=debug"]
    if podman.user is not None:
        return podman("unshare", *cmd, input=state, check=False)
    return run(["env", "-i", *cmd], input=state, check=False)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_podman_root_filesystem(scenario: Scenario, root_image: Path, hook_bin: Path,
                                tmp_path: Path) -> None:  # fmt: skip
    if scenario.rootless:
        require_tools("runuser", "newuidmap", "newgidmap")
    if scenario.fuse:
        require(Path(FUSE_OVERLAYFS).exists() and Path("/dev/fuse").exists(), "no fuse-overlayfs")
        ensure_fuse_device()
    user = ensure_user(TEST_USER) if scenario.rootless else None
    root = root_image / scenario.key
    podman = Podman(root, user=user, fuse=scenario.fuse)
    out, hand, log = root / "out", root / "hand", root / "hook.log"
    try:
        podman.setup()
        src = root / "src"
        for d in (out, hand, src):
            d.mkdir()
        (src / "old.txt").write_text("old\n")
        if user is not None:
            run(["chown", "-R", f"{user.uid}:{user.gid}", str(out), str(hand), str(src)])
        podman.install_hook(hook_bin, log, allow_dir=out)
        debug_hook(podman)
        podman.load(f"oci:{root_image / 'oci'}:bb", BB_IMAGE)
        sep = "," if scenario.commas else ":"
        annotations = {
            **root_annotations(out, PODMAN_EXCLUDE, sep),
            **archive_annotations("vol", mount_point="/vol", archive_to=str(out / "vol")),
        }
        script = ROOT_CHANGES + VOL_CHANGES + ROOT_LISTING
        proc = podman("run", "--name", "c", "-v", f"{src}:/vol:O",
                      *podman_flags(annotations),
                      BB_IMAGE, "sh", "-c", script, "sh", "/", check=False)  # fmt: skip
        diag = f"\n[{scenario.name}] podman exit {proc.returncode}, stderr:\n{proc.stderr}"
        assert proc.returncode == 0, diag + f"--- hook log:\n{read_log(log)}"
        diag += f"--- hook log:\n{wait_for_hook(log, annotations)}"
        seen = parse_listing(proc.stdout)
        assert_root_changes_seen(seen, diag)
        upper = Path(upperdir_in_log(read_log(log), "root"))
        assert found_by(read_log(log)) == {"mount"}, diag  # still mounted at poststop

        # What the rootfs upperdir holds beside the container's own changes.
        check_upper_entries(upper, scenario, diag)
        # copy: the upperdir, excluded paths aside.
        assert_copy_is_upper(out / "root", upper, PODMAN_EXCLUDE, diag)
        # The -v SRC:/vol:O volume, an overlay of its own.
        vol = trees.snapshot(out / "vol")
        assert (out / "vol" / "new.txt").read_text() == "vol\n", diag
        whiteout = vol["old.txt"]
        assert whiteout["type"] == "char" and whiteout["rdev"] == (0, 0), f"{vol.entries}{diag}"
        assert (src / "old.txt").exists() and not (src / "new.txt").exists(), diag
        # oci-layer: the image plus the layer is the root filesystem the container left.
        expected = without(seen, PODMAN_EXCLUDE)
        layout = check_stacked(out / "root.tar.gz", root_image, root / "mounted", expected, diag)
        check_in_podman(podman, layout, expected, diag)

        # Unmounted first: the exited container's config.json, piped in by hand.
        cid = podman("inspect", "--format", "{{.Id}}", "c").stdout.strip()
        config = podman.graphroot / "overlay-containers" / cid / "userdata" / "config.json"
        root_path = json.loads(config.read_text())["root"]["path"]
        wait_unmounted(podman, "c", root_path)
        wait_gone(podman, "c", upperdir_in_log(read_log(log), "vol"))  # only poststop has it
        assert Path(root_path).parent / "diff" == upper, f"{root_path} vs {upper}{diag}"
        hand_log = hand / "hook.log"
        by_hand = hook_by_hand(podman, hook_bin, hand_log, config, root / "hand-bundle",
                               root_annotations(hand, PODMAN_EXCLUDE, sep))  # fmt: skip
        diag += f"\n--- by hand, exit {by_hand.returncode}:\n{read_log(hand_log)}"
        assert by_hand.returncode == 0, diag
        assert upperdir_in_log(read_log(hand_log), "root") == str(upper), diag
        assert found_by(read_log(hand_log)) == {"storage-layer"}, diag
        assert_copy_is_upper(hand / "root", upper, PODMAN_EXCLUDE, diag)
        check_stacked(hand / "root.tar.gz", root_image, root / "unmounted", expected, diag)
    finally:
        podman.teardown()


def check_upper_entries(upper: Path, scenario: Scenario, diag: str) -> None:
    """The upperdir holds the container's changes and what podman made: nothing else."""
    entries = {p for p in trees.snapshot(upper).entries if p != "."}
    changes = {"new.txt", "etc", "etc/changed.txt", "etc/del.txt", "redo", "redo/fresh.txt",
               "opt", "opt/scratch", "opt/scratch/old.txt", "opt/scratch/tmp.txt"}  # fmt: skip
    made = {rel_of(p) for p in PODMAN_MADE} | {"run", "vol"}  # the image has neither dir
    if scenario.fuse:  # it marks the dirs it makes opaque with two more entries
        made |= {"run/.wh..opq", "run/.wh..wh..opq", "vol/.wh..opq", "vol/.wh..wh..opq"}
        changes |= {"redo/.wh..opq", "redo/.wh..wh..opq"}
    assert entries == changes | made, (
        f"unexpected: {sorted(entries - changes - made)}, "
        f"missing: {sorted((changes | made) - entries)}{diag}"
    )


def check_stacked(blob: Path, image: Path, work: Path, expected: Tree, diag: str) -> Path:
    """umoci unpacks the image plus the layer: the container's root filesystem.

    The layout with the stacked image (tag v2-gzip) is returned.
    """
    layout = work / "oci"
    shutil.copytree(image / "oci", layout)
    descriptor = check_descriptor(blob, "oci-layer", diag)
    rootfs = unpack_stacked(layout, "bb", blob, "oci-layer", descriptor, work)
    # excluded, so no whiteout: what the container deleted there comes from the image
    assert (rootfs / "opt/scratch/old.txt").read_text() == "old\n", diag
    assert not (rootfs / "opt/scratch/tmp.txt").exists(), diag
    got = without(list_host_root(rootfs), PODMAN_EXCLUDE)
    assert_same_tree(expected, got, f"umoci unpack of bb + {blob.name}", diag)
    return layout


def check_in_podman(podman: Podman, layout: Path, expected: Tree, diag: str) -> None:
    """podman pulls the stacked image and a new container sees the same root filesystem."""
    run(["chmod", "-R", "a+rX", str(layout)])
    image = "localhost/rootfs-bb:v2"
    podman.load(f"oci:{layout}:v2-gzip", image)
    proc = podman("run", "--rm", "--network", "host", "--pull", "never", image,
                  "sh", "-c", ROOT_LISTING, "sh", "/")  # fmt: skip
    got = without(parse_listing(proc.stdout), PODMAN_EXCLUDE)
    assert_same_tree(expected, got, f"podman's {image}", diag)


# --- the commit-on-exit loop: each run a revision of the container's own image ----------------

# The list the README gives a podman user for `/` (no volumes here).
README_EXCLUDE = (*PODMAN_MADE, *MOUNT_POINTS)
APP = "app"  # the image's tag in its layout, moved onto each new revision
# `sh -c ROOT_LOOP sh / N`: the root listing, run N's changes (test_oci_image's, at the root, and
# /etc/motd: a directory where podman puts its own entries), the root listing again.
ROOT_LOOP = (ROOT_LISTING + "echo '#####'\n" + RUN_CHANGES
             + 'echo "run $2" >> /etc/motd || exit 4\n' + ROOT_LISTING)  # fmt: skip

LOOP_SCENARIOS = [
    Scenario("rootful-native", "lrf"),
    Scenario("rootful-fuse", "lrx", fuse=True),
    Scenario("rootless-native", "lln", rootless=True),
    Scenario("rootless-fuse", "llx", rootless=True, fuse=True),
    Scenario("rootful-native-no-exclude", "lre", exclude=False),
]
# What podman leaves in a rootfs upperdir under --network none, without the exclude list.
PLACEHOLDERS = {rel_of(p) for p in PODMAN_MADE} - {"etc/resolv.conf"}


@pytest.fixture(scope="module")
def app_image() -> Iterator[Path]:
    """A world-reachable dir with an OCI layout `oci` holding `app`: busybox, getfattr, and
    at its root the files the loop changes."""
    require_tools("podman", "runc")
    base = scratch_dir("ao-rc-")
    base.chmod(0o755)
    try:
        rootfs = write_loop_data(build_tools_rootfs(base / "rootfs"))
        build_oci_image(base / "oci", APP, rootfs)
        yield base
    finally:
        remove_tree(base)


def scenario_user(scenario: Scenario) -> User | None:
    """The rootless user, with what its scenario needs; None for rootful."""
    if scenario.rootless:
        require_tools("runuser", "newuidmap", "newgidmap")
    if scenario.fuse:
        require(Path(FUSE_OVERLAYFS).exists() and Path("/dev/fuse").exists(), "no fuse-overlayfs")
        ensure_fuse_device()
    return ensure_user(TEST_USER) if scenario.rootless else None


@pytest.mark.parametrize("scenario", LOOP_SCENARIOS, ids=lambda s: s.name)
def test_podman_commit_on_exit_loop(scenario: Scenario, app_image: Path, hook_bin: Path) -> None:
    """Three runs of the container's own image, with no image mount: each commits its root
    filesystem as a revision of that image, and the next run starts from it."""
    user = scenario_user(scenario)
    root = app_image / scenario.key
    podman = Podman(root, user=user, fuse=scenario.fuse)
    revs, log = root / "revs", root / "hook.log"
    layout = revs / APP
    try:
        podman.setup()
        shutil.copytree(app_image / "oci", layout)  # revision 0: the image as built
        if user is not None:
            run(["chown", "-R", f"{user.uid}:{user.gid}", str(revs)])
        podman.install_hook(hook_bin, log, allow_dir=revs)
        views: list[Tree] = []
        for n in range(1, RUNS + 1):
            views.append(commit_on_exit(podman, layout, log, n, views, scenario))
        podman.load(f"oci:{layout}:{APP}", "localhost/app:final")
        proc = podman("run", "--rm", "--network", "none", "--pull", "never",
                      "localhost/app:final", "sh", "-c", ROOT_LISTING, "sh", "/")  # fmt: skip
        got = without(parse_listing(proc.stdout), README_EXCLUDE)
        assert_same_tree(views[-1], got, f"[{scenario.name}] a container of revision {RUNS}")
    finally:
        podman.teardown()


def commit_on_exit(podman: Podman, layout: Path, log: Path, n: int, views: list[Tree],
                   scenario: Scenario) -> Tree:  # fmt: skip
    """Run n: the container of the revision tagged `app` changes its root filesystem; the
    hook commits it. The container's view after its changes is returned."""
    pinned = user_tool(podman, "skopeo", "inspect", "--format", "{{.Digest}}",
                       f"oci:{layout}:{APP}").stdout.strip()  # fmt: skip
    image = f"localhost/app:in{n}"
    podman.load(f"oci:{layout}:{APP}", image)
    zstd = n == 2  # the second revision's layer is zstd
    annotations = archive_annotations(
        "root", mount_point="/", archive_to=str(layout), image_tag=APP, image_base=pinned,
        method="oci-image+zstd" if zstd else "oci-image",
    )  # fmt: skip
    if scenario.exclude:
        annotations |= archive_annotations("root", exclude=":".join(README_EXCLUDE))
    logged = len(read_log(log)) if log.exists() else 0
    flags = [f for key, value in annotations.items() for f in annotation_flags(key, value)]
    proc = podman("run", "--rm", "--network", "none", "--pull", "never", *flags, image,
                  "sh", "-c", ROOT_LOOP, "sh", "/", str(n), check=False)  # fmt: skip
    hook_log = read_log(log)[logged:]
    diag = (f"\n[{scenario.name} run {n}] podman exit {proc.returncode}, stderr:\n"
            f"{proc.stderr}--- hook log:\n{hook_log}")  # fmt: skip
    assert proc.returncode == 0, diag
    before_text, _, after_text = proc.stdout.partition("#####\n")
    before = without(parse_listing(before_text), README_EXCLUDE)
    after = without(parse_listing(after_text), README_EXCLUDE)
    if views:  # the container started from exactly what the last one left
        assert_same_tree(views[-1], before, f"run {n}'s root before its changes", diag)
    assert_run_changes(after, n, diag)
    motd = "".join(f"run {i}\n" for i in range(1, n + 1)).encode()
    assert after.items["etc/motd"].content == hashlib.sha256(motd).hexdigest(), diag
    # The revision: on the pinned one, the tag moved onto it, its layer the changes only.
    index = check_layout(layout)
    digest = written_manifest(HookRun(0, hook_log), "root")
    assert tagged(index, APP) == [digest], diag
    manifest = read_json_blob(layout, digest)
    assert manifest["annotations"]["org.opencontainers.image.base.digest"] == pinned, diag
    assert len(manifest["layers"]) == n + 1, diag
    layer = manifest["layers"][-1]
    assert layer["mediaType"].endswith("+zstd" if zstd else "+gzip"), diag
    check_layer_paths(layout_blob(layout, layer["digest"]), zstd, n, scenario.exclude, diag)
    return after


def check_layer_paths(layer: Path, zstd: bool, n: int, excluded: bool, diag: str) -> None:
    """Run n's layer: its changes and the directories holding them, nothing podman made.

    Without the exclude list, the first revision takes podman's placeholders (empty files, the
    mtab symlink); later runs find them in the image, and their layers hold none of them.
    """
    names = raw_member_names(layer, "tar.zst" if zstd else "tar.gz")
    paths = {name.removeprefix("./").rstrip("/") or "." for name in names}
    # fuse-overlayfs marks each directory it creates opaque (/run in run 1, redo/sub)
    markers = {p for p in paths if p.endswith("/.wh..wh..opq") and p != "redo/.wh..wh..opq"}
    changes = {".", f"added-{n}.txt", "changing.txt", f".wh.doomed-{n}.txt", "redo",
               "redo/.wh..wh..opq", "redo/sub", f"redo/sub/r-{n}.txt", "etc", "etc/motd",
               "run"}  # fmt: skip
    if not excluded and n == 1:
        changes |= PLACEHOLDERS
        members = {m.name.removeprefix("./"): m for m in read_members(layer, "tar.gz")}
        assert members["etc/mtab"].linkname == "/proc/mounts", diag
        assert all(members[p].size == 0 for p in PLACEHOLDERS - {"etc/mtab"}), diag
    elif not excluded:  # /run/.containerenv is in the image now: /run is not copied up
        changes -= {"run"}
    assert paths - markers == changes, f"layer of run {n}: {sorted(paths)}{diag}"
    assert markers <= {"run/.wh..wh..opq", "redo/sub/.wh..wh..opq"}, f"{sorted(markers)}{diag}"


def test_readme_commit_on_exit_loop(hook_bin: Path) -> None:
    """The README's images block, then its commit-on-exit loop block with its default image
    (the images block's localhost/busybox: no registry), run by sh as written, with rootful
    podman set up as the README says (the hook in a hooks dir, --allow-dir /srv/revisions), in
    a private mount namespace with a fresh tmpfs on /srv and on /var/lib."""
    require_tools("podman", "runc", "skopeo", "jq", "unshare")
    proc, diag = run_readme_with_podman(
        hook_bin, ("images", "commit-on-exit-loop"), "/srv/revisions", {"IMAGE": ""},
        "mount -t tmpfs tmpfs /srv && mount -t tmpfs tmpfs /var/lib && mkdir /srv/me && cd /srv/me",
    )  # fmt: skip
    assert proc.returncode == 0, diag
    lines = proc.stdout.splitlines()
    assert lines[-3:] == ["run 1", "run 2", "run 3"], diag
    comment = re.compile(r"container [0-9a-f]{64} archive root")
    assert all(comment.fullmatch(line) for line in lines[-6:-3]), diag  # one per run
    assert len([line for line in lines if comment.fullmatch(line)]) == 3, diag
    assert lines[-7] == "imported from tarball", diag  # podman import's line: one more


# --- runc, with an overlay rootfs mounted here ------------------------------------------------


def test_runc_overlay_root_filesystem(root_image: Path, hook_bin: Path, tmp_path: Path) -> None:
    require(shutil.which("runc") is not None, "runc not installed")
    base = root_image / "runc"
    bundle, out = base / "bundle", base / "out"
    lower, upper, work, merged = (base / d for d in ("lower", "upper", "work", "bundle/rootfs"))
    shutil.copytree(root_image / "rootfs", lower, symlinks=True)
    for d in (upper, work, merged, out):
        d.mkdir(parents=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)])
    container = f"ao-rootfs-{os.getpid()}"
    state_root = base / "runc-state"
    try:
        config_path = runc_config(
            bundle, merged, args=["sh", "-c", ROOT_CHANGES + ROOT_LISTING, "sh", "/"], mounts=[],
            annotations=root_annotations(out, RUNC_EXCLUDE, ":"),
            poststop=[{"path": str(hook_bin),
                       "args": [str(hook_bin), "--log-file", str(out / "hook.log")]}],
        )  # fmt: skip
        config = json.loads(config_path.read_text())
        config["root"] = {"path": "rootfs", "readonly": False}  # relative to the bundle
        config_path.write_text(json.dumps(config))
        proc = run(["runc", "--root", str(state_root), "run", "--bundle", str(bundle), container],
                   check=False)  # fmt: skip
    finally:
        run(["runc", "--root", str(state_root), "delete", "--force", container], check=False)
        run(["umount", str(merged)], check=False)
    diag = (f"\nrunc exit {proc.returncode}, stderr:\n{proc.stderr}"
            f"--- hook log:\n{read_log(out / 'hook.log')}")  # fmt: skip
    assert proc.returncode == 0, diag
    assert upperdir_in_log(read_log(out / "hook.log"), "root") == str(upper), diag
    seen = parse_listing(proc.stdout)
    assert_root_changes_seen(seen, diag)
    assert_copy_is_upper(out / "root", upper, RUNC_EXCLUDE, diag)
    assert (upper / "opt/scratch/tmp.txt").exists() and not (out / "root/opt/scratch").exists()
    layout = tmp_path / "oci"
    shutil.copytree(root_image / "oci", layout)
    descriptor = check_descriptor(out / "root.tar.gz", "oci-layer", diag)
    rootfs = unpack_stacked(layout, "bb", out / "root.tar.gz", "oci-layer", descriptor, tmp_path)
    assert (rootfs / "opt/scratch/old.txt").read_text() == "old\n", diag
    got = without(list_host_root(rootfs), RUNC_EXCLUDE)
    assert_same_tree(without(seen, RUNC_EXCLUDE), got, "umoci unpack of bb + layer", diag)


# --- exclude and errors, on overlays mounted here ----------------------------------------------

TAR_METHODS = {"tar": "tar", "tar.gz": "tar.gz", "tar.zst": "tar.zst", "oci-layer": "tar.gz",
               "oci-layer+zstd": "tar.zst"}  # fmt: skip


@pytest.fixture
def data_overlay(make_overlay):
    """/data changed: new files, a whiteout, an opaque dir, a nested dir to exclude, and
    hardlinks (one of them to a file under it)."""
    require(is_root(), "needs root: mounts overlayfs")
    ovl = make_overlay("data")
    for d in ("cache/deep", "gone", "redo"):
        (ovl.lower / d).mkdir(parents=True)
    (ovl.lower / "cache/deep/old").write_text("old\n")
    (ovl.lower / "gone/g").write_text("g\n")
    (ovl.lower / "redo/old").write_text("old\n")
    ovl.mount()
    m = ovl.merged
    (m / "keep.txt").write_text("keep\n")
    (m / "cache/deep/new").write_text("new\n")
    (m / "cache/deep/old").unlink()
    (m / "cache/top").write_text("top\n")
    shutil.rmtree(m / "gone")
    shutil.rmtree(m / "redo")
    (m / "redo").mkdir()
    (m / "redo/fresh").write_text("fresh\n")
    (m / "cached.txt").write_text("a sibling whose name starts like an excluded dir\n")
    os.link(m / "keep.txt", m / "redo/keep-link")  # a hardlink group kept whole
    os.link(m / "cache/top", m / "top-link")  # one whose other name is excluded
    return ovl


def member_paths(archive: Path, method: str) -> set[str]:
    names = {m.name for m in read_members(archive, TAR_METHODS[method])}
    return {n.removeprefix("./").rstrip("/") or "." for n in names}


@pytest.mark.parametrize("value", ["/cache:/gone", "/cache,/gone", "//cache/./:/redo/../gone:"])
def test_exclude_leaves_paths_out_of_every_method(data_overlay, run_hook, tmp_path, value):
    out = tmp_path / "out"
    annotations = archive_annotations("copy", mount_point="/data", archive_to=str(out / "copy"),
                                      exclude=value)  # fmt: skip
    for method in TAR_METHODS:
        annotations |= archive_annotations(method.replace(".", "-"), mount_point="/data",
                                           archive_to=str(out / method), method=method,
                                           exclude=value)  # fmt: skip
    bundle = write_bundle(tmp_path / "bundle", [data_overlay.mount_entry()], annotations)
    result = run_hook(state_json(bundle))
    assert result.returncode == 0, result.stderr.decode()
    upper = trees.snapshot(data_overlay.upper)
    assert {"cache/deep/new", "cache/deep/old", "cache/top", "gone"} <= upper.entries.keys()
    expected = upper.without(lambda rel: is_excluded(rel, ("/cache", "/gone")))
    trees.assert_same_tree(expected, trees.snapshot(out / "copy"), "the copy")
    kept = set(expected.entries)
    for method in TAR_METHODS:
        paths = member_paths(out / method, method)
        if method.startswith("oci-layer"):  # the opaque dir's marker, in image-spec's encoding
            assert paths == kept | {"redo/.wh..wh..opq"}, method
        else:
            assert paths == kept, method


def error_lines(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode().splitlines() if "level=error" in line]


def test_relative_exclude_fails_that_archive(data_overlay, run_hook, tmp_path):
    out = tmp_path / "out"
    annotations = {
        **archive_annotations("bad", mount_point="/data", archive_to=str(out / "bad"),
                              exclude="/cache:gone"),
        **archive_annotations("good", mount_point="/data", archive_to=str(out / "good")),
    }  # fmt: skip
    bundle = write_bundle(tmp_path / "bundle", [data_overlay.mount_entry()], annotations)
    result = run_hook(state_json(bundle))
    assert result.returncode == 1, result.stderr.decode()
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "archive=bad" in errors[0], errors
    assert "exclude path 'gone' is not an absolute path" in errors[0], errors
    assert "Traceback" not in result.stderr.decode()
    assert not (out / "bad").exists() and (out / "good" / "keep.txt").exists()


def test_root_path_that_is_no_overlay_fails_clearly(data_overlay, run_hook, tmp_path):
    """root.path a plain directory (not a mount, not in a containers-storage layer)."""
    out = tmp_path / "out"
    (tmp_path / "bundle" / "rootfs").mkdir(parents=True)
    annotations = {
        **archive_annotations("root", mount_point="/", archive_to=str(out / "root")),
        **archive_annotations("data", mount_point="/data", archive_to=str(out / "data")),
    }
    bundle = write_bundle(tmp_path / "bundle", [data_overlay.mount_entry()], annotations)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": "rootfs"}
    (bundle / "config.json").write_text(json.dumps(config))
    result = run_hook(state_json(bundle))
    assert result.returncode == 1, result.stderr.decode()
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "archive=root" in errors[0], errors
    assert f"root.path rootfs ({bundle}/rootfs) is neither an overlay mount" in errors[0], errors
    assert not (out / "root").exists() and (out / "data" / "keep.txt").exists()


def test_root_of_an_overlay_mounted_at_root_path(data_overlay, run_hook, tmp_path):
    """A native overlay mounted at root.path, given relative to the bundle, and mount-point //."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "rootfs").symlink_to(data_overlay.merged)  # mountinfo names the real path
    out = tmp_path / "out"
    annotations = archive_annotations("root", mount_point="//", archive_to=str(out / "root"),
                                      exclude="/cache")  # fmt: skip
    write_bundle(bundle, [], annotations)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": "rootfs"}
    (bundle / "config.json").write_text(json.dumps(config))
    result = run_hook(state_json(bundle))
    assert result.returncode == 0, result.stderr.decode()
    assert_copy_is_upper(out / "root", data_overlay.upper, ("/cache",), "")
