"""The oci-layer methods write real OCI image layers: shown with tools nobody here wrote.

Each test changes a "data image" through a real overlay (mounted here, or a
podman container's image mount), records the merged view the container saw,
lets the hook archive the upperdir with method oci-layer (and oci-layer+zstd),
then stacks the archived layer on the data image and has other tools apply it:

  umoci unpack     applies the layers (whiteouts, opaque dirs, hardlinks,
                   xattrs) and checks each blob's size, digest and diff_id
  skopeo copy      reads the zstd layer and re-compresses it as gzip, since
                   umoci 0.4.7 knows only gzip layers
  podman pull/run  takes the stacked image into containers-storage and mounts
                   it in a container (rootful scenario)

What they unpack must equal the recorded view, entry for entry: type, mode,
owner, size, sha256, link target, hardlink groups, user xattrs. The one
listing script (busybox and getfattr) lists both sides. Beside that, the
layer's members and its <archive-to>.json are checked against image-spec.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import archive_annotations, is_root, state_json, write_bundle
from engines import (
    FUSE_OVERLAYFS,
    TEST_USER,
    Podman,
    build_oci_image,
    build_rootfs,
    busybox_path,
    ensure_fuse_device,
    ensure_user,
    needs_kernel,
    remove_tree,
    require,
    run,
    scratch_dir,
)

HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
REF_NAME = "org.opencontainers.image.ref.name"

# method -> (file name, media type, decompress command)
LAYER_METHODS = {
    "oci-layer": ("layer.tar.gz", "application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
    "oci-layer+zstd": ("layer.tar.zst", "application/vnd.oci.image.layer.v1.tar+zstd", "zstd"),
}

# The container's changes, run as `sh -c CHANGES sh DIR [user-data-opaque]`.
CHANGES = """set -e
cd "$1"
rm del.txt keep/rm-me.txt
rm -r gone
rm -r redo
mkdir -p redo/sub
echo fresh > redo/fresh.txt
rm file-to-dir
mkdir file-to-dir
echo inside > file-to-dir/inside.txt
rm -r dir-to-file
echo now a file > dir-to-file
echo more >> change.txt
chmod 600 mode.txt
chown 1234:5678 owned.txt
echo new > new.txt
ln new.txt new-link.txt
ln -s new.txt sym
ln -s gone dangling
mkdir -p deep/a/b
echo deep > deep/a/b/f.txt
mkfifo fifo
setfattr -n user.note -v hello new.txt
setfattr -n user.note -v dir deep
if [ "$2" = user-data-opaque ]; then setfattr -n user.overlay.opaque -v y keep; fi
"""

# `sh -c LISTING sh DIR`: one line per entry, then the user xattrs.  getfattr by its path:
# busybox 1.37's sh runs its own getfattr applet (no -R, -P, -m, -e) before one on $PATH.
LISTING = r"""cd "$1" || exit 1
busybox find . | busybox sort | while IFS= read -r p; do
  meta=$(busybox stat -c '%f %u %g %s %i %h' "$p")
  if [ -L "$p" ]; then extra=$(busybox readlink "$p")
  elif [ -f "$p" ]; then extra=$(busybox sha256sum "$p" | busybox cut -d' ' -f1)
  else extra=-
  fi
  echo "$p|$meta|$extra"
