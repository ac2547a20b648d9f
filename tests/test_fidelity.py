"""Nothing lost, checked by readers we did not write (issue 12).

Each case is built through a real overlay mount (native; `userxattr` where
the marker namespace matters), the installed hook archives the upperdir with
every method in one run (as an engine runs it: one invocation per container),
and the results are read back with GNU tar, bsdtar, Python's tarfile, and for
layers umoci and podman (containers-storage) applying the layer on top of the
image the overlay's lowerdir was.

Trees are compared with tests/trees.py's one strict comparison (it reads trees deeper
than PATH_MAX too).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Overlay, archive_annotations, requires_root, state_json, write_bundle
from engines import (
    TEST_USER,
    Podman,
    build_oci_image,
    ensure_user,
    remove_tree,
    require,
    run,
    scratch_dir,
)
from test_oci_layer import add_layer
from trees import Exemption, Tree, assert_same_tree, root_mtime, snapshot

pytestmark = requires_root

ALL_METHODS = ("copy", "tar", "tar.gz", "tar.zst", "oci-layer", "oci-layer+zstd")
TAR_METHODS = ("tar", "tar.gz", "tar.zst")
LAYER_METHODS = ("oci-layer", "oci-layer+zstd")
GIB = 1 << 30
OVERLAY_XATTR = re.compile(r"^(trusted\.overlay\.|user\.overlay\.|user\.fuseoverlayfs\.)")


def require_tools(*tools: str) -> None:
    for tool in ("tar", "bsdtar", "getfacl", "setfacl", "zstd", *tools):
        require(shutil.which(tool) is not None, f"{tool} not installed")


# --- an overlay mount ----------------------------------------------------------------------


@dataclass
class Mount(Overlay):
    """conftest's Overlay with its directories made, `userxattr` if asked, mounted in a with."""

    userxattr: bool = False

    def __post_init__(self) -> None:
        for d in (self.lower, self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)

    def options(self) -> list[str]:
        return super().options() + (["userxattr"] if self.userxattr else [])

    @contextlib.contextmanager
    def mounted(self) -> Iterator[Path]:
        self.mount()
        try:
            yield self.merged
        finally:
            self.unmount()


# --- running the hook: every method at once ------------------------------------------------


SUFFIXES = {"copy": "copy", "tar": "tar", "tar.gz": "tar.gz", "tar.zst": "tar.zst",
            "oci-layer": "layer.tar.gz", "oci-layer+zstd": "layer.tar.zst"}  # fmt: skip


@dataclass
class HookRun:
    proc: subprocess.CompletedProcess
    out: Path
    methods: tuple[str, ...]

    @property
    def stderr(self) -> str:
        return self.proc.stderr.decode("utf-8", "backslashreplace")

    @property
    def diag(self) -> str:
        return f"\nhook exit {self.proc.returncode}, stderr:\n{self.stderr}"

    def path(self, method: str) -> Path:
        return self.out / f"a.{SUFFIXES[method]}"

    def expect_exit(self, status: int) -> None:
        if self.proc.returncode != status:
            pytest.fail(f"expected exit {status}{self.diag}", pytrace=False)

    def lines(self, level: str) -> list[str]:
        return [line for line in self.stderr.splitlines() if f"level={level}" in line]


def archive_name(method: str) -> str:
    return method.replace(".", "").replace("+", "").replace("-", "")


def run_all(hook_bin: Path, work: Path, mount: Mount, methods=ALL_METHODS,
            out: Path | None = None) -> HookRun:  # fmt: skip
    """The hook, run once as an engine runs it, writing one archive per method."""
    require_tools()
    out = out if out is not None else work / "out"
    annotations: dict[str, str] = {}
    for method in methods:
        annotations |= archive_annotations(
            archive_name(method), mount_point="/data",
            archive_to=str(out / f"a.{SUFFIXES[method]}"), method=method,
        )  # fmt: skip
    bundle = write_bundle(work / "bundle", [mount.mount_entry()], annotations)
    proc = subprocess.run([str(hook_bin)], input=state_json(bundle).encode(), env={},
                          capture_output=True, check=False, timeout=600)  # fmt: skip
    result = HookRun(proc, out, tuple(methods))
    check_messages(result)
    for method in methods:
        if method != "copy" and result.path(method).exists():
            assert_each_path_once(result.path(method), method)
    return result


def check_messages(result: HookRun) -> None:
    """No traceback, no /proc/self/fd/N in place of a real path, one line per record."""
    assert "Traceback" not in result.stderr, result.diag
    assert "/proc/self/fd" not in result.stderr, result.diag
    for line in result.stderr.splitlines():
        assert line.startswith(("timestamp=", "level=")), result.diag


# --- reading tar archives ------------------------------------------------------------------


