"""The hook on real overlay mounts: faithful archives in every method, inputs, exit statuses.

Each test changes files through a real overlayfs mount, runs the installed hook
with a piped state JSON, and compares what it wrote with the upperdir with
tests/trees.py's one strict comparison (every field of every entry, xattrs,
hardlink groups).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import (
    PREFIX,
    REPO,
    Overlay,
    archive_annotations,
    project_version,
    requires_root,
    state_json,
    write_bundle,
)
from engines import require
from trees import assert_same_tree, pax_mtime_ns, snapshot, sockets

pytestmark = requires_root

LONG_NAME = "n" * 150
NON_UTF8 = os.fsdecode(b"caf\xe9-\xff")
TAR_METHODS = ["tar", "tar.gz", "tar.zst"]


# --- building an upperdir with every kind of change ------------------------


def populate_lower(lower: Path) -> None:
    (lower / "etc").mkdir()
    (lower / "etc" / "config").write_text("original\n")
    (lower / "gone-file").write_text("deleted by the container\n")
    (lower / "gone-dir" / "sub").mkdir(parents=True)
    (lower / "gone-dir" / "sub" / "x").write_text("x")
    (lower / "recreated").mkdir()
    (lower / "recreated" / "old").write_text("old content\n")
    (lower / "kept").write_text("untouched\n")


def make_changes(merged: Path) -> None:
    """What a container might do to its data mount."""
    (merged / "gone-file").unlink()
    subprocess.run(["rm", "-rf", str(merged / "gone-dir")], check=True)
    subprocess.run(["rm", "-rf", str(merged / "recreated")], check=True)
    (merged / "recreated").mkdir()  # deleted and recreated: an opaque directory
    (merged / "recreated" / "new").write_text("new content\n")
    with open(merged / "etc" / "config", "a") as f:  # copied up, then changed
        f.write("changed\n")
    (merged / "empty").touch()
    (merged / "large").write_bytes(os.urandom(3 << 20) + b"\0" * (2 << 20))
    (merged / "data").mkdir()
    (merged / "data" / "hard-a").write_text("linked\n")
    os.link(merged / "data" / "hard-a", merged / "data" / "hard-b")
    os.link(merged / "data" / "hard-a", merged / "hard-c")
    os.symlink("/etc/shadow", merged / "abs-link")
    os.symlink("../kept", merged / "data" / "rel-link")
    os.symlink("does/not/exist", merged / "dangling")
    os.symlink("/etc", merged / "host-dir-link")
    owned = merged / "owned"
    owned.write_text("odd owner\n")
    os.chown(owned, 1234, 5678)
    setuid = merged / "setuid"
    setuid.write_text("#!/bin/sh\n")
    os.chown(setuid, 4321, 8765)
    os.chmod(setuid, 0o4755)  # after chown: chown clears setuid
    os.chmod(merged / "data", 0o1777)
    os.mkfifo(merged / "fifo")
    os.mknod(merged / "blockdev", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.setxattr(merged / "etc" / "config", "user.checksum", b"abc\x00\xff")
    os.setxattr(merged / "data", "user.note", b"a directory xattr")
    deep = merged / "deep" / ("d" * 60) / ("e" * 60) / LONG_NAME
    deep.mkdir(parents=True)
    (deep / LONG_NAME).write_text("long path\n")
    (merged / NON_UTF8).write_text("not utf-8 name\n")
    os.utime(merged / "kept", ns=(1_000_000_123, 1_500_000_000_987_654_321))


@pytest.fixture
def changed_overlay(make_overlay) -> Overlay:
    ovl = make_overlay()
    populate_lower(ovl.lower)
    ovl.mount()
    make_changes(ovl.merged)
    ovl.unmount()  # as at poststop: the container's processes are gone
    return ovl


# --- reading archives -----------------------------------------------------


def extract(archive: Path, method: str, into: Path) -> None:
    into.mkdir()
    compression = {"tar": [], "tar.gz": ["-z"], "tar.zst": ["--zstd"]}[method]
    cmd = ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xp", *compression]
    result = subprocess.run(
        [*cmd, "-f", str(archive), "-C", str(into)], check=False, capture_output=True
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b"", result.stderr.decode()  # GNU tar reads it without a warning


# --- running the hook ------------------------------------------------------


def hook_input(tmp_path: Path, mounts: list[dict], annotations: dict[str, str]) -> str:
    bundle = write_bundle(tmp_path / "bundle", mounts, annotations)
    return state_json(bundle)


def archive_of(run_hook, tmp_path: Path, ovl: Overlay, method: str, **extra: str):
    archive_to = tmp_path / "out" / f"archive.{method}"
    annotations = archive_annotations(
        "data", mount_point="/data", archive_to=str(archive_to), method=method, **extra
    )
    result = run_hook(hook_input(tmp_path, [ovl.mount_entry()], annotations))
    assert result.returncode == 0, result.stderr.decode()
    return archive_to, result


# --- copy ------------------------------------------------------------------


def test_copy_is_equal_to_the_upperdir(changed_overlay, run_hook, tmp_path):
    archive_to, result = archive_of(run_hook, tmp_path, changed_overlay, "copy")
    assert_same_tree(snapshot(changed_overlay.upper), snapshot(archive_to), "the copy")
    assert b'event="archive written"' in result.stderr
    assert b"Traceback" not in result.stderr


def test_copy_keeps_whiteouts_and_opaque_markers(changed_overlay, run_hook, tmp_path):
    archive_to, _ = archive_of(run_hook, tmp_path, changed_overlay, "copy")
    for name in ("gone-file", "gone-dir"):
        st = os.lstat(archive_to / name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, name
    assert os.getxattr(archive_to / "recreated", "trusted.overlay.opaque") == b"y"
    assert (archive_to / "recreated" / "new").read_text() == "new content\n"
    assert not (archive_to / "recreated" / "old").exists()


@pytest.mark.parametrize("method", ["copy", "tar"])
def test_sockets_kept_by_copy_and_skipped_by_tar_with_a_warning(
    make_overlay, run_hook, tmp_path, method
):
    ovl = make_overlay()
    ovl.mount()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(ovl.merged / "sock"))
    sock.close()
    os.chmod(ovl.merged / "sock", 0o741)
    os.chown(ovl.merged / "sock", 1234, 5678, follow_symlinks=False)
    (ovl.merged / "file").write_text("x")
    ovl.unmount()
    archive_to, result = archive_of(run_hook, tmp_path, ovl, method)
    assert result.returncode == 0, result.stderr
    if method == "copy":  # as cp -a does: a socket inode with the same mode and owner
        st, orig = os.lstat(archive_to / "sock"), os.lstat(ovl.upper / "sock")
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_mode, st.st_uid, st.st_gid) == (orig.st_mode, orig.st_uid, orig.st_gid)
        assert_same_tree(snapshot(ovl.upper), snapshot(archive_to), "the copy")
        assert b"socket skipped" not in result.stderr
    else:  # a tar cannot hold a socket: GNU tar skips it too
        out = subprocess.run(
            ["tar", "-tf", str(archive_to)], capture_output=True, text=True, check=True
        )
        assert out.stdout.split() == ["./", "./file"]
        assert b"socket skipped" in result.stderr and b"entry=sock" in result.stderr
        extract(archive_to, method, tmp_path / "extracted")
        assert_same_tree(snapshot(ovl.upper), snapshot(tmp_path / "extracted"),
                         "the extracted tar", but=(sockets,))  # fmt: skip


def test_copy_replaces_an_existing_archive_whole(changed_overlay, run_hook, tmp_path):
    old = tmp_path / "out" / "archive.copy"
    (old / "stale-dir").mkdir(parents=True)
    (old / "stale-file").write_text("from an earlier run")
    archive_to, _ = archive_of(run_hook, tmp_path, changed_overlay, "copy")
    assert archive_to == old
    assert_same_tree(snapshot(changed_overlay.upper), snapshot(archive_to), "the copy")
    assert [p.name for p in archive_to.parent.iterdir()] == ["archive.copy"]


# --- tar, tar.gz, tar.zst --------------------------------------------------


@pytest.mark.parametrize("method", TAR_METHODS)
def test_tar_extracts_to_the_upperdir(changed_overlay, run_hook, tmp_path, method):
    archive_to, _ = archive_of(run_hook, tmp_path, changed_overlay, method)
    extract(archive_to, method, tmp_path / "extracted")
    assert_same_tree(
        snapshot(changed_overlay.upper), snapshot(tmp_path / "extracted"), "the extracted tar"
    )


@pytest.mark.parametrize("method", TAR_METHODS)
def test_tar_members(changed_overlay, run_hook, tmp_path, method):
    archive_to, _ = archive_of(run_hook, tmp_path, changed_overlay, method)
    members = read_members(archive_to, method)
    names = [m.name for m in members]
    assert names[0] == "./" or names[0] == "."
    raw_names = raw_member_names(archive_to, method)
    assert raw_names[0] == "./"
    assert all(n.startswith("./") for n in raw_names)
    assert "./data/" in raw_names  # directories end in a slash
    assert len(names) == len(set(names))
    by_name = {m.name: m for m in members}
    for whiteout in ("./gone-file", "./gone-dir"):  # each its own char 0/0, never a link
        m = by_name[whiteout]
        assert m.ischr() and (m.devmajor, m.devminor) == (0, 0)
    assert by_name["./abs-link"].issym() and by_name["./abs-link"].linkname == "/etc/shadow"
    assert by_name["./dangling"].linkname == "does/not/exist"
    links = [m for m in members if m.islnk()]
    assert {m.linkname for m in links} == {"./data/hard-a"}
    assert by_name["./owned"].uid == 1234 and by_name["./owned"].gid == 5678
    assert by_name["./setuid"].mode == 0o4755
    assert by_name["./fifo"].isfifo()
    assert by_name["./recreated"].pax_headers["SCHILY.xattr.trusted.overlay.opaque"] == "y"
    assert by_name["./kept"].pax_headers["mtime"] == "1500000000.987654321"


def read_members(archive: Path, method: str) -> list[tarfile.TarInfo]:
    if method == "tar.zst":
        data = subprocess.run(["zstd", "-dc", str(archive)], capture_output=True, check=True)
        out = archive.with_suffix(".plain")
        out.write_bytes(data.stdout)
        archive = out
    with tarfile.open(archive, errors="surrogateescape") as tf:
        return tf.getmembers()


def raw_member_names(archive: Path, method: str) -> list[str]:
    """Member names as GNU tar lists them (tarfile strips a directory's slash)."""
    compression = {"tar": [], "tar.gz": ["-z"], "tar.zst": ["--zstd"]}[method]
    out = subprocess.run(
        ["tar", "-t", *compression, "-f", str(archive)], check=False, capture_output=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.decode("utf-8", "surrogateescape").splitlines()


def test_tar_gz_is_one_standard_gzip_stream(changed_overlay, run_hook, tmp_path):
    archive_to, _ = archive_of(run_hook, tmp_path, changed_overlay, "tar.gz")
    subprocess.run(["gzip", "-t", str(archive_to)], check=True)
    assert archive_to.read_bytes()[:2] == b"\x1f\x8b"


@pytest.mark.parametrize("level", ["0", "3"])
def test_compression_level(changed_overlay, run_hook, tmp_path, level):
    archive_to, _ = archive_of(
        run_hook, tmp_path, changed_overlay, "tar.gz", compression_level=level
    )
    extract(archive_to, "tar.gz", tmp_path / "extracted")
    assert_same_tree(
        snapshot(changed_overlay.upper), snapshot(tmp_path / "extracted"), "the extracted tar"
    )


@pytest.mark.parametrize(
    ("owner", "ids"), [("1000:2000", (1000, 2000)), ("42", (42, 0)), ("0:0", (0, 0))]
)
def test_tar_content_owner(changed_overlay, run_hook, tmp_path, owner, ids):
    archive_to, _ = archive_of(
        run_hook, tmp_path, changed_overlay, "tar.gz", tar_content_owner=owner
    )
    for m in read_members(archive_to, "tar.gz"):
        assert (m.uid, m.gid, m.uname, m.gname) == (*ids, "", ""), m.name


@pytest.mark.parametrize(
    ("arg", "value", "message"),
    [
        ("tar-content-owner", "-1", b"invalid tar-content-owner"),
        ("tar-content-owner", "a:b", b"invalid tar-content-owner"),
        ("tar-content-owner", "1:2:3", b"invalid tar-content-owner"),
        ("tar-content-owner", "1.5", b"invalid tar-content-owner"),
        ("tar-content-owner", "", b"invalid tar-content-owner"),
        ("tar-content-owner", "99999999999", b"invalid tar-content-owner"),
        ("method", "tar.gzip", b"unknown method 'tar.gzip'"),
        ("method", "", b"unknown method"),
        ("mount-poin", "/data", b"unknown archive argument 'mount-poin'"),
        ("compression-level", "4", b"compression-level 4 out of range for method tar.gz (0-3)"),
        ("compression-level", "-1", b"invalid compression-level"),
        ("compression-level", "high", b"invalid compression-level"),
        ("image-tag", "data", b"image-tag is only for oci-image, not method tar.gz"),
    ],
)
def test_an_annotation_that_cannot_be_honoured_fails_its_archive(
    changed_overlay, run_hook, tmp_path, arg, value, message
):
    """Not written (the user asked for something else), one error line naming the archive
    and the annotation, exit 1; the container's valid archives are still written."""
    out = tmp_path / "out"
    bad = {**archive_annotations("bad", mount_point="/data", archive_to=str(out / "bad"),
                                 method="tar.gz"), f"{PREFIX}bad.{arg}": value}  # fmt: skip
    good = archive_annotations("good", mount_point="/data", archive_to=str(out / "good"))
    result = run_hook(hook_input(tmp_path, [changed_overlay.mount_entry()], {**bad, **good}))
    assert result.returncode == 1, result.stderr.decode()
    errors = [line for line in result.stderr.splitlines() if b"level=error" in line]
    assert len(errors) == 1, result.stderr.decode()
    assert b"archive=bad " in errors[0] and message in errors[0], errors[0]
    assert f"annotation={PREFIX}bad.{arg} ".encode() in errors[0], errors[0]
    assert not (out / "bad").exists()
    assert_same_tree(snapshot(changed_overlay.upper), snapshot(out / "good"), "the good copy")


@pytest.mark.parametrize(("given", "missing"), [("mount-point", "archive-to"),
                                                ("archive-to", "mount-point")])  # fmt: skip
def test_an_archive_with_only_one_of_the_required_args_fails(run_hook, tmp_path, given, missing):
    annotations = {f"{PREFIX}half.{given}": str(tmp_path / "x")}
    result = run_hook(hook_input(tmp_path, [], annotations))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and b"level=error" in lines[0], result.stderr.decode()
    assert f"annotation={PREFIX}half.{missing} ".encode() in lines[0]
    assert f"no {missing}".encode() in lines[0] and b"archive=half " in lines[0]


# --- oci-layer (its consumers are proven in test_oci_layer.py) --------------


def test_oci_layer_encoding(changed_overlay, run_hook, tmp_path):
    archive_to, _ = archive_of(run_hook, tmp_path, changed_overlay, "oci-layer")
    members = read_members(archive_to, "tar.gz")
    by_name = {m.name: m for m in members}
    assert by_name["./.wh.gone-file"].isreg() and by_name["./.wh.gone-file"].size == 0
    assert "./.wh.gone-dir" in by_name and "./gone-dir" not in by_name
    names = [m.name for m in members]
    assert names.index("./recreated/.wh..wh..opq") == names.index("./recreated") + 1
    assert len(names) == len(set(names))
    assert not any("overlay" in k for m in members for k in m.pax_headers)
    assert by_name["./etc/config"].pax_headers["SCHILY.xattr.user.checksum"]
    # every member's time is the upperdir entry's, to the nanosecond; a `.wh.NAME` marker's
    # is the time of the whiteout it stands for (the opaque marker aside)
    times = {m.name: pax_mtime_ns(m) for m in members if ".wh..wh..opq" not in m.name}
    upper = os.fsencode(changed_overlay.upper)
    on_disk = {
        name: os.lstat(os.path.join(upper, os.fsencode(name[2:].replace(".wh.", "")))).st_mtime_ns
        for name in times
    }
    assert times == on_disk and "./.wh.gone-file" in times
    assert times["./kept"] == 1_500_000_000_987_654_321
    descriptor = json.loads(Path(f"{archive_to}.json").read_text())
    blob = archive_to.read_bytes()
    assert descriptor["size"] == len(blob)
    assert descriptor["digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()
    plain = subprocess.run(["gzip", "-dc", str(archive_to)], capture_output=True, check=True)
    assert descriptor["diff_id"] == "sha256:" + hashlib.sha256(plain.stdout).hexdigest()
    assert descriptor["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"


# --- finding the upperdir --------------------------------------------------


def test_bind_of_a_native_overlay_is_resolved_from_mountinfo(changed_overlay, run_hook, tmp_path):
    changed_overlay.mount()
    bind = {
        "destination": "/data",
        "type": "bind",
        "source": str(changed_overlay.merged),
        "options": ["bind"],
    }
    archive_to = tmp_path / "out" / "copy"
    annotations = archive_annotations("d", mount_point="/data", archive_to=str(archive_to))
    result = run_hook(hook_input(tmp_path, [bind], annotations), "--log-level=debug")
    assert result.returncode == 0, result.stderr.decode()
    assert_same_tree(snapshot(changed_overlay.upper), snapshot(archive_to), "the copy")
    resolved = f'event="overlay mount found in mountinfo" source={changed_overlay.merged}'
    assert resolved in result.stderr.decode()


def test_bind_of_fuse_overlayfs_is_resolved_from_its_process(make_overlay, run_hook, tmp_path):
    fuse = Path("/usr/bin/fuse-overlayfs")
    require(fuse.exists(), "fuse-overlayfs is not installed")
    ovl = make_overlay()
    (ovl.lower / "old").write_text("old")
    opts = ",".join(ovl.options())
    subprocess.run([str(fuse), "-o", opts, str(ovl.merged)], check=True)
    try:
        (ovl.merged / "new").write_text("new")
        (ovl.merged / "old").unlink()
        bind = {
            "destination": "/data",
            "type": "bind",
            "source": str(ovl.merged),
            "options": ["bind", "slave"],
        }
        archive_to = tmp_path / "out" / "archive.tar"
        annotations = archive_annotations(
            "d", mount_point="/data", archive_to=str(archive_to), method="tar"
        )
        result = run_hook(hook_input(tmp_path, [bind], annotations), "--log-level=trace")
    finally:
        subprocess.run(["umount", str(ovl.merged)], check=False)
    assert result.returncode == 0, result.stderr.decode()
    log = result.stderr.decode()
    assert f'event="bind source served by the mount program" source={ovl.merged} pid=' in log
    assert f'argv="{fuse} -o {opts} {ovl.merged}"' in log
    assert "markers=trusted.overlay.,user.overlay.,user.fuseoverlayfs." in log
    names = {m.name: m for m in read_members(archive_to, "tar")}
    assert names["./new"].isfile()
    assert names["./old"].ischr() or "./.wh.old" in names


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        (
            {
                "destination": "/data",
                "type": "overlay",
                "source": "overlay",
                "options": ["lowerdir=/a:/b"],
            },
            b"no upperdir",
        ),
        ({"destination": "/data", "type": "tmpfs", "source": "tmpfs"}, b"not overlay"),
        (
            {"destination": "/data", "type": "bind", "source": "/nonexistent-mount"},
            b"neither served by a running",
        ),
        (
            {"destination": "/elsewhere", "type": "overlay", "source": "overlay"},
            b"no mount at /data",
        ),
    ],
)
def test_mounts_without_an_upperdir_fail_clearly(run_hook, tmp_path, mount, message):
    archive_to = tmp_path / "out" / "x"
    annotations = archive_annotations("d", mount_point="/data", archive_to=str(archive_to))
    result = run_hook(hook_input(tmp_path, [mount], annotations))
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if b"level=error" in line]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr.decode()
    assert b"archive=d" in error_lines[0] and str(archive_to).encode() in error_lines[0]
    assert not archive_to.exists()


# --- annotations -----------------------------------------------------------


def parse(annotations: dict[str, str]):
    """The archives that will be written; "refused" for those whose annotations cannot be."""
    sys.path.insert(0, str(REPO))
    import archive_overlay

    return {
        a.name: "refused" if a.refused else (a.mount_point, a.archive_to, a.method, a.owner)
        for a in archive_overlay.parse_archives(annotations)
    }


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        (
            {f"{PREFIX}a.mount-point": "/d", f"{PREFIX}a.archive-to": "/x"},
            {"a": ("/d", "/x", "copy", None)},
        ),
        ({f"{PREFIX}a.mount-point": "/d"}, {"a": "refused"}),  # no archive-to
        ({f"{PREFIX}a.archive-to": "/x"}, {"a": "refused"}),  # no mount-point
        (
            {
                f"{PREFIX}a.mount-point": "/d",
                f"{PREFIX}a.archive-to": "/x",
                f"{PREFIX}a.method": "zip",
            },
            {"a": "refused"},
        ),
        (
            {
                f"{PREFIX}a.mount-point": "/d",
                f"{PREFIX}a.archive-to": "/x",
                f"{PREFIX}a.method": "tar.gz",
                f"{PREFIX}a.tar-content-owner": "7",
            },
            {"a": ("/d", "/x", "tar.gz", (7, 0))},
        ),
        (
            {
                f"{PREFIX}a.mount-point": "/d",
                f"{PREFIX}a.archive-to": "/x",
                f"{PREFIX}a.tar-content-owner": "1:2:3",
                f"{PREFIX}b.mount-point": "/d",
                f"{PREFIX}b.archive-to": "/x",
                f"{PREFIX}b.bogus": "1",
            },
            {"a": "refused", "b": "refused"},
        ),
        (
            {
                f"{PREFIX}a.mount-point": "/d",
                f"{PREFIX}a.archive-to": "/x",
                f"{PREFIX}b.mount-point": "/d",
                f"{PREFIX}b.archive-to": "/y",
            },
            {"a": ("/d", "/x", "copy", None), "b": ("/d", "/y", "copy", None)},
        ),
        (
            {
                f"{PREFIX}nodots": "/d",
                f"{PREFIX}a.b.c": "/x",
                f"{PREFIX}.mount-point": "/d",
                "other.annotation": "1",
            },
            {"nodots": "refused", "a": "refused", "": "refused"},
        ),
        ({"other.annotation": "1", "com.launchplatform.other.a.mount-point": "/d"}, {}),
    ],
)
def test_annotation_parsing(annotations, expected):
    assert parse(annotations) == expected