done
echo '#xattrs'
/bin/getfattr -R -P -h -d -m '^user\.' -e hex . || true
"""

# Members the layer must hold for CHANGES (image-spec's whiteout encoding).
WHITEOUT_MEMBERS = {
    "./.wh.del.txt", "./.wh.gone", "./keep/.wh.rm-me.txt",
    "./redo/.wh..wh..opq", "./file-to-dir/.wh..wh..opq",
}  # fmt: skip


def write_data_tree(root: Path) -> Path:
    """The data image that CHANGES changes.

    NOTE: CHANGES leaves the hardlinked link-a.txt/link-b.txt alone. Written
    to through fuse-overlayfs, both names show the new data in the container
    but only the written name is copied up: the upperdir cannot say more.
    """
    for d in ("keep", "gone/sub", "redo/sub", "dir-to-file", "seeded-opq"):
        (root / d).mkdir(parents=True, exist_ok=True)
    files = {
        "keep/k.txt": "k\n", "keep/rm-me.txt": "rm me\n", "del.txt": "del\n",
        "gone/sub/x.txt": "x\n", "redo/old.txt": "old\n", "redo/sub/y.txt": "y\n",
        "dir-to-file/z.txt": "z\n", "file-to-dir": "f\n", "change.txt": "change\n",
        "mode.txt": "mode\n", "owned.txt": "owned\n", "seeded.txt": "seeded\n",
        "seeded-opq/old.txt": "old\n",
        "link-a.txt": "linked\n",
    }  # fmt: skip
    for name, text in files.items():
        (root / name).write_text(text)
    os.link(root / "link-a.txt", root / "link-b.txt")  # left alone: see NOTE above
    return root


# --- requirements -----------------------------------------------------------------------


def require_tools(*tools: str) -> None:
    require(is_root(), "needs root (overlay mounts, engines)")
    require(busybox_path() is not None, "busybox missing (apt-get install busybox-static)")
    for tool in ("umoci", "skopeo", "getfattr", "setfattr", "gzip", "zstd", *tools):
        require(shutil.which(tool) is not None, f"{tool} not installed")


# --- the listing: what a container sees -------------------------------------------------


@dataclass(frozen=True)
class Item:
    kind: str  # file, dir, symlink, fifo, ...
    mode: str  # octal permissions
    owner: str  # uid:gid
    size: int | None  # None for directories (their size is the filesystem's)
    content: str  # sha256 of a file, target of a symlink, else "-"


KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFIFO: "fifo", stat.S_IFCHR: "char", stat.S_IFBLK: "block"}  # fmt: skip


@dataclass
class Tree:
    items: dict[str, Item] = field(default_factory=dict)
    links: set[frozenset[str]] = field(default_factory=set)  # hardlink groups
    xattrs: dict[str, dict[str, str]] = field(default_factory=dict)


def rel(path: str) -> str:
    return "." if path in (".", "./") else path.removeprefix("./")


def parse_listing(text: str) -> Tree:
    tree = Tree()
    entries, _, xattr_text = text.partition("#xattrs\n")
    inodes: dict[str, set[str]] = {}
    for line in entries.splitlines():
        path, meta, content = line.split("|", 2)
        mode_hex, uid, gid, size, ino, nlink = meta.split()
        mode = int(mode_hex, 16)
        kind = KINDS.get(stat.S_IFMT(mode), hex(mode))
        sized = None if kind == "dir" else int(size)
        item = Item(kind, oct(stat.S_IMODE(mode)), f"{uid}:{gid}", sized, content)
        tree.items[rel(path)] = item
        if kind == "file" and int(nlink) > 1:
            inodes.setdefault(ino, set()).add(rel(path))
    tree.links = {frozenset(paths) for paths in inodes.values() if len(paths) > 1}
    current = None
    for line in xattr_text.splitlines():
        if line.startswith("# file: "):
            current = rel(line[len("# file: ") :])
        elif "=" in line and current is not None:
            name, _, value = line.partition("=")
            tree.xattrs.setdefault(current, {})[name] = value
    return tree


def list_host_tree(root: Path) -> Tree:
    """The listing of a directory on this host: host busybox and getfattr."""
    proc = run(["busybox", "sh", "-c", LISTING, "sh", str(root)], env={"PATH": HOST_PATH})
    return parse_listing(proc.stdout)


def tree_diff(expected: Tree, got: Tree) -> list[str]:
    problems = []
    for path in sorted(expected.items.keys() | got.items.keys()):
        want, have = expected.items.get(path), got.items.get(path)
        if want != have:
            problems.append(f"{path}: expected {want}, got {have}")
    for path in sorted(expected.xattrs.keys() | got.xattrs.keys()):
        want_x, have_x = expected.xattrs.get(path, {}), got.xattrs.get(path, {})
        if want_x != have_x:
            problems.append(f"{path}: expected xattrs {want_x}, got {have_x}")
    if expected.links != got.links:
        problems.append(
            f"hardlinks: expected {sorted(map(sorted, expected.links))}, "
            f"got {sorted(map(sorted, got.links))}"
        )
    return problems


def assert_same_tree(expected: Tree, got: Tree, what: str, diag: str = "") -> None:
    problems = tree_diff(expected, got)
    assert not problems, f"{what} differs from the container's view:\n" + "\n".join(problems) + diag


def assert_changes_seen(view: Tree, diag: str = "", seeded: bool = False) -> None:
    """The recorded view holds CHANGES' work: else comparing with it proves little."""
    gone = {"del.txt", "gone", "keep/rm-me.txt", "redo/old.txt", "redo/sub/y.txt",
            "dir-to-file/z.txt"} | (SEEDED_GONE if seeded else set())  # fmt: skip
    still = sorted(gone & view.items.keys())
    assert not still, f"deleted but still there: {still}{diag}"
    kinds = {"redo/sub": "dir", "file-to-dir": "dir", "dir-to-file": "file", "fifo": "fifo",
             "sym": "symlink", "keep/k.txt": "file", "deep/a/b/f.txt": "file"}  # fmt: skip
    seen = {p: view.items[p].kind for p in kinds if p in view.items}
    assert seen == kinds, f"expected {kinds}, saw {seen}{diag}"
    assert view.items["owned.txt"].owner == "1234:5678", diag
    assert view.items["mode.txt"].mode == "0o600", diag
    assert frozenset({"new.txt", "new-link.txt"}) in view.links, diag
    assert view.xattrs.get("new.txt") == {"user.note": "0x68656c6c6f"}, f"{view.xattrs}{diag}"