@contextlib.contextmanager
def tar_stream(archive: Path) -> Iterator[tarfile.TarFile]:
    """The archive as a tarfile stream: decompressed by the zstd command where needed."""
    if archive.name.endswith(".zst"):
        proc = subprocess.Popen(["zstd", "-dc", str(archive)], stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            with tarfile.open(fileobj=proc.stdout, mode="r|", errors="surrogateescape") as tf:
                yield tf
        finally:
            proc.stdout.close()  # type: ignore[union-attr]
            proc.wait()
    else:
        with tarfile.open(archive, mode="r|*", errors="surrogateescape") as tf:
            yield tf


def tar_members(archive: Path) -> list[tarfile.TarInfo]:
    with tar_stream(archive) as tf:
        return list(tf)


def assert_each_path_once(archive: Path, method: str) -> None:
    names = [m.name.rstrip("/").removeprefix("./") or "." for m in tar_members(archive)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"{method}: paths twice in {archive}: {dupes}"


def extract(cmd: list[str], into: Path, check: bool, tolerated: str | None):
    """Extract into a new directory; with check, exit 0 and not a word on stderr but the
    lines matching `tolerated`."""
    into.mkdir(parents=True)
    proc = subprocess.run([*cmd, "-C", str(into)], capture_output=True, check=False)
    if check:
        stderr = proc.stderr.decode(errors="replace")
        said = [line for line in stderr.splitlines()
                if tolerated is None or not re.search(tolerated, line)]  # fmt: skip
        assert proc.returncode == 0 and not said, f"{cmd}: exit {proc.returncode}\n{stderr}"
    return proc


def gnu_extract(archive: Path, into: Path, *flags: str, check: bool = True,
                tolerated: str | None = None):  # fmt: skip
    cmd = ["tar", "--numeric-owner", *flags, "-xpf", str(archive)]
    return extract(cmd, into, check, tolerated)


def bsd_extract(archive: Path, into: Path, *flags: str, check: bool = True):
    cmd = ["bsdtar", "--numeric-owner", *flags, "-xpf", str(archive)]
    return extract(cmd, into, check, None)


GNU_ALL = ("--xattrs", "--xattrs-include=*", "--acls")


BSD_ALL = ("--xattrs", "--acls")


def getfacl(root: Path) -> list[str]:
    """getfacl's listing of every entry under root, numeric ids, paths relative to root: its
    blocks (one an entry) sorted, as -R lists in directory order, which each filesystem picks
    (tmpfs: newest first)."""
    proc = subprocess.run(["getfacl", "-R", "-P", "-n", "."], cwd=root, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return sorted(proc.stdout.strip("\n").split("\n\n"))


# --- layers: stacked on the image, applied by umoci and by podman ---------------------------


@dataclass
class Images:
    """An OCI layout (base images and stacked ones) and a rootful podman with its own storage."""

    root: Path
    podman: Podman
    count: int = 0

    def layout(self) -> Path:
        self.count += 1
        return self.root / "layouts" / f"l{self.count}"

    def stack(self, lower: Path, layer: Path, tag: str) -> tuple[Path, str]:
        """A layout holding image `base` (lower as one layer) and `tag` (base + the layer)."""
        layout = self.layout()
        build_oci_image(layout, "base", lower)
        descriptor = json.loads(Path(f"{layer}.json").read_text())
        add_layer(layout, "base", tag, layer, descriptor)
        return layout, tag

    def umoci_rootfs(self, layout: Path, tag: str, work: Path) -> Path:
        bundle = work / f"umoci-{tag}"
        run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], timeout=600)
        return bundle / "rootfs"

    @contextlib.contextmanager
    def podman_rootfs(self, layout: Path, tag: str) -> Iterator[Path]:
        """containers-storage applies the stacked image; its mounted rootfs."""
        image_id = self.podman("pull", "--quiet", f"oci:{layout}:{tag}").stdout.split()[-1]
        path = self.podman("image", "mount", image_id).stdout.strip()
        try:
            yield Path(path)
        finally:
            self.podman("image", "unmount", "--force", image_id, check=False)
            self.podman("rmi", "--force", image_id, check=False)

    def exported_names(self, podman: Podman, layout: Path, tag: str) -> set[str]:
        """The paths of a container made from the stacked image, as `podman export` tars them
        (no shell needed in the image; works rootless, where `image mount` needs unshare)."""
        image_id = podman("pull", "--quiet", f"oci:{layout}:{tag}").stdout.split()[-1]
        container = podman("create", "--network", "none", image_id, "x").stdout.split()[-1]
        export = podman.root / "export.tar"
        try:
            podman("export", "-o", str(export), container)
            with tarfile.open(export) as tf:
                return {m.name.removeprefix("./").rstrip("/") for m in tf}
        finally:
            podman("rm", "--force", container, check=False)
            podman("rmi", "--force", image_id, check=False)
            export.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    require_tools("umoci", "skopeo", "podman")
    root = scratch_dir("ao-fi-")
    root.chmod(0o755)  # the rootless podman reads the layouts
    podman = Podman(root / "p")
    try:
        podman.setup()
        yield Images(root, podman)
    finally:
        podman.teardown()
        remove_tree(root)


@pytest.fixture(scope="module")
def rootless_podman(images: Images) -> Iterator[Podman]:
    """A rootless podman (native overlay, `userxattr`: user.overlay.* are its markers)."""
    require_tools("runuser", "newuidmap", "newgidmap")
    podman = Podman(images.root / "r", user=ensure_user(TEST_USER))
    try:
        podman.setup()
        yield podman
    finally:
        podman.teardown()


# --- 1, 3. overlay xattrs and opaque roots never reach a layer ------------------------------


def setfattr(path: Path, name: str, value: bytes) -> None:
    os.setxattr(path, name, value, follow_symlinks=False)


@dataclass(frozen=True)
class XattrCase:
    name: str
    userxattr: bool
    # xattrs a process in the container sets on lower dirs: dir -> (name, value)
    sets: tuple[tuple[str, str], ...]


XATTR_CASES = [
    # rootful: trusted.overlay.* set by the container is stored escaped (6.7+);
    # user.overlay.* and user.fuseoverlayfs.* are plain data, but an applier
    # (rootless containers-storage, fuse-overlayfs) would read them as markers.
    XattrCase("native", False, (("keep1", "trusted.overlay.opaque"),
                                ("keep2", "user.overlay.opaque"),
                                ("keep3", "user.fuseoverlayfs.opaque"))),
    # rootless (userxattr): user.overlay.* is stored escaped; trusted.overlay.* is raw data.
    XattrCase("userxattr", True, (("keep1", "user.overlay.opaque"),
                                  ("keep2", "trusted.overlay.opaque"),
                                  ("keep3", "user.fuseoverlayfs.opaque"))),
]  # fmt: skip


def image_with_dirs(lower: Path, dirs: list[str]) -> None:
    for d in dirs:
        (lower / d).mkdir()
        (lower / d / "from-image.txt").write_text(f"{d} of the image\n")
    (lower / "top.txt").write_text("top\n")


@pytest.fixture(scope="module", params=XATTR_CASES, ids=lambda c: c.name)
def xattr_case(request, hook_bin, tmp_path_factory):
    case: XattrCase = request.param
    work = tmp_path_factory.mktemp(f"xattr-{case.name}")
    mnt = Mount(work / "m", userxattr=case.userxattr)
    image_with_dirs(mnt.lower, [d for d, _ in case.sets])
    with mnt.mounted() as merged:
        for d, name in case.sets:
            setfattr(merged / d, name, b"y")
            (merged / d / "new.txt").write_text("new\n")
        setfattr(merged / "keep1" / "new.txt", "user.note", b"kept")
    return case, mnt, work, run_all(hook_bin, work, mnt)


def test_overlay_xattrs_of_the_container_leave_the_layer_with_a_warning(xattr_case):
    case, mnt, _, result = xattr_case
    result.expect_exit(0)
    upper = snapshot(mnt.upper)
    stored = {d: [n for n in upper[d]["xattrs"] if OVERLAY_XATTR.match(n)] for d, _ in case.sets}
    assert all(stored.values()), f"the container's xattrs are not in the upperdir: {upper}"
    warnings = result.lines("warning")
    for d, _ in case.sets:
        assert any(d in line for line in warnings), f"no warning names {d}{result.diag}"
    for method in LAYER_METHODS:
        for m in tar_members(result.path(method)):
            bad = [k for k in m.pax_headers
                   if OVERLAY_XATTR.match(k.removeprefix("SCHILY.xattr."))]  # fmt: skip
            assert not bad, f"{method}: {m.name} carries {bad}{result.diag}"
            assert m.name.rpartition("/")[2] != ".wh..wh..opq", f"{method}: {m.name}{result.diag}"
        note = [m for m in tar_members(result.path(method)) if m.name == "./keep1/new.txt"]
        assert note[0].pax_headers.get("SCHILY.xattr.user.note") == "kept", result.diag


def test_overlay_xattrs_of_the_container_stay_raw_in_copy_and_tar(xattr_case):
    _, mnt, work, result = xattr_case
    result.expect_exit(0)
    upper = snapshot(mnt.upper)
    assert_same_tree(upper, snapshot(result.path("copy")), "copy", result.diag)
    for method in TAR_METHODS:
        into = work / f"gnu-{method}"
        gnu_extract(result.path(method), into, *GNU_ALL)
        assert_same_tree(upper, snapshot(into), f"GNU tar -x of {method}", result.diag)


def test_layer_with_container_overlay_xattrs_applies_without_opaque_dirs(xattr_case, images):
    """umoci and podman apply base + layer: the image's files under the dirs stay."""
    case, mnt, work, result = xattr_case
    result.expect_exit(0)
    layout, tag = images.stack(mnt.lower, result.path("oci-layer"), "changed")
    wanted = [f"{d}/from-image.txt" for d, _ in case.sets] + [f"{d}/new.txt" for d, _ in case.sets]
    rootfs = images.umoci_rootfs(layout, tag, work)
    missing = [p for p in wanted if not (rootfs / p).is_file()]
    assert not missing, f"umoci unpack lost {missing}{result.diag}"
    with images.podman_rootfs(layout, tag) as rootfs:
        missing = [p for p in wanted if not (rootfs / p).is_file()]
        assert not missing, f"podman (containers-storage) lost {missing}{result.diag}"
        for d, _ in case.sets:
            names = os.listxattr(rootfs / d)
            assert not [n for n in names if OVERLAY_XATTR.match(n)], f"{d}: {names}"


def test_layer_with_container_overlay_xattrs_applies_in_rootless_podman(
    xattr_case, images, rootless_podman
):
    """Rootless containers-storage mounts with `userxattr`: a user.overlay.opaque in a layer
    would make the directory opaque there."""
    case, mnt, _, result = xattr_case
    result.expect_exit(0)
    layout, tag = images.stack(mnt.lower, result.path("oci-layer"), "changed")
    run(["chmod", "-R", "a+rX", str(layout)])
    names = images.exported_names(rootless_podman, layout, tag)
    wanted = {f"{d}/{f}" for d, _ in case.sets for f in ("from-image.txt", "new.txt")}
    assert wanted <= names, f"rootless podman lost {sorted(wanted - names)}{result.diag}"


@pytest.mark.parametrize("userxattr", [False, True], ids=["native", "userxattr"])
def test_opaque_upperdir_root_is_never_a_layer_marker(userxattr, hook_bin, tmp_path, images):
    mnt = Mount(tmp_path / "m", userxattr=userxattr)
    image_with_dirs(mnt.lower, ["d"])
    opaque = "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"
    setfattr(mnt.upper, opaque, b"y")  # the kernel ignores it on the upper root
    with mnt.mounted() as merged:
        assert (merged / "top.txt").exists(), "the kernel made the root opaque?"
        (merged / "new.txt").write_text("new\n")
    result = run_all(hook_bin, tmp_path, mnt, methods=LAYER_METHODS)
    result.expect_exit(0)
    for method in LAYER_METHODS:
        names = [m.name for m in tar_members(result.path(method))]
        assert not [n for n in names if n.endswith(".wh..wh..opq")], f"{method}: {names}"
    layout, tag = images.stack(mnt.lower, result.path("oci-layer"), "changed")
    wanted = ["top.txt", "d/from-image.txt", "new.txt"]
    rootfs = images.umoci_rootfs(layout, tag, tmp_path)
    assert all((rootfs / p).is_file() for p in wanted), sorted(os.listdir(rootfs))
    with images.podman_rootfs(layout, tag) as rootfs:
        assert all((rootfs / p).is_file() for p in wanted), sorted(os.listdir(rootfs))


# --- 2. a container's own .wh.* files on a native overlay ------------------------------------


WH_CASES = {
    # name: (image files, the container's shell commands in /data, the entry named)
    "wh-name": (("bar",), "echo x > .wh.bar", ".wh.bar"),
    "opaque-marker-name": (("d/x",), "echo x > d/.wh..wh..opq", ".wh..wh..opq"),
    "fuse-opaque-name": (("d/x",), "echo x > d/.wh..opq", ".wh..opq"),
    "whiteout-and-wh-file": (("foo",), "rm foo; echo x > .wh.foo", ".wh.foo"),
}


@pytest.mark.parametrize("case", WH_CASES, ids=str)
def test_wh_names_fail_the_layer_and_stay_plain_files_elsewhere(case, hook_bin, tmp_path):
    image_files, script, entry = WH_CASES[case]
    mnt = Mount(tmp_path / "m")
    for f in image_files:
        (mnt.lower / f).parent.mkdir(parents=True, exist_ok=True)
        (mnt.lower / f).write_text("image\n")
    with mnt.mounted() as merged:
        subprocess.run(["sh", "-c", script], cwd=merged, check=True)
    result = run_all(hook_bin, tmp_path, mnt)
    result.expect_exit(1)
    errors = result.lines("error")
    for method in LAYER_METHODS:
        assert not result.path(method).exists(), f"{method} written{result.diag}"
        assert not Path(f"{result.path(method)}.json").exists(), result.diag
        named = [line for line in errors if f"archive={archive_name(method)} " in line + " "]
        assert named and entry in named[0], f"{method}: no error naming {entry}{result.diag}"
    assert sorted(os.listdir(result.out)) == sorted(
        f"a.{SUFFIXES[m]}" for m in ("copy", *TAR_METHODS)
    ), f"temporaries left: {os.listdir(result.out)}"
    upper = snapshot(mnt.upper)
    assert_same_tree(upper, snapshot(result.path("copy")), "copy", result.diag)
    for method in TAR_METHODS:
        into = tmp_path / f"gnu-{method}"
        gnu_extract(result.path(method), into, *GNU_ALL)
        assert_same_tree(upper, snapshot(into), f"GNU tar -x of {method}", result.diag)
        plain = [m for m in tar_members(result.path(method)) if m.name.endswith("/" + entry)
                 or m.name == "./" + entry]  # fmt: skip
        assert len(plain) == 1 and plain[0].isreg() and plain[0].size == 2, result.diag


# --- 4. copy under a setgid parent and a parent with a default ACL ---------------------------


def varied_tree(merged: Path) -> None:
    """Owners, groups, modes and ACLs that a destination's defaults would change."""
    (merged / "dir").mkdir(mode=0o750)
    os.chmod(merged / "dir", 0o750)
    (merged / "dir" / "f640").write_text("a\n")
    os.chmod(merged / "dir" / "f640", 0o640)
    os.link(merged / "dir" / "f640", merged / "f640-link")
    (merged / "private").mkdir()
    os.chmod(merged / "private", 0o700)
    (merged / "owned").write_text("o\n")
    os.chown(merged / "owned", 1234, 5678)
    os.chmod(merged / "owned", 0o604)
    (merged / "exec").write_text("#!/bin/sh\n")
    os.chmod(merged / "exec", 0o751)
    os.mkfifo(merged / "fifo", 0o620)
    os.symlink("owned", merged / "link")
    os.lchown(merged / "link", 1234, 5678)
    (merged / "acl").write_text("acl\n")
    subprocess.run(["setfacl", "-m", "u:1234:rw,g:5678:r", str(merged / "acl")], check=True)
    (merged / "acl-dir").mkdir()
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx,g:5678:rx", str(merged / "acl-dir")],
                   check=True)  # fmt: skip
    (merged / "acl-dir" / "inherits").write_text("i\n")


