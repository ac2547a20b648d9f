"""merge_layers: revisions the hook committed, merged into one layer, are the same filesystem.

Each test builds a chain the real way. A data image (two layers written by umoci:
the data tree, then a whiteout) sits in an OCI layout; then each run changes a
real overlay, whose lowers are the earlier runs' upperdirs on the data image as
`umoci unpack` gives it, and the installed hook commits the upperdir (method
oci-image, image-base pinned to the previous revision).  tests/squash_driver.py,
run by the hook's venv, merges every layer the hook wrote into one and tags the
data image's layers plus that one.  umoci unpack and podman (`pull oci:` and
`image mount`, rootful) apply the chain and the squashed image; both must give
the same tree, entry by entry: type, mode, owner, mtime in ns, size, sha256,
symlink target, device numbers, xattrs, hardlink groups.  The merged layer's
members are checked too (each path once, whiteouts only where the data image
has the path, an opaque marker right after its directory).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import archive_annotations, requires_root, state_json, write_bundle
from engines import Podman, build_oci_image, remove_tree, run, scratch_dir
from test_oci_layer import require_tools

pytestmark = requires_root

DRIVER = Path(__file__).resolve().parent / "squash_driver.py"
REF_NAME = "org.opencontainers.image.ref.name"
TMP_MARK = ".archive_overlay-tmp-"
NOT_LISTED_XATTRS = ("trusted.overlay.", "security.")  # an overlay's own, the host's labels

# The data image: (path, content), None for a directory; then hardlinks.
DATA_TREE = {
    "base-file": "base file\n", "base-dir/a": "a\n", "base-dir/b/c": "c\n",
    "redo/old": "old\n", "redo/sub/y": "y\n", "redo2/old": "old 2\n",
    "f-d": "file, to become a dir\n", "d-f/z": "z\n", "keep/k": "k\n",
    "gone-in-base": "deleted by the data image's second layer\n", "hl-a": "linked\n",
    "meta": "metadata\n", "empty-dir": None,
}  # fmt: skip
DATA_LINKS = {"hl-b": "hl-a"}


# --- the listing --------------------------------------------------------------------------


class Listing:
    """A tree as a container sees it: per path its type and metadata, and hardlink groups."""

    def __init__(self, root: Path) -> None:
        self.entries: dict[str, tuple] = {}
        inodes: dict[int, set[str]] = {}
        for path in [root, *sorted(self.walk(root))]:
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            self.entries[rel] = self.entry(path, st)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, set()).add(rel)
        self.links = {frozenset(names) for names in inodes.values() if len(names) > 1}

    @staticmethod
    def walk(root: Path) -> Iterator[Path]:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                yield Path(dirpath) / name

    @staticmethod
    def entry(path: Path, st: os.stat_result) -> tuple:
        kind = stat.S_IFMT(st.st_mode)
        if stat.S_ISREG(kind):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(kind):
            content = os.readlink(path)
        elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
            content = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        else:
            content = "-"
        names = os.listxattr(path, follow_symlinks=False)
        xattrs = tuple(sorted(
            (n, os.getxattr(path, n, follow_symlinks=False).hex())
            for n in names if not n.startswith(NOT_LISTED_XATTRS)
        ))  # fmt: skip
        size = None if stat.S_ISDIR(kind) else st.st_size
        return (stat.filemode(st.st_mode), f"{st.st_uid}:{st.st_gid}", st.st_mtime_ns, size,
                content, xattrs)  # fmt: skip

    def differences(self, other: Listing) -> list[str]:
        problems = [
            f"{path}: {self.entries.get(path)} != {other.entries.get(path)}"
            for path in sorted(self.entries.keys() | other.entries.keys())
            if self.entries.get(path) != other.entries.get(path)
        ]
        if self.links != other.links:
            problems.append(f"hardlinks: {sorted(map(sorted, self.links))} != "
                            f"{sorted(map(sorted, other.links))}")  # fmt: skip
        return problems


# --- a chain of revisions --------------------------------------------------------------------


def write_data_tree(root: Path) -> Path:
    for name, text in DATA_TREE.items():
        path = root / name
        if text is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name, target in DATA_LINKS.items():
        os.link(root / target, root / name)
    return root


class Chain:
    """A layout with the data image `base`, then revisions r1, r2, ... each committed by
    the installed hook from a real overlay's upperdir."""

    def __init__(self, root: Path, hook_bin: Path) -> None:
        self.root = root
        self.hook_bin = hook_bin
        self.layout = root / "img"
        build_oci_image(self.layout, "base", write_data_tree(root / "data"))
        run(["umoci", "insert", "--image", f"{self.layout}:base", "--whiteout", "/gone-in-base"])
        run(["umoci", "unpack", "--image", f"{self.layout}:base", str(root / "base")])
        self.lowers = ["base/rootfs"]  # relative to root: short mount options
        self.tags = ["base"]

    def commit(self, script: str) -> None:
        """Run `script` (sh, in the merged directory) on an overlay of everything so far,
        then the hook commits its upperdir as the next revision."""
        n = len(self.tags)
        run_dir = self.root / f"r{n}"
        for name in ("u", "w", "m"):
            (run_dir / name).mkdir(parents=True)
        lowerdir = ":".join(reversed(self.lowers))
        options = [f"lowerdir={lowerdir}", f"upperdir={run_dir}/u", f"workdir={run_dir}/w"]
        # util-linux 2.39+ (Debian 13) mounts with fsconfig(2), which refuses an option value
        # of 256 bytes or more (a lowerdir of 40-odd layers); mount(2) takes a page of them.
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(options),
                        str(run_dir / "m")], cwd=self.root, check=True,
                       env={**os.environ, "LIBMOUNT_FORCE_MOUNT2": "always"})  # fmt: skip
        try:
            run(["sh", "-c", 'set -e\ncd "$1"\n' + script, "sh", str(run_dir / "m")])
            annotations = archive_annotations(
                "data", mount_point="/data", archive_to=str(self.layout), method="oci-image",
                image_tag=f"r{n}", image_base=self.tags[-1],
            )  # fmt: skip
            mount = {"destination": "/data", "type": "overlay", "source": str(run_dir / "m"),
                     "options": options}  # fmt: skip
            bundle = write_bundle(run_dir / "bundle", [mount], annotations)
            proc = subprocess.run([str(self.hook_bin)], input=state_json(bundle).encode(),
                                  env={}, capture_output=True, check=False)  # fmt: skip
            assert proc.returncode == 0, proc.stderr.decode()
        finally:
            run(["umount", str(run_dir / "m")], check=False)
        self.lowers.append(f"r{n}/u")
        self.tags.append(f"r{n}")

    def squash(self, tag: str = "squashed", zstd: bool = False) -> dict:
        """The hook's layers merged by squash_driver.py into one on top of the data image."""
        cmd = [str(self.hook_bin.parent / "python"), str(DRIVER), str(self.layout),
               self.tags[-1], "base", tag] + (["--zstd"] if zstd else [])  # fmt: skip
        proc = run(cmd, timeout=600)
        return json.loads(proc.stdout)

    def umoci_view(self, tag: str) -> Listing:
        bundle = self.root / f"umoci-{tag}"
        run(["umoci", "unpack", "--image", f"{self.layout}:{tag}", str(bundle)], timeout=600)
        return Listing(bundle / "rootfs")

    def members(self, descriptor: dict) -> list[tarfile.TarInfo]:
        """The merged layer's members, read by tarfile from `gzip -dc` or `zstd -dc`."""
        blob = self.layout / "blobs" / "sha256" / descriptor["digest"].removeprefix("sha256:")
        tool = "zstd" if descriptor["mediaType"].endswith("zstd") else "gzip"
        data = subprocess.run([tool, "-dc", str(blob)], capture_output=True, check=True).stdout
        assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["diff_id"]
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            return tar.getmembers()