# --- the layer and its descriptor ---------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def decompressed(blob: Path, method: str) -> bytes:
    """The layer's tar, decompressed by the gzip or zstd command."""
    tool = LAYER_METHODS[method][2]
    proc = subprocess.run([tool, "-dc", str(blob)], capture_output=True, check=True)
    return proc.stdout


def check_descriptor(blob: Path, method: str, diag: str) -> dict:
    """<archive-to>.json: mediaType, size and digest of the blob, diff_id of its tar."""
    json_path = Path(f"{blob}.json")
    assert blob.is_file() and json_path.is_file(), f"{blob} or {json_path} missing{diag}"
    descriptor = json.loads(json_path.read_text())
    tar_digest = "sha256:" + hashlib.sha256(decompressed(blob, method)).hexdigest()
    assert descriptor == {
        "mediaType": LAYER_METHODS[method][1],
        "size": blob.stat().st_size,
        "digest": sha256_file(blob),
        "diff_id": tar_digest,
    }, f"{json_path} does not describe {blob}{diag}"
    return descriptor


def check_members(blob: Path, method: str, forbidden_xattrs: tuple[str, ...], diag: str,
                  extra_whiteouts: frozenset[str] = frozenset()) -> None:  # fmt: skip
    """image-spec's layer encoding: each path once, whiteouts as empty .wh. files."""
    with tempfile.TemporaryFile() as f:
        f.write(decompressed(blob, method))
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as tar:
            members = tar.getmembers()
    names = [m.name.rstrip("/") or "." for m in members]
    listing = "\n".join(f"  {m.type.decode()} {m.name}" for m in members)
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"paths twice in {blob}: {dupes}\nmembers:\n{listing}{diag}"
    missing = (WHITEOUT_MEMBERS | extra_whiteouts) - set(names)
    assert not missing, f"{blob} lacks {sorted(missing)}\nmembers:\n{listing}{diag}"
    for i, m in enumerate(members):
        base = m.name.rpartition("/")[2]
        assert not (m.ischr() or m.isblk()), f"{m.name}: a device in an OCI layer{diag}"
        assert base != ".wh..opq", f"{m.name}: fuse-overlayfs's marker kept{diag}"
        if base.startswith(".wh."):
            assert m.isreg() and m.size == 0, f"{m.name}: not an empty file\n{listing}{diag}"
        if base == ".wh..wh..opq":
            parent = m.name.rpartition("/")[0]
            before = members[i - 1]
            assert before.isdir() and before.name.rstrip("/") == parent, (
                f"{m.name} does not follow its directory's entry\nmembers:\n{listing}{diag}"
            )
        bad = [
            k for k in m.pax_headers if k.removeprefix("SCHILY.xattr.").startswith(forbidden_xattrs)
        ]
        assert not bad, f"{m.name} keeps overlay-internal xattrs {bad}{diag}"