@pytest.mark.parametrize("parent", ["setgid", "default-acl"])
def test_copy_ignores_the_destination_defaults(parent, hook_bin, tmp_path):
    require_tools()
    mnt = Mount(tmp_path / "m")
    (mnt.lower / "image.txt").write_text("image\n")
    with mnt.mounted() as merged:
        varied_tree(merged)
    out = tmp_path / "out"
    out.mkdir()
    if parent == "setgid":
        os.chown(out, 0, 4242)
        os.chmod(out, 0o2775)
    else:
        subprocess.run(["setfacl", "-d", "-m", "u:4321:rwx,g:8765:rwx,o::rwx,m::rwx", str(out)],
                       check=True)  # fmt: skip
    result = run_all(hook_bin, tmp_path, mnt, methods=("copy",), out=out)
    result.expect_exit(0)
    copy = result.path("copy")
    assert_same_tree(snapshot(mnt.upper), snapshot(copy), f"copy under a {parent} parent",
                     result.diag)  # fmt: skip
    assert getfacl(copy) == getfacl(mnt.upper)
    # cp -a into the same parent keeps the same owners, and the ACLs of entries that have
    # their own (not the modes: under a setgid parent, coreutils keeps the setgid bit its
    # directories inherit; nor, since coreutils 9.7 (Debian 13), the ACL that an entry
    # without one inherits from a default-ACL parent)
    subprocess.run(["cp", "-a", str(mnt.upper), str(out / "cp-a")], check=True)
    hooks = snapshot(copy)
    assert_same_tree(without_inherited_acls(snapshot(out / "cp-a"), hooks), hooks,
                     "copy against cp -a", result.diag, but=(setgid_of_dirs,))  # fmt: skip