def test_state_annotations_win_over_config(changed_overlay, run_hook, tmp_path):
    config_to, state_to = tmp_path / "from-config", tmp_path / "from-state"
    annotations = archive_annotations("d", mount_point="/data", archive_to=str(config_to))
    bundle = write_bundle(tmp_path / "bundle", [changed_overlay.mount_entry()], annotations)
    state_annotations = archive_annotations("d", archive_to=str(state_to))
    result = run_hook(state_json(bundle, state_annotations))
    assert result.returncode == 0, result.stderr.decode()
    assert state_to.is_dir() and not config_to.exists()


def test_two_archive_names_on_one_mount_are_both_written(changed_overlay, run_hook, tmp_path):
    out = tmp_path / "out"
    annotations = {
        **archive_annotations("a", mount_point="/data", archive_to=str(out / "a")),
        **archive_annotations(
            "b", mount_point="/data/", archive_to=str(out / "b.tgz"), method="tar.gz"
        ),
    }
    result = run_hook(hook_input(tmp_path, [changed_overlay.mount_entry()], annotations))
    assert result.returncode == 0, result.stderr.decode()
    assert (out / "a").is_dir() and (out / "b.tgz").is_file()


def test_every_archive_is_attempted_after_a_failure(changed_overlay, run_hook, tmp_path):
    out = tmp_path / "out"
    annotations = {
        **archive_annotations("a-bad", mount_point="/missing", archive_to=str(out / "bad")),
        **archive_annotations(
            "b-good",
            mount_point="/data",
            archive_to=str(out / "good"),
            success=str(out / "good.done"),
        ),
        **archive_annotations("c-bad", mount_point="/data", archive_to="relative/path"),
    }
    result = run_hook(hook_input(tmp_path, [changed_overlay.mount_entry()], annotations))
    assert result.returncode == 1
    assert (out / "good").is_dir() and (out / "good.done").exists()
    errors = [line for line in result.stderr.splitlines() if b"level=error" in line]
    assert len(errors) == 2 and b"archive=a-bad" in errors[0] and b"archive=c-bad" in errors[1]