# --- stacking the layer on the data image --------------------------------------------------


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def put_json_blob(layout: Path, value: dict) -> dict:
    data = json.dumps(value).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(layout, digest).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def add_layer(layout: Path, base: str, tag: str, blob: Path, descriptor: dict) -> None:
    """Image `tag` = image `base` plus the blob as its top layer, as the .json describes it.

    Only the manifest, config and index are written here; the blob is copied
    verbatim and umoci/skopeo check it against the descriptor and diff_id.
    """
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == base)
    manifest = json.loads(blob_path(layout, entry["digest"]).read_text())
    config = json.loads(blob_path(layout, manifest["config"]["digest"]).read_text())
    shutil.copyfile(blob, blob_path(layout, descriptor["digest"]))
    config["rootfs"]["diff_ids"].append(descriptor["diff_id"])
    config.setdefault("history", []).append({"created_by": "archive_overlay oci-layer"})
    manifest["config"].update(put_json_blob(layout, config))
    manifest["layers"].append({k: descriptor[k] for k in ("mediaType", "size", "digest")})
    new_entry = {"mediaType": entry["mediaType"], **put_json_blob(layout, manifest),
                 "annotations": {REF_NAME: tag}}  # fmt: skip
    index["manifests"].append(new_entry)
    (layout / "index.json").write_text(json.dumps(index))


def unpack_stacked(layout: Path, base: str, blob: Path, method: str, descriptor: dict,
                   work: Path) -> Path:  # fmt: skip
    """Stack the layer on `base`, unpack with umoci (zstd: via skopeo); the rootfs."""
    tag = "v2-" + LAYER_METHODS[method][2]
    add_layer(layout, base, tag, blob, descriptor)
    if method == "oci-layer+zstd":  # umoci 0.4.7 refuses zstd layers: skopeo reads it
        gzip_layout = layout.with_name(layout.name + "-as-gzip")  # a new layout: no blob reused
        run(["skopeo", "copy", "--quiet", "--dest-compress-format", "gzip",
             f"oci:{layout}:{tag}", f"oci:{gzip_layout}:{tag}"])  # fmt: skip
        layout = gzip_layout
    bundle = work / f"bundle-{tag}"
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
    return bundle / "rootfs"


def check_layer(blob: Path, method: str, expected: Tree, layout: Path, base: str, work: Path,
                forbidden_xattrs: tuple[str, ...], diag: str,
                extra_whiteouts: frozenset[str] = frozenset()) -> None:  # fmt: skip
    descriptor = check_descriptor(blob, method, diag)
    check_members(blob, method, OVERLAY_XATTRS, diag, extra_whiteouts)
    rootfs = unpack_stacked(layout, base, blob, method, descriptor, work)
    got = list_host_tree(rootfs)
    assert_same_tree(layer_view(expected), got, f"umoci unpack of {base} + {method}", diag)


# A layer never carries these, even where the container set them as data: appliers
# (containers-storage) would take them for overlay markers.
OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")