def setgid_of_dirs(rel: str, info: dict) -> dict:
    """coreutils' cp -a keeps the setgid bit that its directories inherit from a setgid
    parent (the hook's copy does not)."""
    if info["type"] != "dir":
        return info
    return {**info, "mode": oct(int(info["mode"], 8) & ~stat.S_ISGID)}


ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


def without_inherited_acls(tree: Tree, own: Tree) -> Tree:
    """tree, less each entry's ACLs (access, default) of a kind its entry in own lacks."""

    def entry(rel: str, info: dict) -> dict:
        has = own.entries.get(rel, {}).get("xattrs", {})
        xattrs = {k: v for k, v in info["xattrs"].items() if k not in ACL_XATTRS or k in has}
        return {**info, "xattrs": xattrs}

    return Tree({rel: entry(rel, info) for rel, info in tree.entries.items()}, tree.links)


# --- 5, 8. xattr names with '=', '%', and bytes that are not UTF-8 ---------------------------


ODD_XATTRS = {
    "user.a=b": b"val",
    "user.p%41": b"pct",
    "user.%3D": b"literal percent-3D",
    "user.x==y%%": b"both",
    os.fsdecode(b"user.caf\xe9"): b"latin-1 name",
    os.fsdecode(b"user.\xff\xfe"): b"not utf-8",
}


def gnu_keyword(name: str) -> str:
    """GNU tar's PAX keyword for an xattr name: '%' and '=' percent-encoded."""
    return "SCHILY.xattr." + name.replace("%", "%25").replace("=", "%3D")