def test_success_file_only_after_the_archive(changed_overlay, run_hook, tmp_path):
    done = tmp_path / "flags" / "done"
    archive_to, _ = archive_of(run_hook, tmp_path, changed_overlay, "tar.gz", success=str(done))
    assert done.exists() and done.stat().st_size == 0
    assert done.stat().st_mtime_ns >= archive_to.stat().st_mtime_ns


def test_missing_parent_directories_are_created(changed_overlay, run_hook, tmp_path):
    archive_to = tmp_path / "a" / "b" / "c" / "archive"
    annotations = archive_annotations("d", mount_point="/data", archive_to=str(archive_to))
    result = run_hook(hook_input(tmp_path, [changed_overlay.mount_entry()], annotations))
    assert result.returncode == 0, result.stderr.decode()
    assert_same_tree(snapshot(changed_overlay.upper), snapshot(archive_to), "the copy")


# --- exit statuses and messages ----------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"", b"no OCI state JSON"),
        (b"not json", b"not valid JSON"),
        (b"[1, 2]", b"not a JSON object"),
        (b'{"id": "x"}', b"no bundle"),
        (b'{"bundle": 5}', b"no bundle"),
        (b'{"bundle": "/nonexistent-bundle"}', b"cannot read the bundle's config.json"),
        (b"\xff\xfe{}", b"not valid JSON"),
        (b"[" * 100000, b"not valid JSON"),
    ],
)
def test_unusable_input_exits_2(run_hook, stdin, message):
    result = run_hook(stdin)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr.decode()
    assert b"Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    if b"config.json" in message:  # the path named once, not again after the cause
        assert result.stderr.count(b"/nonexistent-bundle/config.json") == 1, result.stderr


