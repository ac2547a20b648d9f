"""exclude and overlay markers as the container saw them (issue 18).

A podman container (rootful native, rootless native, rootless fuse-overlayfs
whose mknod fails) runs an image with a merged /usr (`/lib -> usr/lib`) and
`/var/run -> ../run`, and changes its root filesystem:

  - it writes /var/run/token and /lib/secret.so, which the upperdir stores as
    run/token and usr/lib/secret.so, and /mylib/via.so through a symlink it
    made itself: excluded by the paths the container used, they are absent
    from every archive, and a path that is nowhere is warned about;
  - it deletes /gone: excluded, it leaves no marker of any kind (fuse-overlayfs,
    its mknod failing under strace, records the deletion as a file .wh.gone),
    so /gone comes back from the image once the layer is stacked;
  - it deletes and re-creates /conf, deletes /conf2: a layer cannot leave out
    /conf/settings or /conf2/settings and keep the image's, so those oci-layer
    archives fail, naming the exclude and the directory; tar keeps the markers
    as the overlay wrote them.

The layer, stacked on the image, is unpacked by umoci and pulled into podman,
and must equal the container's view, the excluded paths aside, entry by entry.

Then, after podman unmounted the rootfs, root runs the hook by hand on the
container's config.json (as CRI-O's order does): the upperdir is the layer's
`diff`, the lower layers come from its `lower` file, and the markers' namespace
from the store (a rootless store keeps user.overlay.*), not from the user
namespace the hook runs in.  The layer must stack the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import archive_annotations, is_root, state_json, write_bundle
from engines import (
    FUSE_OVERLAYFS,
    Podman,
    build_oci_image,
    remove_tree,
    require,
    run,
    scratch_dir,
    wait_for_hook,
)
from test_archive import raw_member_names, read_members
from test_oci_layer import (
    Tree,
    assert_same_tree,
    build_tools_rootfs,
    check_descriptor,
    parse_listing,
    read_log,
    require_tools,
    unpack_stacked,
)
from test_rootfs import (
    MOUNT_POINTS,
    PODMAN_MADE,
    ROOT_LISTING,
    Scenario,
    list_host_root,
    scenario_user,
    upperdir_in_log,
    wait_unmounted,
    without,
)

IMAGE = "localhost/exclude-bb"
# The container's changes to its root filesystem.
CHANGES = """set -e
echo token > /var/run/token
echo secret > /lib/secret.so
echo kept > /lib/kept.so
ln -s /usr/lib /mylib
echo via > /mylib/via.so
rm -r /gone
rm -r /conf
mkdir /conf
echo new > /conf/settings
echo added > /conf/added
rm -r /conf2
"""
PODMAN_EXCLUDE = (*PODMAN_MADE, *MOUNT_POINTS)
# As the container wrote them, and where the upperdir holds them.
EXCLUDE = ("/var/run/token", "/lib/secret.so", "/mylib/via.so", "/gone", "/no/such/path")
STORED = ("/run/token", "/usr/lib/secret.so", "/usr/lib/via.so", "/gone")


def write_image(rootfs: Path) -> Path:
    """busybox and getfattr with a merged /usr (/lib -> usr/lib), /var/run -> ../run, and the
    directories CHANGES deletes."""
    build_tools_rootfs(rootfs)
    usr_lib = rootfs / "usr" / "lib"
    usr_lib.parent.mkdir()
    (rootfs / "lib").rename(usr_lib)  # getfattr's libraries: /lib/<arch>/...
    (rootfs / "lib").symlink_to("usr/lib")
    (rootfs / "run").mkdir()
    (rootfs / "var").mkdir()
    (rootfs / "var" / "run").symlink_to("../run")
    for d in ("gone", "conf", "conf2"):
        (rootfs / d).mkdir()
    files = {"usr/lib/old.so": "old\n", "gone/x.txt": "x\n", "conf/settings": "image\n",
             "conf/other": "other\n", "conf2/settings": "image2\n"}  # fmt: skip
    for name, text in files.items():
        (rootfs / name).write_text(text)
    # podman's bind-mount targets: runc 1.1.15 (Debian 13) makes a missing one with mknod,
    # which the fuse-overlayfs of NoMknodPodman refuses (the container would not start).
    for name in ("etc/hostname", "etc/hosts", "run/.containerenv"):
        (rootfs / name).touch()
    return rootfs


@pytest.fixture(scope="module")
def image() -> Iterator[Path]:
    """A world-reachable dir with an OCI layout `oci` holding `bb`."""
    require_tools("podman", "runc", "strace")
    base = scratch_dir("ao-ex-")
    base.chmod(0o755)
    try:
        build_oci_image(base / "oci", "bb", write_image(base / "rootfs"))
        yield base
    finally:
        remove_tree(base)


# fuse-overlayfs with mknod failing, as where it cannot make a 0/0 device: it records a
# deletion as a file .wh.<name>.  strace -D: podman waits for the mount program's own pid to
# exit; its output to /dev/null: podman reads the mount program's output until EOF, and the
# tracer lives as long as the mount.
NO_MKNOD = """#!/bin/sh
exec strace -D -f -qq -o /dev/null --seccomp-bpf -e trace=mknod,mknodat \\
  -e inject=mknod,mknodat:error=EPERM {fuse} "$@" </dev/null >/dev/null 2>&1