def member_names(members: list[tarfile.TarInfo]) -> list[str]:
    return [m.name.removeprefix("./").rstrip("/") or "." for m in members]


def check_members(members: list[tarfile.TarInfo]) -> list[str]:
    """image-spec's rules: each path once, parents before children, an opaque marker right
    after its directory, whiteouts empty files; hardlinks after their target."""
    names = member_names(members)
    assert len(names) == len(set(names)), f"a path twice: {names}"
    seen: set[str] = set()
    for i, (m, name) in enumerate(zip(members, names)):
        parent = os.path.dirname(name) or "."
        assert name == "." or parent in seen, f"{name} before its directory: {names}"
        base = os.path.basename(name)
        if base.startswith(".wh."):
            assert m.isreg() and m.size == 0, f"{name}: not an empty file"
        if base == ".wh..wh..opq":
            assert names[i - 1] == parent and members[i - 1].isdir(), f"{name} not after {parent}"
        if m.islnk():
            target = m.linkname.removeprefix("./")
            assert target in seen, f"{name} links to {target}, not written before it"
        seen.add(name)
    return names


def assert_same(chain: Listing, squashed: Listing, what: str) -> None:
    problems = chain.differences(squashed)
    assert not problems, f"{what}: the chain and the squashed image differ:\n" + "\n".join(problems)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    require_tools("podman")
    root = scratch_dir("ao-sqp-")
    podman = Podman(root / "p")
    try:
        podman.setup()
        yield podman
    finally:
        podman.teardown()
        remove_tree(root)