def test_config_json_not_json_exits_2(run_hook, tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    result = run_hook(state_json(tmp_path))
    assert result.returncode == 2 and b"not valid JSON" in result.stderr


def test_no_archives_is_success_and_logged(run_hook, tmp_path):
    result = run_hook(hook_input(tmp_path, [], {"unrelated": "1"}))
    assert result.returncode == 0
    assert b"no archive asked for" in result.stderr


# --- logging, command line, packaging ----------------------------------------


def test_log_file_and_levels(changed_overlay, run_hook, tmp_path):
    log_file = tmp_path / "hook.log"
    annotations = archive_annotations("d", mount_point="/data", archive_to=str(tmp_path / "o"))
    stdin = hook_input(tmp_path, [changed_overlay.mount_entry()], annotations)
    result = run_hook(stdin, "--log-file", str(log_file))
    assert result.returncode == 0
    line = log_file.read_text().splitlines()[-1]
    for field in (
        "archive=d",
        "mount_point=/data",
        "upperdir=",
        "archive_to=",
        "method=copy",
        "entries=",
        "bytes=",
        "seconds=",
    ):
        assert field in line
    quiet = run_hook(stdin, "--log-level", "error")
    assert quiet.returncode == 0 and quiet.stderr == b""
    trace = run_hook(stdin, "--log-level=trace")
    assert b"level=debug" in trace.stderr


@pytest.mark.parametrize(
    "level", ["trace", "debug", "info", "warn", "warning", "error", "fatal", "panic", "INFO"]
)
def test_go_hook_log_levels_are_accepted(run_hook, tmp_path, level):
    result = run_hook(hook_input(tmp_path, [], {}), f"--log-level={level}")
    assert result.returncode == 0, result.stderr.decode()


def hook_with_own_dev(hook_bin: Path, stdin: str, dev_log: Path | None, *args: str):
    """The hook in a mount namespace whose /dev is a fresh tmpfs: /dev/log is ours or absent."""
    link = f"ln -s {dev_log} /dev/log && " if dev_log else ""
    script = f"mount -t tmpfs none /dev && {link}exec {hook_bin} --syslog {' '.join(args)}"
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        input=stdin.encode(),
        check=False,
        capture_output=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def test_syslog_without_a_socket_warns_once(hook_bin, tmp_path):
    result = hook_with_own_dev(hook_bin, hook_input(tmp_path, [], {}), None)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.count(b"no syslog socket") == 1
    assert b"no archive asked for" in result.stderr  # and it goes on


def test_syslog_receives_the_records(hook_bin, tmp_path):
    """A real datagram socket as /dev/log receives the same records, with the ident."""
    sock_path = tmp_path / "log.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    try:
        server.settimeout(10)
        result = hook_with_own_dev(hook_bin, hook_input(tmp_path, [], {}), sock_path)
        assert result.returncode == 0, result.stderr.decode()
        record = server.recv(65536)
    finally:
        server.close()
    assert b"archive_overlay[" in record and b"no archive asked for" in record
    assert b"no syslog socket" not in result.stderr


@pytest.mark.parametrize("flag", ["--version", "-v"])  # -v: the Go hook's short flag
def test_version_flags(hook_bin, flag):
    version = subprocess.run([str(hook_bin), flag], check=False, capture_output=True, text=True)
    assert version.returncode == 0 and "archive_overlay, version" in version.stdout


def test_extra_arguments_are_ignored_with_a_warning(changed_overlay, run_hook, tmp_path):
    """As the Go hook did: a stray word in a hooks.d file's args must not stop the archives."""
    archive_to = tmp_path / "out"
    annotations = archive_annotations("d", mount_point="/data", archive_to=str(archive_to))
    stdin = hook_input(tmp_path, [changed_overlay.mount_entry()], annotations)
    result = run_hook(stdin, "stray", "--log-level=info", "words")
    assert result.returncode == 0, result.stderr.decode()
    warnings = [line for line in result.stderr.splitlines() if b"level=warning" in line]
    assert len(warnings) == 1 and b'arguments="stray words"' in warnings[0], result.stderr
    assert_same_tree(snapshot(changed_overlay.upper), snapshot(archive_to), "the copy")


def test_debug_log_says_how_each_archive_was_made(changed_overlay, run_hook, tmp_path):
    """The mount's resolution, the upperdir, the marker namespace, the temporary, timings."""
    archive_to = tmp_path / "out.tar"
    annotations = archive_annotations(
        "d", mount_point="/data", archive_to=str(archive_to), method="tar"
    )
    stdin = hook_input(tmp_path, [changed_overlay.mount_entry()], annotations)
    for level in ("debug", "trace"):
        result = run_hook(stdin, f"--log-level={level}")
        assert result.returncode == 0, result.stderr.decode()
        log = result.stderr.decode()
        assert 'event="overlay mount: upperdir from its options" destination=/data' in log
        assert f'options="lowerdir={changed_overlay.lower},upperdir=' in log
        assert f'event="upperdir found" archive=d upperdir={changed_overlay.upper}' in log
        assert "markers=trusted.overlay." in log
        assert f'event="writing to a temporary" archive=d path={tmp_path}/.out.tar' in log
        assert ".archive_overlay-tmp-" in log
        assert 'event="archive written to its temporary" archive=d walk_write_seconds=' in log
        assert "sync_seconds=" in log
        assert 'event="archive renamed into place" archive=d seconds=' in log


def test_version_help_and_module_entry(hook_bin):
    helptext = subprocess.run(
        [str(hook_bin), "--help"], check=False, capture_output=True, text=True
    ).stdout
    for word in (
        "mount-point",
        "archive-to",
        "success",
        "method",
        "tar-content-owner",
        "--mount-program",
        "--syslog",
        "--log-level",
        "--allow-dir",
        "--log-file",
    ):
        assert word in helptext
    python = hook_bin.parent / "python"
    direct = subprocess.run(
        [str(python), str(REPO / "archive_overlay.py"), "--version"],
        check=False,
        capture_output=True,
        text=True,
        env={},
    )
    assert direct.returncode == 0 and project_version() in direct.stdout


def test_hooks_d_files_match_the_go_hook():
    go_when = {
        r"com\.launchplatform\.oci-hooks\.archive-overlay\.([^.]+)\.mount-point": "(.+)",
        r"com\.launchplatform\.oci-hooks\.archive-overlay\.([^.]+)\.archive-to": "(.+)",
    }
    log = ["--syslog", "--log-file", "/var/log/archive_overlay.log"]
    rootless = ["--syslog", "--allow-dir", "@HOME@/archives",
                "--log-file", "@HOME@/.local/state/archive_overlay.log"]  # fmt: skip
    for name, args in (
        ("archive-overlay.json", log),
        ("archive-overlay-debug.json", ["--log-level=trace", *log]),
        ("archive-overlay-rootless.json", rootless),
    ):
        hook = json.loads((REPO / "hooks.d" / name).read_text())
        assert hook["version"] == "1.0.0" and hook["stages"] == ["poststop"]
        assert hook["when"] == {"annotations": go_when}
        assert hook["hook"]["path"] == "/usr/bin/archive_overlay"
        assert hook["hook"]["args"] == ["/usr/bin/archive_overlay", *args]


def test_each_record_stays_one_line(run_hook, tmp_path):
    """A container-chosen name with a newline or a NUL cannot split or forge log records."""
    annotations = archive_annotations(
        "d", mount_point="/da\nta\x00level=info", archive_to=str(tmp_path / "x")
    )
    result = run_hook(hook_input(tmp_path, [], annotations))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and b"level=error" in lines[0] and b"\0" not in lines[0]


NAMES = ["B", "a", "a.b", "a0", "b", "z"]  # byte order: upper case, then "a" < "a.b" < "a0"


def sorted_walk(root: Path, prefix: str = ".") -> list[str]:
    """Member names in the README's order: each directory, then its entries sorted by name
    (bytes), depth first; directories with a trailing slash, as GNU tar lists them."""
    names = []
    for entry in sorted(os.listdir(root), key=os.fsencode):
        path = root / entry
        if path.is_dir() and not path.is_symlink():
            names.append(f"{prefix}/{entry}/")
            names += sorted_walk(path, f"{prefix}/{entry}")
        else:
            names.append(f"{prefix}/{entry}")
    return names


@pytest.mark.parametrize("method", ["tar", "tar.gz", "tar.zst"])
def test_members_come_in_sorted_order_whatever_the_directory_order(run_hook, tmp_path, method):
    """On a tmpfs, readdir lists a directory newest first: the upperdir's entries are made in
    reverse byte order, and the archive still lists them sorted."""
    scratch = tmp_path / "tmpfs"
    scratch.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(scratch)], check=True)
    try:
        ovl = Overlay(scratch / "ovl")
        for d in (ovl.lower, ovl.upper, ovl.work, ovl.merged):
            d.mkdir(parents=True)
        ovl.mount()
        try:
            for name in sorted(NAMES, reverse=True):
                (ovl.merged / name).write_text(name)
                (ovl.merged / f"{name}.d").mkdir()
                for inner in sorted(NAMES, reverse=True):
                    (ovl.merged / f"{name}.d" / inner).write_text(inner)
        finally:
            ovl.unmount()
        listed = [n for n in os.listdir(ovl.upper) if not n.startswith(".")]
        assert listed != sorted(listed, key=os.fsencode), "readdir gave sorted order already"
        archive_to, _ = archive_of(run_hook, tmp_path, ovl, method)
        expected = ["./", *sorted_walk(ovl.upper)]
        assert raw_member_names(archive_to, method) == expected
    finally:
        subprocess.run(["umount", "-l", str(scratch)], check=False)