def layer_view(tree: Tree) -> Tree:
    """What a layer can give back of a container's view: all but overlay-named xattrs."""
    xattrs = {path: {k: v for k, v in names.items() if not k.startswith(OVERLAY_XATTRS)}
              for path, names in tree.xattrs.items()}  # fmt: skip
    return Tree(tree.items, tree.links, {path: x for path, x in xattrs.items() if x})


LEFT_OUT = b'event="xattr left out of the layer: appliers would take it for an overlay marker"'


def layer_annotations(out: Path) -> dict[str, str]:
    annotations: dict[str, str] = {}
    for method, (name, _, tool) in LAYER_METHODS.items():
        annotations |= archive_annotations(
            tool, mount_point="/data", archive_to=str(out / name), method=method
        )
    return annotations


# --- 1. a real overlay, mounted here ---------------------------------------------------------


@dataclass(frozen=True)
class Flavor:
    name: str
    fuse: bool = False
    userxattr: bool = False
    markers: tuple[str, ...] = ("trusted.overlay.",)  # xattrs the layer must not carry
    user_data_opaque: bool = False  # a process sets user.overlay.opaque: user data

    @property
    def seeded(self) -> bool:
        """fuse-overlayfs reads markers that it may write: see seed_fuse_upper."""
        return self.fuse


FLAVORS = [
    Flavor("native", user_data_opaque=True),
    Flavor("native-userxattr", userxattr=True, markers=("user.overlay.",)),
    Flavor("fuse-overlayfs", fuse=True, markers=("trusted.overlay.", "user.fuseoverlayfs.")),
]