@pytest.fixture
def chain(hook_bin: Path) -> Iterator[Chain]:
    require_tools()
    root = scratch_dir("ao-sq-")  # podman's oci: references take only short plain names
    try:
        yield Chain(root, hook_bin)
    finally:
        remove_tree(root)


def podman_view(podman: Podman, layout: Path, tag: str) -> Listing:
    """containers-storage applies the image's layers; its mounted rootfs, listed.  The
    root's mtime is left out: it is when podman made the top layer's directory (two
    pulls of one image differ), not what a layer says."""
    image_id = podman("pull", "--quiet", f"oci:{layout}:{tag}").stdout.split()[-1]
    path = podman("image", "mount", image_id).stdout.strip()
    try:
        listing = Listing(Path(path))
        mode, owner, _, *rest = listing.entries["."]
        listing.entries["."] = (mode, owner, None, *rest)
        return listing
    finally:
        podman("image", "unmount", "--force", image_id, check=False)
        podman("rmi", "--force", image_id, check=False)


def squashed_equals_chain(chain: Chain, podman: Podman) -> tuple[Listing, list[str]]:
    """Squash, check the layer's members, compare umoci's and podman's views of the chain
    and of the squashed image; the chain's view and the member names."""
    result = chain.squash()
    names = check_members(chain.members(result["descriptor"]))
    view = chain.umoci_view(chain.tags[-1])
    assert_same(view, chain.umoci_view("squashed"), "umoci unpack")
    assert_same(podman_view(podman, chain.layout, chain.tags[-1]),
                podman_view(podman, chain.layout, "squashed"), "podman image mount")  # fmt: skip
    return view, names


# --- the cases -------------------------------------------------------------------------------------


def test_deleted_files_and_dirs_leave_whiteouts_only_for_what_is_below(chain, podman) -> None:
    chain.commit("""
echo new > new-file; mkdir -p new-dir/sub; echo x > new-dir/sub/x
echo back > gone-in-base
rm base-file base-dir/a
""")
    chain.commit("""
rm new-file; rm -r new-dir gone-in-base base-dir
rm keep/k
""")
    view, names = squashed_equals_chain(chain, podman)
    for path in ("new-file", "new-dir", "gone-in-base", "base-file", "base-dir", "keep/k"):
        assert path not in view.entries, f"{path} should be deleted in the chain"
    assert {".wh.base-file", ".wh.base-dir", "keep/.wh.k"} <= set(names), names
    # Nothing below has them (gone-in-base: the data image's own whiteout), and a
    # whiteout under a deleted directory is covered by that directory's.
    for name in (".wh.new-file", ".wh.new-dir", ".wh.gone-in-base", "base-dir/.wh.a"):
        assert name not in names, f"{name} in the merged layer: {names}"