@pytest.fixture(scope="module")
def odd_xattrs(hook_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("odd-xattrs")
    mnt = Mount(work / "m")
    with mnt.mounted() as merged:
        (merged / "file").write_text("x\n")
        (merged / "dir").mkdir()
        for name, value in ODD_XATTRS.items():
            setfattr(merged / "file", name, value)
            setfattr(merged / "dir", name, value)
    return mnt, work, run_all(hook_bin, work, mnt)


def test_odd_xattr_names_every_tar_method_works(odd_xattrs):
    _mnt, _, result = odd_xattrs
    result.expect_exit(0)
    for method in (*TAR_METHODS, *LAYER_METHODS):
        by_name = {m.name: m for m in tar_members(result.path(method))}
        for name, value in ODD_XATTRS.items():
            headers = by_name["./file"].pax_headers
            assert headers.get(gnu_keyword(name)) == value.decode("utf-8", "surrogateescape"), (
                f"{method}: {name!r} not stored as GNU tar stores it: {sorted(headers)}"
            )


def test_odd_xattr_names_round_trip_through_gnu_tar(odd_xattrs):
    mnt, work, result = odd_xattrs
    upper = snapshot(mnt.upper)
    assert set(ODD_XATTRS) <= set(upper["file"]["xattrs"]), upper["file"]
    assert_same_tree(upper, snapshot(result.path("copy")), "copy", result.diag)
    for method in TAR_METHODS:
        into = work / f"gnu-{method}"
        gnu_extract(result.path(method), into, *GNU_ALL)
        assert_same_tree(upper, snapshot(into), f"GNU tar -x of {method}", result.diag)


def test_odd_xattr_names_through_bsdtar(odd_xattrs):
    """bsdtar 3.6 does not decode GNU tar's %-escapes: it restores the keyword's spelling."""
    _mnt, work, result = odd_xattrs
    into = work / "bsd"
    bsd_extract(result.path("tar"), into, *BSD_ALL)
    for entry in ("file", "dir"):
        got = {n: os.getxattr(into / entry, n) for n in os.listxattr(into / entry)}
        spelled = {gnu_keyword(n).removeprefix("SCHILY.xattr."): v for n, v in ODD_XATTRS.items()}
        assert got == spelled, f"{entry}: {got}"


# --- 6. mtimes before 1970 with a fraction of a second ---------------------------------------


MTIMES = {
    "minus-half": -500_000_000,
    "minus-1.25": -1_250_000_000,
    "minus-1ns": -1,
    "minus-day-and-3q": -86_400_750_000_000,
    "minus-2": -2_000_000_000,
    "plus-half": 500_000_000,
    "dir-minus-half": -500_000_000,
}


@pytest.fixture(scope="module")
def old_mtimes(hook_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("old-mtimes")
    mnt = Mount(work / "m")
    with mnt.mounted() as merged:
        for name, ns in MTIMES.items():
            path = merged / name
            if name.startswith("dir"):
                path.mkdir()
            else:
                path.write_text(name)
            os.utime(path, ns=(ns, ns))
    return mnt, work, run_all(hook_bin, work, mnt, methods=("copy", *TAR_METHODS))


def test_old_mtimes_in_the_upperdir_and_the_copy(old_mtimes):
    mnt, _, result = old_mtimes
    result.expect_exit(0)
    for name, ns in MTIMES.items():
        assert os.lstat(mnt.upper / name).st_mtime_ns == ns, name
        assert os.lstat(result.path("copy") / name).st_mtime_ns == ns, name


@pytest.mark.parametrize("method", TAR_METHODS)
def test_old_mtimes_through_gnu_tar(old_mtimes, method):
    _mnt, work, result = old_mtimes
    into = work / f"gnu-{method}"
    gnu_extract(result.path(method), into, tolerated="implausibly old time stamp")
    got = {name: os.lstat(into / name).st_mtime_ns for name in MTIMES}
    assert got == MTIMES, result.diag


@pytest.mark.parametrize("method", TAR_METHODS)
def test_old_mtimes_through_tarfile(old_mtimes, method):
    _, _, result = old_mtimes
    by_name = {m.name.removeprefix("./"): m for m in tar_members(result.path(method))}
    got = {name: round(by_name[name].mtime * 1e9) for name in MTIMES}
    assert got == MTIMES, {n: by_name[n].pax_headers.get("mtime") for n in MTIMES}


def libarchive_pax_time(record: str) -> int:
    """How libarchive 3.6 (bsdtar) reads a PAX time: the sign applies to the seconds only."""
    seconds, _, fraction = record.partition(".")
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


def test_old_mtimes_through_bsdtar(old_mtimes):
    """bsdtar restores whole seconds and positive fractions exactly; it reads "-S.F" as
    -S + 0.F, so a fraction before 1970 written as GNU tar writes it comes back off by up
    to 2 s (GNU tar, tarfile and Go read -S.F as -(S.F)). No one record suits both."""
    _mnt, work, result = old_mtimes
    into = work / "bsd"
    bsd_extract(result.path("tar"), into)
    by_name = {m.name.removeprefix("./"): m for m in tar_members(result.path("tar"))}
    for name, ns in MTIMES.items():
        got = os.lstat(into / name).st_mtime_ns
        record = by_name[name].pax_headers.get("mtime")
        if ns % 1_000_000_000 == 0 or ns > 0:
            assert got == ns, (name, record, got)
        else:
            assert record is not None and got == libarchive_pax_time(record), (name, record, got)


# --- 7. POSIX ACLs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acls(hook_bin, tmp_path_factory):
    require_tools()
    work = tmp_path_factory.mktemp("acls")
    mnt = Mount(work / "m")
    (mnt.lower / "image-file").write_text("image\n")
    with mnt.mounted() as merged:
        (merged / "file").write_text("f\n")
        os.chmod(merged / "file", 0o640)
        (merged / "dir").mkdir()
        (merged / "plain").write_text("no acl\n")
        os.chmod(merged / "plain", 0o604)
        setfacl = ["setfacl", "-m"]
        subprocess.run([*setfacl, "u:1234:rw,g:5678:r,m::rw", str(merged / "file")], check=True)
        subprocess.run([*setfacl, "u:1234:rx,g:5678:rwx", str(merged / "dir")], check=True)
        subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx,g:5678:rx,o::-", str(merged / "dir")],
                       check=True)  # fmt: skip
        (merged / "dir" / "inherited").write_text("i\n")
        (merged / "dir" / "sub").mkdir()
        subprocess.run([*setfacl, "u:1234:r", str(merged / "image-file")], check=True)
    return mnt, work, run_all(hook_bin, work, mnt, methods=("copy", *TAR_METHODS))


def test_acls_in_the_copy(acls):
    mnt, _, result = acls
    result.expect_exit(0)
    assert getfacl(result.path("copy")) == getfacl(mnt.upper)
    assert_same_tree(snapshot(mnt.upper), snapshot(result.path("copy")), "copy", result.diag)


def acls_of_the_xattrs(rel: str, info: dict) -> dict:
    """GNU tar --acls without --xattrs restores the POSIX ACLs and no other xattr."""
    return {**info, "xattrs": {k: v for k, v in info["xattrs"].items() if k in ACL_XATTRS}}


READERS = {  # name: (extract, its flags, what it cannot restore)
    "gnu-acls": (gnu_extract, ("--acls",), (acls_of_the_xattrs,)),
    "gnu-xattrs": (gnu_extract, ("--xattrs", "--xattrs-include=*"), ()),
    "gnu-both": (gnu_extract, GNU_ALL, ()),
    "bsdtar-acls": (bsd_extract, ("--acls",), (root_mtime,)),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("method", TAR_METHODS)
def test_acls_restored(acls, method, reader):
    mnt, work, result = acls
    result.expect_exit(0)
    expected = getfacl(mnt.upper)
    listed = "\n".join(expected)
    assert "user:1234:rw-" in listed and "default:group:5678:r-x" in listed, listed
    extract, flags, but = READERS[reader]
    into = work / f"{reader}-{method}"
    extract(result.path(method), into, *flags)
    assert getfacl(into) == expected, result.diag
    assert_same_tree(snapshot(mnt.upper), snapshot(into), f"{reader} of {method}", result.diag,
                     but=but)  # fmt: skip


# --- 9. a destination that refuses an xattr of a regular file ---------------------------------


@contextlib.contextmanager
def mounted_fs(point: Path, *mount_args: str) -> Iterator[Path]:
    point.mkdir(parents=True, exist_ok=True)
    run(["mount", *mount_args, str(point)])
    try:
        yield point
    finally:
        run(["umount", str(point)], check=False)


def refused_user_big(rel: str, info: dict) -> dict:
    """The destination refuses user.big (8000 bytes: more than an ext4 inode of 1 KiB blocks
    holds): the copy is the upperdir without it."""
    return {**info, "xattrs": {k: v for k, v in info["xattrs"].items() if k != "user.big"}}


@pytest.mark.parametrize("dest", ["ext4-enospc", "ramfs"])
def test_copy_warns_about_refused_xattrs_of_files(dest, hook_bin, tmp_path):
    """An 8000-byte xattr does not fit an ext4 inode of 1 KiB blocks (ENOSPC); ramfs has no
    xattrs (EOPNOTSUPP). cp -a and tar -x warn and go on: so does copy."""
    with contextlib.ExitStack() as stack:
        # the upperdir on tmpfs: ext4 itself would refuse the big xattr
        base = stack.enter_context(mounted_fs(tmp_path / "t", "-t", "tmpfs", "-o", "size=20m",
                                              "tmpfs"))  # fmt: skip
        mnt = Mount(base / "m")
        with mnt.mounted() as merged:
            (merged / "big-xattr").write_text("content\n")
            setfattr(merged / "big-xattr", "user.big", b"b" * 8000)
            setfattr(merged / "big-xattr", "user.small", b"s")
            (merged / "dir").mkdir()
            setfattr(merged / "dir", "user.big", b"d" * 8000)
            (merged / "dir" / "inside").write_text("inside\n")
        out = tmp_path / "out"
        if dest == "ext4-enospc":
            require_tools("mkfs.ext4")
            image = tmp_path / "ext4.img"
            with open(image, "wb") as f:
                f.truncate(16 << 20)
            run(["mkfs.ext4", "-q", "-b", "1024", "-O", "^ea_inode", str(image)])
            stack.enter_context(mounted_fs(out, "-o", "loop", str(image)))
        else:
            stack.enter_context(mounted_fs(out, "-t", "ramfs", "ramfs"))
        result = run_all(hook_bin, tmp_path, mnt, methods=("copy",), out=out)
        result.expect_exit(0)
        copy = result.path("copy")
        assert (copy / "big-xattr").read_text() == "content\n"
        assert (copy / "dir" / "inside").read_text() == "inside\n"
        warnings = result.lines("warning")
        assert any("big-xattr" in line for line in warnings), result.diag
        if dest == "ext4-enospc":
            assert os.getxattr(copy / "big-xattr", "user.small") == b"s"
            assert_same_tree(snapshot(mnt.upper), snapshot(copy), "copy", result.diag,
                             but=(refused_user_big,))  # fmt: skip


# --- 10. paths longer than PATH_MAX ------------------------------------------------------------


DEPTH, NAME_LEN = 200, 39


def deep_names() -> list[str]:
    return [f"{i:03d}".ljust(NAME_LEN, "d") for i in range(DEPTH)]


@pytest.fixture(scope="module")
def deep_tree(hook_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("deep")
    mnt = Mount(work / "m")
    with mnt.mounted() as merged:
        fd = os.open(merged, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in deep_names():
                os.mkdir(name, dir_fd=fd)
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
            leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
            os.write(leaf, b"at the bottom\n")
            os.close(leaf)
            os.symlink("leaf", "link", dir_fd=fd)
            os.setxattr(f"/proc/self/fd/{fd}/leaf", "user.deep", b"yes")
        finally:
            os.close(fd)
    depth_bytes = len(str(mnt.upper)) + DEPTH * (NAME_LEN + 1)
    assert depth_bytes > 4096 + 3000, depth_bytes
    return mnt, work, run_all(hook_bin, work, mnt)


def test_deep_tree_every_method_works(deep_tree):
    """oci-layer too, though umoci 0.4.7 and podman 4.3 (containers-storage) both fail to
    apply such a layer ("file name too long"), as they fail on GNU tar's own."""
    _mnt, _, result = deep_tree
    result.expect_exit(0)
    assert sorted(os.listdir(result.out)) == sorted(
        [f"a.{SUFFIXES[m]}" for m in ALL_METHODS] + [f"a.{SUFFIXES[m]}.json" for m in LAYER_METHODS]
    )


def test_deep_tree_copy_equals_the_upperdir(deep_tree):
    mnt, _, result = deep_tree
    assert_same_tree(snapshot(mnt.upper), snapshot(result.path("copy")), "copy", result.diag)


def gnu_listing(archive: Path) -> list[str]:
    """GNU tar's verbose listing, sorted: GNU tar archives a tree in directory order."""
    proc = subprocess.run(["tar", "--numeric-owner", "--full-time", "-tvf", str(archive)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return sorted(proc.stdout.splitlines())


@pytest.mark.parametrize("method", [*TAR_METHODS, *LAYER_METHODS])
def test_deep_tree_tar_lists_as_gnu_tar_own(deep_tree, method):
    """GNU tar 1.34 archives such trees but cannot extract past PATH_MAX ("File name too
    long"): its listing of our archive must equal its listing of its own archive."""
    mnt, work, result = deep_tree
    own = work / "gnu-own.tar"
    if not own.exists():
        subprocess.run(["tar", "--format=pax", "--xattrs", "--xattrs-include=*", "-cf", str(own),
                        "-C", str(mnt.upper), "."], check=True)  # fmt: skip
    assert gnu_listing(result.path(method)) == gnu_listing(own)
    names = {m.name.rstrip("/") for m in tar_members(result.path(method))}
    assert names == {m.name.rstrip("/") for m in tar_members(own)}


def test_deep_tree_through_bsdtar(deep_tree):
    """bsdtar 3.6 extracts every entry past PATH_MAX, but its deferred directory fix-ups
    (mtime) and its symlinks' mtimes fail there: all else is compared."""
    mnt, work, result = deep_tree
    into = work / "bsd"
    bsd_extract(result.path("tar"), into, *BSD_ALL, check=False)
    assert_same_tree(snapshot(mnt.upper), snapshot(into), "bsdtar -x", result.diag,
                     but=(root_mtime, mtimes_past(PATH_MAX - len(str(into)))))  # fmt: skip


PATH_MAX = 4096


def mtimes_past(depth: int) -> Exemption:
    """What bsdtar sets by path, and so cannot past PATH_MAX: the mtimes of directories
    (deferred) and of symlinks whose path is `depth` bytes or more under its root."""

    def dir_and_symlink_mtimes_past_path_max(rel: str, info: dict) -> dict:
        if info["type"] not in ("dir", "symlink") or len(os.fsencode(rel)) + 1 < depth:
            return info
        return {k: v for k, v in info.items() if k != "mtime_ns"}

    return dir_and_symlink_mtimes_past_path_max


# --- 11. sparse files ---------------------------------------------------------------------------


SPARSE_DATA = {0: 4096, GIB: 8192, 2 * GIB - 8192: 8192}  # offset: length: 20 KiB in 2 GiB
# oci-layer has its own, smaller case (sparse_layer): reading a dense 2 GiB layer back costs
# a minute and umoci and podman write the file dense anyway.
SPARSE_METHODS = ("copy", *TAR_METHODS)


def write_sparse(path: Path, size: int, data: dict[int, int]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.truncate(fd, size)
        for offset, length in data.items():
            os.pwrite(fd, os.urandom(length), offset)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def sparse(hook_bin, tmp_path_factory):
    """Everything on a 200 MiB tmpfs: a dense copy of a 2 GiB file cannot fit."""
    work = tmp_path_factory.mktemp("sparse")
    with mounted_fs(work / "t", "-t", "tmpfs", "-o", "size=200m", "tmpfs") as t:
        mnt = Mount(t / "m")
        with mnt.mounted() as merged:
            write_sparse(merged / "sparse.bin", 2 * GIB, SPARSE_DATA)
            write_sparse(merged / "hole-only", GIB, {})
            write_sparse(merged / "tail-hole", 64 << 20, {0: 4096})
            (merged / "dense").write_bytes(os.urandom(10000))
        result = run_all(hook_bin, work, mnt, methods=SPARSE_METHODS, out=t / "out")
        yield mnt, work, result


def test_sparse_every_method_fits_a_small_tmpfs(sparse):
    _, _, result = sparse
    result.expect_exit(0)


def test_sparse_copy_keeps_holes(sparse):
    mnt, _, result = sparse
    copy = result.path("copy")
    for name in ("sparse.bin", "hole-only", "tail-hole"):
        assert os.lstat(copy / name).st_blocks * 512 < (1 << 20), name
    assert_same_tree(snapshot(mnt.upper), snapshot(copy), "copy", result.diag)


@pytest.mark.parametrize("method", TAR_METHODS)
def test_sparse_tar_members_are_pax_sparse_1_0(sparse, method):
    _, _, result = sparse
    assert result.path(method).stat().st_size < (1 << 20), result.path(method).stat()
    by_name = {m.name: m for m in tar_members(result.path(method))}
    for name, size in (("sparse.bin", 2 * GIB), ("hole-only", GIB), ("tail-hole", 64 << 20)):
        headers = by_name[f"./{name}"].pax_headers
        assert (headers.get("GNU.sparse.major"), headers.get("GNU.sparse.minor")) == ("1", "0"), (
            name, headers)  # fmt: skip
        assert headers.get("GNU.sparse.realsize") == str(size), (name, headers)
        assert by_name[f"./{name}"].size == size  # tarfile reads the sparse map


@pytest.mark.parametrize("reader", ["gnu", "bsdtar"])
@pytest.mark.parametrize("method", TAR_METHODS)
def test_sparse_tar_extracts_equal_and_sparse(sparse, method, reader):
    mnt, work, result = sparse
    into = work / f"{reader}-{method}"
    if reader == "gnu":
        gnu_extract(result.path(method), into, "--sparse", *GNU_ALL)
    else:
        bsd_extract(result.path(method), into, *BSD_ALL)
    try:
        blocks = os.lstat(into / "sparse.bin").st_blocks
        assert blocks * 512 < (1 << 20), f"{reader} wrote sparse.bin dense: {blocks} blocks"
        assert_same_tree(snapshot(mnt.upper), snapshot(into), f"{reader} -x of {method}",
                         result.diag, but=(root_mtime,) if reader == "bsdtar" else ())  # fmt: skip
    finally:
        remove_tree(into)


@pytest.fixture(scope="module")
def sparse_layer(hook_bin, tmp_path_factory):
    """A smaller sparse file for the appliers: umoci and podman write it dense (measured:
    both read PAX sparse 1.0 right, and a 2 GiB file costs a minute)."""
    work = tmp_path_factory.mktemp("sparse-layer")
    mnt = Mount(work / "m")
    (mnt.lower / "image.txt").write_text("image\n")
    with mnt.mounted() as merged:
        write_sparse(
            merged / "sparse.bin", 64 << 20, {0: 4096, 32 << 20: 8192, (64 << 20) - 8192: 8192}
        )
        write_sparse(merged / "hole-only", 16 << 20, {})
    return mnt, work, run_all(hook_bin, work, mnt, methods=LAYER_METHODS)


def test_sparse_layer_content_after_apply(sparse_layer, images):
    """Whatever oci-layer writes for a sparse file, umoci and podman get its content."""
    mnt, work, result = sparse_layer
    result.expect_exit(0)
    want = snapshot(mnt.upper).without(lambda rel: rel == ".")  # "/" is the image's
    layout, tag = images.stack(mnt.lower, result.path("oci-layer"), "sparse")
    rootfs = images.umoci_rootfs(layout, tag, work)
    got = snapshot(rootfs).without(lambda rel: rel not in want)
    assert_same_tree(want, got, "umoci unpack", result.diag)
    with images.podman_rootfs(layout, tag) as rootfs:
        got = snapshot(rootfs).without(lambda rel: rel not in want)
        assert_same_tree(want, got, "podman", result.diag)


# --- 12. memory does not grow with the number of directories, nor of closed hardlink groups ----


MEASURE = """import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], input=sys.stdin.buffer.read(), env={}, capture_output=True)
sys.stderr.buffer.write(proc.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(proc.returncode)
"""


def make_dirs(merged: Path, count: int) -> None:
    """`count` directories, 100 per parent."""
    top = os.open(merged, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(0, count, 100):
            os.mkdir(f"p{i}", dir_fd=top)
            fd = os.open(f"p{i}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
            for j in range(min(99, count - i - 1)):
                os.mkdir(f"d{j}", dir_fd=fd)
            os.close(fd)
    finally:
        os.close(top)


def make_link_pairs(merged: Path, count: int, apart: bool) -> None:
    """`count` files with two links each, 100 per directory (so that no directory's names
    weigh): side by side (each group closes at once), or one link under a/ and the other
    under b/ (every group stays open until b/ is walked)."""
    for i in range(count):
        sub = f"p{i // 100}"
        if i % 100 == 0:
            (merged / "a" / sub).mkdir(parents=True)
            (merged / "b" / sub).mkdir(parents=True)
        first = merged / "a" / sub / f"f{i}"
        first.touch()
        os.link(first, merged / ("b" if apart else "a") / sub / f"f{i}{'' if apart else '.l'}")


def peak_rss(hook_bin: Path, work: Path, build, method: str) -> int:
    """Peak RSS (KiB) of one hook run archiving what `build(merged)` made."""
    mnt = Mount(work / "m")
    with mnt.mounted() as merged:
        build(merged)
    annotations = archive_annotations("m", mount_point="/data", archive_to=str(work / "out"),
                                      method=method)  # fmt: skip
    bundle = write_bundle(work / "bundle", [mnt.mount_entry()], annotations)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(hook_bin)], capture_output=True,
                          input=state_json(bundle).encode(), check=False, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert os.path.lexists(work / "out"), proc.stderr.decode()
    return int(proc.stdout.split()[-1])


def test_copy_memory_does_not_grow_with_directories(hook_bin, tmp_path):
    """Peak RSS of copy at 3k and 100k directories, all on a tmpfs (no disk in the time)."""
    with mounted_fs(tmp_path / "t", "-t", "tmpfs", "-o", "size=1g", "tmpfs") as t:
        small = peak_rss(hook_bin, t / "small", lambda m: make_dirs(m, 3_000), "copy")
        large = peak_rss(hook_bin, t / "large", lambda m: make_dirs(m, 100_000), "copy")
    print(f"copy peak RSS: 3k dirs {small} KiB, 100k dirs {large} KiB")
    assert large < 48 * 1024, f"{large} KiB at 100k directories"
    assert large - small < 4 * 1024, f"+{large - small} KiB for 97k more directories"


@pytest.mark.parametrize("method", ["copy", "tar"])
def test_memory_of_hardlink_groups(hook_bin, tmp_path, method):
    """Closed groups cost nothing; a group still waiting for its other links costs its path."""
    rss = {}
    with mounted_fs(tmp_path / "t", "-t", "tmpfs", "-o", "size=1g", "tmpfs") as t:
        for count, apart in ((2_000, False), (30_000, False), (2_000, True), (30_000, True)):
            build = functools.partial(make_link_pairs, count=count, apart=apart)
            rss[count, apart] = peak_rss(hook_bin, t / f"{count}-{apart}", build, method)
    print(f"{method} peak RSS (KiB) by (groups, apart): {rss}")
    closed = rss[30_000, False] - rss[2_000, False]
    assert closed < 4 * 1024, f"+{closed} KiB for 28k more closed groups"
    per_open = (rss[30_000, True] - rss[2_000, True]) * 1024 / 28_000
    assert per_open < 400, f"{per_open:.0f} bytes per open group"


# --- 13. sockets ----------------------------------------------------------------------------------


def test_sockets_kept_in_copy_skipped_with_a_warning_in_tar(hook_bin, tmp_path):
    mnt = Mount(tmp_path / "m")
    with mnt.mounted() as merged:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(merged / "sock"))
        sock.close()
        os.chmod(merged / "sock", 0o640)
        os.chown(merged / "sock", 1234, 5678)
        (merged / "file").write_text("x")
    result = run_all(hook_bin, tmp_path, mnt)
    result.expect_exit(0)
    assert_same_tree(snapshot(mnt.upper), snapshot(result.path("copy")), "copy", result.diag)
    assert stat.S_ISSOCK(os.lstat(result.path("copy") / "sock").st_mode)
    for method in (*TAR_METHODS, *LAYER_METHODS):
        names = [m.name for m in tar_members(result.path(method))]
        assert "./sock" not in names and "./file" in names, names
        named = [line for line in result.lines("warning")
                 if f"archive={archive_name(method)} " in line + " " and "sock" in line]  # fmt: skip
        assert named, f"{method}: no warning names the socket{result.diag}"
    assert not [line for line in result.lines("warning") if "archive=copy " in line + " "]


# --- 14. errors name real paths -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["copy", "tar", "oci-layer"])
def test_destination_full_names_the_entry_and_real_paths(method, hook_bin, tmp_path):
    mnt = Mount(tmp_path / "m")
    with mnt.mounted() as merged:
        (merged / "small").write_text("s\n")
        (merged / "big").write_bytes(os.urandom(3 << 20))
    with mounted_fs(tmp_path / "out", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as out:
        result = run_all(hook_bin, tmp_path, mnt, methods=(method,), out=out)
        result.expect_exit(1)
        assert os.listdir(out) == [], f"left: {os.listdir(out)}"
    errors = result.lines("error")
    assert len(errors) == 1, result.diag
    cause = errors[0].partition(' error="')[2]  # archive_to= is in every line: not that
    assert "No space left on device" in cause, result.diag
    assert str(out) in cause, f"the error names no destination path{result.diag}"
    if method != "oci-layer":  # a compressor fails at a flush, not at an entry
        assert str(mnt.upper / "big") in cause, f"the error names no entry{result.diag}"