@dataclass
class HandMount:
    """lower (the data image), upper, work, merged under root; native or fuse-overlayfs."""

    root: Path
    flavor: Flavor

    def __post_init__(self) -> None:
        for d in ("upper", "work", "merged"):
            (self.root / d).mkdir(parents=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def options(self) -> list[str]:
        opts = [f"lowerdir={self.path('lower')}", f"upperdir={self.path('upper')}",
                f"workdir={self.path('work')}"]  # fmt: skip
        return opts + (["userxattr"] if self.flavor.userxattr else [])

    def mount(self) -> None:
        merged, opts = str(self.path("merged")), ",".join(self.options())
        if self.flavor.fuse:
            run([FUSE_OVERLAYFS, "-o", opts, merged])
        else:
            run(["mount", "-t", "overlay", "overlay", "-o", opts, merged])

    def unmount(self) -> None:
        run(["umount", str(self.path("merged"))], check=False)

    def mount_entry(self) -> dict:
        """As podman writes it into config.json: an overlay, or a bind of the fuse mount."""
        if self.flavor.fuse:
            return {"destination": "/data", "type": "bind", "source": str(self.path("merged")),
                    "options": ["bind", "slave"]}  # fmt: skip
        return {"destination": "/data", "type": "overlay", "source": str(self.path("merged")),
                "options": self.options() + ["private"]}  # fmt: skip


SEEDED_GONE = {"seeded.txt", "seeded-opq/old.txt"}
SEEDED_MEMBERS = frozenset({"./.wh.seeded.txt", "./seeded-opq/.wh..wh..opq"})


def seed_fuse_upper(upper: Path) -> None:
    """Markers fuse-overlayfs writes when it cannot mknod or set xattrs, before mounting.

    A whiteout as an empty file .wh.<name>, an opaque dir as a dir holding an
    empty file .wh..wh..opq and no opaque xattr.
    """
    (upper / ".wh.seeded.txt").touch()
    (upper / "seeded-opq").mkdir()
    (upper / "seeded-opq" / ".wh..wh..opq").touch()
    (upper / "seeded-opq" / "new.txt").write_text("new\n")


@pytest.mark.parametrize("flavor", FLAVORS, ids=lambda f: f.name)
def test_overlay_changes_stack_as_a_layer(flavor: Flavor, tmp_path: Path, run_hook) -> None:
    require_tools(*([FUSE_OVERLAYFS] if flavor.fuse else []))
    mnt = HandMount(tmp_path / "mnt", flavor)
    write_data_tree(mnt.path("lower"))
    layout = tmp_path / "oci"
    build_oci_image(layout, "data", mnt.path("lower"))
    if flavor.seeded:
        seed_fuse_upper(mnt.path("upper"))
    out = tmp_path / "out"
    mnt.mount()
    try:
        opaque_flag = "user-data-opaque" if flavor.user_data_opaque else ""
        run(["sh", "-c", CHANGES, "sh", str(mnt.path("merged")), opaque_flag])
        expected = list_host_tree(mnt.path("merged"))
        assert_changes_seen(expected, seeded=flavor.seeded)
        bundle = write_bundle(tmp_path / "bundle", [mnt.mount_entry()], layer_annotations(out))
        hook = run_hook(state_json(bundle))  # at poststop the overlay is still mounted
    finally:
        mnt.unmount()
    diag = f"\nhook exit {hook.returncode}, stderr:\n{hook.stderr.decode()}"
    assert hook.returncode == 0, diag
    seeded = SEEDED_MEMBERS if flavor.seeded else frozenset()
    for method, (name, _, _) in LAYER_METHODS.items():
        check_layer(out / name, method, expected, layout, "data", tmp_path, flavor.markers, diag,
                    seeded)  # fmt: skip
    if flavor.user_data_opaque:  # the container's own xattr: warned about, left out
        assert expected.xattrs.get("keep") == {"user.overlay.opaque": "0x79"}, expected.xattrs
        assert LEFT_OUT in hook.stderr and b"entry=keep xattr=user.overlay.opaque" in hook.stderr


def test_escaped_overlay_xattr_is_left_out_of_the_layer(tmp_path: Path, run_hook) -> None:
    """A process sets user.overlay.opaque through a userxattr overlay (rootless podman's).

    Linux >= 6.7 stores it escaped as user.overlay.overlay.opaque in the
    upperdir and shows it to the container as user.overlay.opaque, an ordinary
    xattr (the dir is not opaque). In a layer, containers-storage would apply it
    as a marker and hide the image's files under keep/: the hook leaves it out,
    with a warning naming the entry, and the stacked image keeps keep/k.txt.
    """
    require_tools()
    flavor = Flavor("native-userxattr", userxattr=True, markers=("user.overlay.",))
    mnt = HandMount(tmp_path / "mnt", flavor)
    write_data_tree(mnt.path("lower"))
    layout = tmp_path / "oci"
    build_oci_image(layout, "data", mnt.path("lower"))
    out = tmp_path / "out"
    mnt.mount()
    try:
        merged = mnt.path("merged") / "keep"
        proc = run(["setfattr", "-n", "user.overlay.opaque", "-v", "y", str(merged)], check=False)
        needs_kernel(proc.returncode == 0, f"overlayfs refuses user.overlay.* through a "
                     f"userxattr overlay (before 6.7): {proc.stderr.strip()}")  # fmt: skip
        expected = list_host_tree(mnt.path("merged"))
        bundle = write_bundle(tmp_path / "bundle", [mnt.mount_entry()], layer_annotations(out))
        hook = run_hook(state_json(bundle))
    finally:
        mnt.unmount()
    diag = f"\nhook exit {hook.returncode}, stderr:\n{hook.stderr.decode()}"
    assert hook.returncode == 0, diag
    assert expected.xattrs.get("keep") == {"user.overlay.opaque": "0x79"}, expected.xattrs
    assert "keep/k.txt" in expected.items, "the escaped xattr made keep/ opaque?"
    assert LEFT_OUT in hook.stderr and b"entry=keep xattr=user.overlay.opaque" in hook.stderr
    blob = out / "layer.tar.gz"
    descriptor = check_descriptor(blob, "oci-layer", diag)
    rootfs = unpack_stacked(layout, "data", blob, "oci-layer", descriptor, tmp_path)
    got = list_host_tree(rootfs)
    assert_same_tree(layer_view(expected), got, "umoci unpack of data + oci-layer", diag)


def test_fuse_overlayfs_user_overlay_opaque_is_a_marker(tmp_path: Path, run_hook) -> None:
    """fuse-overlayfs owns user.overlay.*: it hides those xattrs and honours user.overlay.opaque.

    A process in a fuse-overlayfs container can set user.overlay.opaque=y:
    the container never sees the xattr, and the dir is opaque on every later
    mount of the upperdir (the running mount's view depends on its cache).
    Put in the upperdir before mounting, the view is deterministic.
    """
    require_tools(FUSE_OVERLAYFS)
    flavor = Flavor("fuse-overlayfs", fuse=True)
    mnt = HandMount(tmp_path / "mnt", flavor)
    (mnt.path("lower") / "keep").mkdir(parents=True)
    (mnt.path("lower") / "keep" / "old.txt").write_text("old\n")
    layout = tmp_path / "oci"
    build_oci_image(layout, "data", mnt.path("lower"))
    (mnt.path("upper") / "keep").mkdir()
    (mnt.path("upper") / "keep" / "new.txt").write_text("new\n")
    os.setxattr(mnt.path("upper") / "keep", "user.overlay.opaque", b"y")
    out = tmp_path / "out"
    mnt.mount()
    try:
        expected = list_host_tree(mnt.path("merged"))
        bundle = write_bundle(tmp_path / "bundle", [mnt.mount_entry()], layer_annotations(out))
        hook = run_hook(state_json(bundle))
    finally:
        mnt.unmount()
    diag = f"\nhook exit {hook.returncode}, stderr:\n{hook.stderr.decode()}"
    assert hook.returncode == 0, diag
    assert "keep/old.txt" not in expected.items and not expected.xattrs, expected
    blob = out / "layer.tar.gz"
    descriptor = check_descriptor(blob, "oci-layer", diag)
    rootfs = unpack_stacked(layout, "data", blob, "oci-layer", descriptor, tmp_path)
    assert_same_tree(expected, list_host_tree(rootfs), "umoci unpack of data + oci-layer", diag)


# --- 2, 3. podman containers ---------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    key: str  # its dir: podman stalls 20 s on a runroot path over 50 characters
    rootless: bool = False
    fuse: bool = False
    markers: tuple[str, ...] = ("trusted.overlay.",)
    user_data_opaque: bool = False
    reload_in_podman: bool = False  # also pull the stacked image into podman and list it


SCENARIOS = [
    Scenario("rootful-native", "rf", user_data_opaque=True, reload_in_podman=True),
    Scenario("rootless-native", "rn", rootless=True, markers=("user.overlay.",)),
    Scenario("rootless-fuse", "rx", rootless=True, fuse=True,
             markers=("trusted.overlay.", "user.fuseoverlayfs.")),
]  # fmt: skip

BB_IMAGE = "localhost/oci-layer-bb"
DATA_IMAGE = "localhost/oci-layer-data"


def copy_with_libraries(binary: str, rootfs: Path) -> None:
    """A dynamically linked host binary and what ldd says it needs, into rootfs."""
    path = shutil.which(binary)
    assert path is not None, f"{binary} missing"
    shutil.copy2(path, rootfs / "bin" / binary)
    for line in run(["ldd", path]).stdout.splitlines():
        lib = next((w for w in line.split() if w.startswith("/")), None)
        if lib is not None:
            dest = rootfs / lib.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(lib, dest)  # the file, not the symlink
            dest.chmod(0o755)


def build_tools_rootfs(dest: Path) -> Path:
    """busybox (its applets as symlinks) plus getfattr and setfattr."""
    build_rootfs(dest)
    for applet in ("find", "sort", "sha256sum", "readlink", "cut", "mkfifo", "chown", "chmod"):
        link = dest / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    for binary in ("getfattr", "setfattr"):
        copy_with_libraries(binary, dest)
    return dest


@pytest.fixture(scope="module")
def oci_base() -> Iterator[Path]:
    """A world-reachable dir with an OCI layout holding the images `bb` and `data`."""
    require_tools("podman", "runc")
    base = scratch_dir("ao-ol-")  # short: see Scenario.key
    base.chmod(0o755)
    try:
        layout = base / "oci"
        build_oci_image(layout, "bb", build_tools_rootfs(base / "rootfs"))
        build_oci_image(layout, "data", write_data_tree(base / "data"))
        yield base
    finally:
        remove_tree(base)


def podman_run_args(annotations: dict[str, str], image: str, rw: bool, script: str,
                    *args: str) -> list[str]:  # fmt: skip
    mount = f"type=image,source={image},destination=/data,rw={str(rw).lower()}"
    flags = ["run", "--rm", "--network", "none", "--pull", "never", "--mount", mount]
    for key, value in annotations.items():
        flags += ["--annotation", f"{key}={value}"]
    return [*flags, BB_IMAGE, "sh", "-c", script, "sh", *args]


def read_log(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as err:
        return f"(no hook log: {err})"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_podman_container_changes_stack_as_a_layer(
    scenario: Scenario, oci_base: Path, hook_bin: Path, tmp_path: Path
) -> None:
    if scenario.rootless:
        require_tools("runuser", "newuidmap", "newgidmap")
    if scenario.fuse:
        require(Path(FUSE_OVERLAYFS).exists() and Path("/dev/fuse").exists(), "no fuse-overlayfs")
        ensure_fuse_device()
    user = ensure_user(TEST_USER) if scenario.rootless else None
    if user is not None:
        proc = run(["runuser", "-u", user.name, "--", str(hook_bin), "--help"], check=False)
        assert proc.returncode == 0, f"{user.name} cannot run the hook {hook_bin}:\n{proc.stderr}"
    root = oci_base / scenario.key
    podman = Podman(root, user=user, fuse=scenario.fuse)
    out, log = root / "out", root / "hook.log"
    try:
        podman.setup()
        out.mkdir()
        if user is not None:
            os.chown(out, user.uid, user.gid)
        podman.install_hook(hook_bin, log)
        podman.load(f"oci:{oci_base / 'oci'}:bb", BB_IMAGE)
        podman.load(f"oci:{oci_base / 'oci'}:data", DATA_IMAGE)
        flag = "user-data-opaque" if scenario.user_data_opaque else ""
        args = podman_run_args(layer_annotations(out), DATA_IMAGE, True,
                               CHANGES + LISTING, "/data", flag)  # fmt: skip
        proc = podman(*args, check=False)
        diag = (f"\n[{scenario.name}] podman exit {proc.returncode}, stderr:\n{proc.stderr}"
                f"--- hook log:\n{read_log(log)}")  # fmt: skip
        assert proc.returncode == 0, diag
        expected = parse_listing(proc.stdout)
        assert_changes_seen(expected, diag)
        layout = root / "stacked"  # podman's own dir: readable where podman reads
        shutil.copytree(oci_base / "oci", layout)
        for method, (name, _, _) in LAYER_METHODS.items():
            check_layer(out / name, method, expected, layout, "data", tmp_path,
                        scenario.markers, diag)  # fmt: skip
        if scenario.user_data_opaque:
            assert expected.xattrs.get("keep") == {"user.overlay.opaque": "0x79"}, diag
        if scenario.reload_in_podman:
            check_in_podman(podman, layout, expected, diag)
    finally:
        podman.teardown()


def check_in_podman(podman: Podman, layout: Path, expected: Tree, diag: str) -> None:
    """podman pulls the stacked images (gzip and zstd) and shows /data as the container left it."""
    run(["chmod", "-R", "a+rX", str(layout)])
    for tag in ("v2-gzip", "v2-zstd"):
        image = f"localhost/oci-layer-data:{tag}"
        podman.load(f"oci:{layout}:{tag}", image)
        proc = podman(*podman_run_args({}, image, False, LISTING, "/data"))
        got = parse_listing(proc.stdout)
        assert_same_tree(layer_view(expected), got, f"podman's {image}", diag)