def test_dir_deleted_and_recreated_is_opaque_over_what_is_below(chain, podman) -> None:
    chain.commit("""
rm -r redo; mkdir redo; echo fresh > redo/fresh; echo same name > redo/old
rm -r redo2
echo n > new-in-keep; mkdir keep/sub; echo s > keep/sub/s
""")
    # redo2 comes back in a later run: its layer has no opaque marker (the overlay
    # had nothing of redo2 below to hide), the merged layer needs one.
    chain.commit("""
mkdir redo2; echo again > redo2/again
echo more > redo/more; rm redo/old
rm -r keep/sub; mkdir keep/sub; echo t > keep/sub/t
""")
    view, names = squashed_equals_chain(chain, podman)
    assert "redo/old" not in view.entries and "redo/sub" not in view.entries
    assert "redo2/old" not in view.entries and "redo2/again" in view.entries
    assert "redo/.wh..wh..opq" in names and "redo2/.wh..wh..opq" in names, names
    assert "redo/.wh.old" not in names, f"a whiteout under an opaque directory: {names}"
    # keep/sub was made within the merged runs: nothing below to hide.
    assert "keep/sub/.wh..wh..opq" not in names and "keep/.wh..wh..opq" not in names, names


def test_file_replaced_by_a_dir_and_back(chain, podman) -> None:
    chain.commit("""
rm f-d; mkdir f-d; echo in > f-d/in
rm -r d-f; echo now a file > d-f
""")
    chain.commit("""
rm -r f-d; echo a file again > f-d
rm d-f; mkdir d-f; echo x > d-f/x
""")
    view, names = squashed_equals_chain(chain, podman)
    assert view.entries["f-d"][0].startswith("-") and view.entries["d-f"][0].startswith("d")
    assert "d-f/z" not in view.entries and "d-f/x" in view.entries
    assert "d-f/.wh..wh..opq" in names and "f-d/in" not in names, names


def test_hardlinks_across_layers_rewrites_and_deleted_data_holder(chain, podman) -> None:
    chain.commit("""
echo group > g1; ln g1 g2; ln g1 g3
echo holder > d1; ln d1 d2
echo early > early
chmod 600 hl-a
""")
    chain.commit("""
echo rewritten > g2
rm d1
ln early late
""")
    view, _names = squashed_equals_chain(chain, podman)
    # go-containerregistry #2002: g2 was written alone; g1 and g3 keep the data together.
    assert frozenset({"g1", "g3"}) in view.links and "g2" not in {n for g in view.links for n in g}
    assert view.entries["g1"][4] != view.entries["g2"][4]
    # #977: the name that held the data is gone, the data stays under d2.
    assert "d1" not in view.entries and view.entries["d2"][3] == len("holder\n")
    assert frozenset({"early", "late"}) in view.links
    # the data image's hl-a/hl-b: hl-a copied up alone, so no longer linked to hl-b
    assert not any("hl-a" in group for group in view.links)


def test_newest_owner_mode_xattrs_and_mtime(chain, podman) -> None:
    chain.commit("""
echo m > m; chown 1:2 m; chmod 640 m; setfattr -n user.a -v first m
setfattr -n user.gone -v x m
touch -d '2001-02-03 04:05:06.123456789' m
mkdir d; chmod 700 d; setfattr -n user.d -v dir d; echo f > d/f
chown 7:8 meta
""")
    chain.commit("""
chown 1234:5678 m; chmod 4755 m; setfattr -n user.a -v second m; setfattr -x user.gone m
setfattr -n trusted.t -v trusted m
touch -d '2011-12-13 14:15:16.987654321' m
chmod 750 d; chown 3:4 d; setfattr -n user.d -v newer d
touch -d '1999-01-01 00:00:00.5' d
chmod 444 meta; touch -d '2020-02-02 02:02:02.000000002' meta
""")
    view, _ = squashed_equals_chain(chain, podman)
    mode, owner, mtime, _, _, xattrs = view.entries["m"]
    assert (mode, owner, mtime) == ("-rwsr-xr-x", "1234:5678", 1323785716987654321)
    assert dict(xattrs) == {"user.a": b"second".hex(), "trusted.t": b"trusted".hex()}
    assert view.entries["d"][:3] == ("drwxr-x---", "3:4", 915148800500000000)
    assert view.entries["meta"][2] == 1580608922000000002