"""


@dataclass
class NoMknodPodman(Podman):
    """A podman whose mount program is fuse-overlayfs under strace, its mknod failing."""

    @property
    def mount_program(self) -> Path:
        return self.root / "fuse-overlayfs-no-mknod"

    def _storage_conf(self) -> str:
        conf = super()._storage_conf()
        return conf.replace(json.dumps(FUSE_OVERLAYFS), json.dumps(str(self.mount_program)))

    def setup(self) -> None:
        super().setup()
        self.mount_program.write_text(NO_MKNOD.format(fuse=FUSE_OVERLAYFS))
        self.mount_program.chmod(0o755)


SCENARIOS = [
    Scenario("rootful-native", "xf"),
    Scenario("rootless-native", "xn", rootless=True),
    Scenario("rootless-fuse-no-mknod", "xm", rootless=True, fuse=True),
]


def annotations(out: Path, by_root: bool = False) -> dict[str, str]:
    """by_root: root reads a rootless layer with the host's ids; everything here is owned by
    the container's root, so tar-content-owner 0:0 gives the container's owners back."""
    exclude = ":".join((*PODMAN_EXCLUDE, *EXCLUDE))
    owner = archive_annotations("layer", tar_content_owner="0:0") if by_root else {}
    return owner | {
        **archive_annotations("layer", mount_point="/", archive_to=str(out / "layer.tar.gz"),
                              method="oci-layer", exclude=exclude),
        **archive_annotations("tar", mount_point="/", archive_to=str(out / "root.tar"),
                              method="tar", exclude=exclude),
        **archive_annotations("redo", mount_point="/", archive_to=str(out / "redo.tar.gz"),
                              method="oci-layer", exclude="/conf/settings"),
        **archive_annotations("deleted", mount_point="/", archive_to=str(out / "deleted.tar.gz"),
                              method="oci-layer", exclude="/conf2/settings"),
        **archive_annotations("redo-tar", mount_point="/", archive_to=str(out / "redo.tar"),
                              method="tar", exclude="/conf/settings"),
    }  # fmt: skip


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_exclude_as_the_container_saw_it(scenario: Scenario, image: Path, hook_bin: Path) -> None:
    user = scenario_user(scenario)
    root = image / scenario.key
    kind = NoMknodPodman if scenario.fuse else Podman
    podman = kind(root, user=user, fuse=scenario.fuse)
    out, hand, log = root / "out", root / "hand", root / "hook.log"
    try:
        podman.setup()
        for d in (out, hand):
            d.mkdir()
        if user is not None:
            run(["chown", "-R", f"{user.uid}:{user.gid}", str(out)])
        podman.install_hook(hook_bin, log)
        podman.load(f"oci:{image / 'oci'}:bb", IMAGE)
        flags = [f for k, v in annotations(out).items() for f in ("--annotation", f"{k}={v}")]
        proc = podman("run", "--name", "c", "--network", "none", "--pull", "never", *flags,
                      IMAGE, "sh", "-c", CHANGES + ROOT_LISTING, "sh", "/", check=False)  # fmt: skip
        diag = f"\n[{scenario.name}] podman exit {proc.returncode}, stderr:\n{proc.stderr}"
        assert proc.returncode == 0, diag + f"--- hook log:\n{read_log(log)}"
        hook_log = wait_for_hook(log, annotations(out))
        diag += f"--- hook log:\n{hook_log}"
        seen = parse_listing(proc.stdout)
        for path in STORED[:-1]:
            assert path.lstrip("/") in seen.items, f"{path} not written{diag}"
        upper = Path(upperdir_in_log(hook_log, "layer"))
        if scenario.fuse:  # the deletion as fuse-overlayfs recorded it without mknod
            assert (upper / ".wh.gone").is_file() and not (upper / "gone").exists(), diag
        check_archives(out, hook_log, seen, image, root / "live", podman, diag)

        # After podman unmounted the rootfs: root runs the hook on the container's config.json.
        cid = podman("inspect", "--format", "{{.Id}}", "c").stdout.strip()
        config = podman.graphroot / "overlay-containers" / cid / "userdata" / "config.json"
        spec = json.loads(config.read_text())
        wait_unmounted(podman, "c", spec["root"]["path"])
        code, hand_text = hook_by_root(hook_bin, spec, annotations(hand, by_root=True), hand)
        diag += f"\n--- by hand, exit {code}:\n{hand_text}"
        assert code == 1, diag  # redo and deleted fail, the others are written
        assert re.search(r'event="root filesystem" .*\bfound=storage-layer', hand_text), diag
        assert upperdir_in_log(hand_text, "layer") == str(upper), diag
        check_archives(hand, hand_text, seen, image, root / "unmounted", podman, diag)
        if scenario.rootless and not scenario.fuse:
            # As on a kernel that puts no xattr on the upperdir's root: the store's owner says.
            for name in os.listxattr(upper):
                if name.startswith("user.overlay."):
                    os.removexattr(upper, name)
            again = root / "again"
            again.mkdir()
            layer = archive_annotations("layer", mount_point="/", method="oci-layer",
                                        archive_to=str(again / "layer.tar.gz"))  # fmt: skip
            code, text = hook_by_root(hook_bin, spec, layer, again)
            assert code == 0 and not os.listxattr(upper), f"{text}{diag}"
            names = raw_member_names(again / "layer.tar.gz", "tar.gz")
            assert "./conf/.wh..wh..opq" in names, f"{names}\n{text}{diag}"
    finally:
        podman.teardown()


def hook_by_root(hook_bin: Path, spec: dict, annotations: dict[str, str],
                 out: Path) -> tuple[int, str]:  # fmt: skip
    """The hook run by root, outside any user namespace, on the container's config.json with
    these annotations (a bundle and a log in out): its exit status and log."""
    bundle = out / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({**spec, "annotations": annotations}))
    log = out / "hook.log"
    proc = run(["env", "-i", str(hook_bin), "--log-file", str(log), "--log-level=debug"],
               input=state_json(bundle), check=False)  # fmt: skip
    return proc.returncode, read_log(log)


def check_archives(out: Path, log: str, seen: Tree, image: Path, work: Path, podman: Podman,
                   diag: str) -> None:  # fmt: skip
    """What one hook run made of the container's changes."""
    # A path that is nowhere is named (podman makes no /etc/resolv.conf under --network none);
    # the ones reached through symlinks are not.
    warned = re.findall(r'event="exclude path matches nothing[^"]*" archive=layer exclude=(\S+)',
                        log)  # fmt: skip
    assert warned == ["/etc/resolv.conf", "/no/such/path"], diag
    # A layer cannot leave these out: it fails, naming the exclude and the directory.
    for name, exclude, directory in (("redo", "/conf/settings", "/conf"),
                                     ("deleted", "/conf2/settings", "/conf2")):  # fmt: skip
        failed = [line for line in log.splitlines() if f"archive={name} " in line]
        assert any("level=error" in line and f"exclude path {exclude} is in {directory}," in line
                   for line in failed), f"{name}: {failed}{diag}"  # fmt: skip
        assert not (out / f"{name}.tar.gz").exists(), diag
    # tar keeps the overlay's markers as they are, the excluded path left out.
    redo = {n.removeprefix("./").rstrip("/") for n in raw_member_names(out / "redo.tar", "tar")}
    assert "conf" in redo and "conf/added" in redo and "conf/settings" not in redo, diag
    conf = next(m for m in read_members(out / "redo.tar", "tar") if m.name.strip("./") == "conf")
    opaque = [k for k, v in conf.pax_headers.items() if k.endswith("overlay.opaque") and v == "y"]
    assert opaque or "conf/.wh..wh..opq" in redo, f"tar lost /conf's marker: {redo}{diag}"
    # No excluded path, and no marker of one, in tar or in the layer.
    stored = {p.lstrip("/") for p in STORED}
    marks = {f"{d}/.wh.{n}".lstrip("/") for d, _, n in (p.rpartition("/") for p in STORED)}
    for archive, method in (("root.tar", "tar"), ("layer.tar.gz", "tar.gz")):
        names = {n.removeprefix("./").rstrip("/") for n in raw_member_names(out / archive, method)}
        assert not names & (stored | marks), f"{archive}: {sorted(names & (stored | marks))}{diag}"
        assert "usr/lib/kept.so" in names and "mylib" in names, f"{archive}: {names}{diag}"
    assert "conf/.wh..wh..opq" in names, f"the layer lost /conf's opacity: {names}{diag}"
    # Stacked on the image: the container's view, with the image's /gone back.
    expected = without(seen, PODMAN_EXCLUDE + STORED)
    layout = work / "oci"
    shutil.copytree(image / "oci", layout)
    blob = out / "layer.tar.gz"
    rootfs = unpack_stacked(layout, "bb", blob, "oci-layer", check_descriptor(blob, "oci-layer",
                            diag), work)  # fmt: skip
    assert (rootfs / "gone/x.txt").read_text() == "x\n", diag
    got = list_host_root(rootfs)
    assert not {"run/token", "usr/lib/secret.so", "usr/lib/via.so"} & got.items.keys(), diag
    assert_same_tree(expected, without(got, PODMAN_EXCLUDE + STORED), "umoci unpack", diag)
    run(["chmod", "-R", "a+rX", str(work)])
    tag = f"localhost/exclude-bb:{work.name}"
    podman.load(f"oci:{layout}:v2-gzip", tag)
    proc = podman("run", "--rm", "--network", "none", "--pull", "never", tag,
                  "sh", "-c", "cat /gone/x.txt && " + ROOT_LISTING, "sh", "/")  # fmt: skip
    assert proc.stdout.startswith("x\n"), f"/gone did not come back{diag}"
    got = parse_listing(proc.stdout.removeprefix("x\n"))
    assert not {"run/token", "usr/lib/secret.so", "usr/lib/via.so"} & got.items.keys(), diag
    assert_same_tree(expected, without(got, PODMAN_EXCLUDE + STORED), f"podman's {tag}", diag)