def test_symlinks_fifos_and_devices(chain, podman) -> None:
    chain.commit("""
ln -s base-file sym; ln -s nowhere dangling; ln -s keep dirsym
mkfifo fifo; mknod chr c 1 3; mknod blk b 7 0
mknod gone-dev c 1 5
""")
    chain.commit("""
rm sym; ln -s keep/k sym
rm gone-dev; mkfifo gone-dev
rm fifo; mknod fifo c 1 7
chown -h 5:6 dangling
""")
    view, _ = squashed_equals_chain(chain, podman)
    assert view.entries["sym"][4] == "keep/k" and view.entries["dangling"][1] == "5:6"
    assert view.entries["chr"][0].startswith("c") and view.entries["chr"][4] == "1:3"
    assert view.entries["blk"][0].startswith("b") and view.entries["blk"][4] == "7:0"
    assert view.entries["fifo"][4] == "1:7" and view.entries["gone-dev"][0].startswith("p")


# --- long chains, many files: the same tree, in bounded memory -------------------------------

MAX_RSS_KIB = 64 << 10


def long_chain_run(i: int) -> str:
    """Run i of a long chain: every kind of change, touching what earlier runs made."""
    return f"""
echo {i} > f{i}; mkdir -p d{i % 7}; echo {i} > d{i % 7}/x{i}
rm -f f{i - 3} d{(i - 2) % 7}/x{i - 2}
echo {i} >> log; touch -d '@{1_000_000_000 + i}.{i:09d}' log
rm -rf churn; mkdir churn; echo {i} > churn/c{i}
ln -f f{i} link{i % 3}
if [ -e group ]; then echo {i} > group; else echo 0 > group; ln group group-2; fi
chmod {600 + i % 2 * 44} log; chown {i}:{i + 1} f{i}; setfattr -n user.run -v {i} d{i % 7}
"""


def test_long_chain_squashes_to_the_same_tree_in_bounded_memory(chain, podman) -> None:
    for i in range(1, 61):
        chain.commit(long_chain_run(i))
    result = chain.squash()
    assert result["maxrss_kib"] <= MAX_RSS_KIB, f"peak RSS {result['maxrss_kib']} KiB"
    names = check_members(chain.members(result["descriptor"]))
    view = chain.umoci_view(chain.tags[-1])
    assert view.entries["log"][2] == 1_000_000_060_000000060 and "f57" not in view.entries
    assert_same(view, chain.umoci_view("squashed"), "umoci unpack")
    assert_same(podman_view(podman, chain.layout, chain.tags[-1]),
                podman_view(podman, chain.layout, "squashed"), "podman image mount")  # fmt: skip
    assert "churn/.wh..wh..opq" not in names  # churn was never below
    again = chain.squash("squashed-again")
    assert again["descriptor"] == result["descriptor"], "the same chain, another layer"
    check_no_temporaries(chain.layout)


def test_a_merged_layer_of_many_files(chain, podman) -> None:
    chain.commit("mkdir many; cd many; seq 1 30000 | sed 's/^/file-/' | xargs touch")
    chain.commit("cd many; seq 1 2 30000 | sed 's/^/file-/' | xargs rm; echo data > file-2")
    chain.commit("rm -r base-dir; cd many; seq 2 4 30000 | sed 's/^/file-/' | xargs chmod 600")
    result = chain.squash()
    assert result["maxrss_kib"] <= MAX_RSS_KIB, f"peak RSS {result['maxrss_kib']} KiB"
    assert result["entries"] == 1 + 1 + 1 + 15000, result  # root, many/, .wh.base-dir, files
    view = chain.umoci_view(chain.tags[-1])
    assert len([p for p in view.entries if p.startswith("many/")]) == 15000
    assert_same(view, chain.umoci_view("squashed"), "umoci unpack")
    check_no_temporaries(chain.layout)


def check_no_temporaries(layout: Path) -> None:
    """Nothing left but the layout's files; nothing in blobs/sha256 but digests."""
    left = [p.name for p in layout.iterdir() if p.name not in ("blobs", "index.json",
                                                                "oci-layout", "index.lock")]  # fmt: skip
    assert left == [], f"left in the layout: {left}"
    blobs = [p.name for p in (layout / "blobs" / "sha256").iterdir()]
    assert all(len(n) == 64 and set(n) <= set("0123456789abcdef") for n in blobs), blobs


# --- bad layers: one error naming the layer and the entry ------------------------------------------