# --- resolution details, on an overlay mounted here -----------------------------------------


def test_exclude_resolution_on_an_overlay(make_overlay, run_hook, tmp_path: Path) -> None:
    """Absolute and relative (`..`) symlinks of the image, a loop, a named symlink, a path the
    container deleted through a symlink, and a directory the container replaced with a file."""
    require(is_root(), "needs root: mounts overlayfs")
    ovl = make_overlay("ex")
    lower = ovl.lower
    for d in ("usr/lib", "etc", "d/sub", "conf"):
        (lower / d).mkdir(parents=True)
    (lower / "lib").symlink_to("usr/lib")
    (lower / "etc/alt").symlink_to("/usr/lib")
    (lower / "d/sub/up").symlink_to("../..")
    (lower / "loop1").symlink_to("loop2")
    (lower / "loop2").symlink_to("loop1")
    (lower / "usr/lib/old.so").write_text("old\n")
    (lower / "conf/settings").write_text("image\n")
    ovl.mount()
    m = ovl.merged
    for name in ("a", "b", "c"):
        (m / "lib" / name).write_text(f"{name}\n")
    (m / "lib/old.so").unlink()
    shutil.rmtree(m / "conf")
    (m / "conf").write_text("now a file\n")
    out = tmp_path / "out"
    exclude = "/etc/alt/a:/d/sub/up/lib/b:/loop1/x:/lib:/lib/old.so"
    annotations = {
        **archive_annotations("tar", mount_point="/data", archive_to=str(out / "t.tar"),
                              method="tar", exclude=exclude),
        **archive_annotations("file", mount_point="/data", archive_to=str(out / "f.tar.gz"),
                              method="oci-layer", exclude="/conf/settings"),
    }  # fmt: skip
    bundle = write_bundle(tmp_path / "bundle", [ovl.mount_entry()], annotations)
    result = run_hook(state_json(bundle), "--log-level=debug")
    log = result.stderr.decode()
    assert result.returncode == 1, log
    assert 'event="exclude path resolved" archive=tar exclude=/etc/alt/a path=/usr/lib/a' in log
    names = {n.removeprefix("./").rstrip("/") for n in raw_member_names(out / "t.tar", "tar")}
    assert names == {"", "usr", "usr/lib", "usr/lib/c", "conf"}, f"{sorted(names)}\n{log}"
    warned = re.findall(r'event="exclude path matches nothing[^"]*" archive=tar exclude=(\S+)', log)
    assert warned == ["/loop1/x"], log
    assert "exclude path /conf/settings is in /conf, which the container deleted or replaced" in log
    assert not (out / "f.tar.gz").exists(), log