def tar_layer(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member(name: str, data: bytes = b"", link: str | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    if link is not None:
        info.type, info.linkname = tarfile.LNKTYPE, link
    return info, data


def add_blob_layer(chain: Chain, blob: bytes, media_type: str, diff_id: str) -> dict:
    """A revision `bad` = the data image + this blob as its top layer (written as is)."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    (chain.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(blob)
    index = json.loads((chain.layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"][REF_NAME] == "base")
    blobs = chain.layout / "blobs" / "sha256"
    manifest = json.loads((blobs / entry["digest"].removeprefix("sha256:")).read_text())
    manifest["layers"].append({"mediaType": media_type, "digest": digest, "size": len(blob)})
    data = json.dumps(manifest).encode()
    (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    index["manifests"].append({"mediaType": entry["mediaType"], "size": len(data),
                               "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                               "annotations": {REF_NAME: "bad"}})  # fmt: skip
    (chain.layout / "index.json").write_text(json.dumps(index))
    chain.tags.append("bad")
    return {"digest": digest, "diff_id": diff_id}


GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def gzipped(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, mtime=0)


@pytest.mark.parametrize(
    "case", ["truncated", "corrupt", "digest", "hardlink", "hardlink-below", "media-type"]
)
def test_bad_layer_fails_with_one_line_naming_layer_and_entry(chain, case) -> None:
    files = [member("./", b""), member("./a", b"a" * 100_000), member("./b", b"b" * 10)]
    files[0][0].type = tarfile.DIRTYPE
    target = {"hardlink": "./nowhere", "hardlink-below": "./base-file"}.get(case, "./a")
    tar = tar_layer(files + [member("./c", link=target)])
    blob, media_type = gzipped(tar), GZIP_LAYER
    if case == "truncated":
        blob = blob[: len(blob) // 2]
    elif case == "corrupt":
        blob = blob[:200] + bytes(b ^ 0x55 for b in blob[200:260]) + blob[260:]
    elif case == "media-type":
        media_type = "application/vnd.oci.image.layer.v1.tar+bzip2"
    layer = add_blob_layer(chain, blob, media_type, "sha256:" + hashlib.sha256(tar).hexdigest())
    if case == "digest":  # the blob changed after its descriptor was written
        path = chain.layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        path.write_bytes(gzipped(tar_layer(files)))
    before = sorted(p.name for p in (chain.layout / "blobs" / "sha256").iterdir())
    proc = subprocess.run(
        [str(chain.hook_bin.parent / "python"), str(DRIVER), str(chain.layout), "bad", "base",
         "squashed"], capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == "", proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert layer["digest"] in lines[0], lines[0]
    expected = {
        "truncated": "is corrupt or truncated at member ./", "corrupt": "is corrupt or truncated",
        "digest": "does not match its digest", "hardlink": "member ./c is a hardlink to nowhere",
        "hardlink-below": "member ./c is a hardlink to base-file, which no merged layer has",
        "media-type": "tar+bzip2",
    }[case]  # fmt: skip
    assert expected in lines[0], lines[0]
    assert sorted(p.name for p in (chain.layout / "blobs" / "sha256").iterdir()) == before
    check_no_temporaries(chain.layout)


# --- layers other tools wrote: GNU tar, bsdtar; plain, gzip and zstd --------------------------------

LAYER_MEDIA_TYPES = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "docker": "application/vnd.docker.image.rootfs.diff.tar.gzip",
}


def add_tar_layer(chain: Chain, tar: bytes, compression: str) -> None:
    """The next revision: the last one plus this tar (compressed by gzip or zstd) on top."""
    compress = {"tar": None, "gzip": ["gzip", "-n"], "docker": ["gzip", "-n"], "zstd": ["zstd"]}
    blob = tar
    if compress[compression]:
        blob = subprocess.run(compress[compression], input=tar, capture_output=True,
                              check=True).stdout  # fmt: skip
    blobs = chain.layout / "blobs" / "sha256"
    digest = hashlib.sha256(blob).hexdigest()
    (blobs / digest).write_bytes(blob)
    index = json.loads((chain.layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"].get(REF_NAME) == chain.tags[-1])
    manifest = json.loads((blobs / entry["digest"].removeprefix("sha256:")).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].removeprefix("sha256:")).read_text())
    config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(tar).hexdigest())
    config.setdefault("history", []).append({"created_by": f"test: a {compression} layer"})
    data = json.dumps(config).encode()
    (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    manifest["config"].update(digest="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data))
    manifest["layers"].append({"mediaType": LAYER_MEDIA_TYPES[compression],
                               "digest": "sha256:" + digest, "size": len(blob)})  # fmt: skip
    data = json.dumps(manifest).encode()
    (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    tag = f"r{len(chain.tags)}"
    index["manifests"].append({"mediaType": entry["mediaType"], "size": len(data),
                               "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                               "annotations": {REF_NAME: tag}})  # fmt: skip
    (chain.layout / "index.json").write_text(json.dumps(index))
    chain.tags.append(tag)


def tar_of(chain: Chain, name: str, script: str, tar_cmd: list[str]) -> bytes:
    """A directory made by `script` (sh), archived by tar_cmd (run in it, writing to stdout)."""
    src = chain.root / f"src-{name}"
    src.mkdir()
    run(["sh", "-c", 'set -e\ncd "$1"\n' + script, "sh", str(src)])
    return subprocess.run(tar_cmd, cwd=src, capture_output=True, check=True).stdout


LONG = "long-" + "x" * 110
FOREIGN_A = f"""
mkdir -p {LONG} base-dir; echo in a long dir > {LONG}/file
ln -s {"t" * 150} longsym; echo one > hl; ln hl {"l" * 120}
echo rewritten > base-dir/a; echo big ids > big-ids; chown 3000000:3000001 big-ids
touch -d '2001-01-01 00:00:00' base-dir
"""
FOREIGN_B = f"""
mkdir -p {"p" * 60}/{"q" * 60} base-dir; echo split by ustar > {"p" * 60}/{"q" * 60}/file
touch .wh.longsym base-dir/.wh.b; echo plain > plain
"""
FOREIGN_C = f"""
touch .wh.{LONG}
mkdir redo; touch redo/.wh..wh..opq; echo new > redo/new; mkfifo fifo
echo ns > ns; touch -d '2002-02-02 02:02:02.123456789' ns; setfattr -n user.x -v y ns
"""


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_layers_gnu_tar_and_bsdtar_wrote_merge_too(chain, podman, compression) -> None:
    """GNU tar's long names (L, K) and base-256 ids, ustar's prefix, bsdtar's PAX; plain,
    gzip, Docker and zstd layers; the merged layer compressed with gzip or zstd."""
    require_tools("bsdtar")
    gnu = ["tar", "--format=gnu", "--numeric-owner", "-cf", "-", "."]
    ustar = ["tar", "--format=ustar", "--numeric-owner", "-cf", "-", "."]
    pax = ["bsdtar", "--format=pax", "--numeric-owner", "--xattrs", "-cf", "-", "."]
    first = "docker" if compression == "zstd" else "gzip"  # umoci 0.4.7 takes no Docker type
    add_tar_layer(chain, tar_of(chain, "a", FOREIGN_A, gnu), first)
    add_tar_layer(chain, tar_of(chain, "b", FOREIGN_B, ustar), "tar")
    add_tar_layer(chain, tar_of(chain, "c", FOREIGN_C, pax), compression)
    result = chain.squash(zstd=compression == "zstd")
    assert result["descriptor"]["mediaType"] == LAYER_MEDIA_TYPES[compression]
    names = check_members(chain.members(result["descriptor"]))
    assert "base-dir/.wh.b" in names, names  # the data image has base-dir/b
    assert f".wh.{LONG}" not in names and ".wh.longsym" not in names, names  # never below
    assert "redo/.wh..wh..opq" in names, names
    views = [podman_view(podman, chain.layout, tag) for tag in (chain.tags[-1], "squashed")]
    if compression == "gzip":  # umoci 0.4.7 reads no zstd layer
        views += [chain.umoci_view(tag) for tag in (chain.tags[-1], "squashed")]
    for chain_view, squashed_view in zip(views[::2], views[1::2]):
        assert_same(chain_view, squashed_view, "podman or umoci")
    view = views[0]
    assert view.entries[f"{'p' * 60}/{'q' * 60}/file"][3] == len("split by ustar\n")
    assert view.entries["big-ids"][1] == "3000000:3000001"
    assert (
        LONG not in view.entries
        and "longsym" not in view.entries
        and "redo/old" not in view.entries
    )
    assert frozenset({"hl", "l" * 120}) in view.links
    assert view.entries["ns"][2] == 1012615322123456789 and view.entries["fifo"][0][0] == "p"


# --- temporaries ------------------------------------------------------------------------------------


def test_sigkill_mid_merge_leaves_only_a_stale_temporary_the_sweep_removes(chain) -> None:
    """The index lives in a flock'ed temporary in the layout's top directory: while the
    merge runs it is there (and live: not stale); killed, it is stale and the sweep of
    stale temporaries removes it.  blobs/sha256 never holds anything but digests."""
    import signal
    import time

    chain.commit("mkdir many; cd many; seq 1 20000 | sed 's/^/file-/' | xargs touch")
    chain.commit("cd many; seq 1 3 20000 | sed 's/^/file-/' | xargs rm")
    python = str(chain.hook_bin.parent / "python")
    proc = subprocess.Popen([python, str(DRIVER), str(chain.layout), chain.tags[-1], "base",
                             "squashed"], stdout=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    index = []
    while not index and proc.poll() is None and time.monotonic() < deadline:
        index = [p for p in chain.layout.iterdir() if p.name.startswith(".merge-index")]
        time.sleep(0.01)
    assert index, "no index temporary seen in the layout's top directory"
    proc.send_signal(signal.SIGSTOP)  # mid-merge, held there
    sweep = ("import os, sys, archive_overlay as ao; fd = os.open(sys.argv[1], os.O_RDONLY);"
             " ao.remove_stale_temporaries(fd, None, sys.argv[1])")  # fmt: skip
    run([python, "-c", sweep, str(chain.layout)])
    assert index[0].exists(), "the sweep took a live merge's index"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert index[0].exists()
    blobs = [p.name for p in (chain.layout / "blobs" / "sha256").iterdir()]
    assert all(len(n) == 64 for n in blobs), blobs
    run([python, "-c", sweep, str(chain.layout)])
    left = [p.name for p in chain.layout.iterdir() if p.name.startswith(".merge-index")]
    assert left == [], f"stale index temporaries not swept: {left}"
