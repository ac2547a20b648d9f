"""Safety and reliability: where the hook may write, what it never follows, faults, kills, load.

Every test changes files through a real overlayfs mount, runs the installed
hook as a subprocess (empty environment, piped state JSON, as engines run it)
and then checks what is on disk: the archive, the temporaries beside it, and
the places that must stay untouched.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import platform
import re
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Overlay, archive_annotations, requires_root, state_json, write_bundle
from trees import (
    Exemption,
    Tree,
    assert_same_tree,
    dir_mtimes,
    snapshot,
    tar_snapshot,
)

pytestmark = requires_root

TMP_MARK = ".archive_overlay-tmp-"
HOOK_TIMEOUT = 60.0
METHODS = ["copy", "tar.gz"]
ALL_METHODS = ["copy", "tar", "tar.gz", "tar.zst", "oci-layer", "oci-layer+zstd"]


# --- running the hook -------------------------------------------------------


@dataclass
class HookRun:
    returncode: int
    log: str

    def error_for(self, archive: str) -> str:
        """The level=error line naming this archive; fails the test if there is none."""
        for line in self.log.splitlines():
            if "level=error" in line and f" archive={archive} " in f" {line} ":
                return line
        raise AssertionError(f"no level=error line for archive {archive!r} in:\n{self.log}")

    def error_for_event(self, words: str) -> str:
        """The level=error line whose event holds these words."""
        for line in self.log.splitlines():
            if "level=error" in line and words in line.partition("event=")[2]:
                return line
        raise AssertionError(f"no level=error line about {words!r} in:\n{self.log}")


def hook(hook_bin: Path, state: str, *args: str, cwd: Path | None = None,
         timeout: float = HOOK_TIMEOUT) -> HookRun:  # fmt: skip
    """Run the installed hook as an engine does: empty environment, state JSON on stdin."""
    proc = subprocess.run(
        [str(hook_bin), *args], input=state.encode(), capture_output=True, env={},
        cwd=cwd, timeout=timeout, check=False,
    )  # fmt: skip
    return HookRun(proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace"))


def start_hook(hook_bin: Path, state: str, *args: str) -> subprocess.Popen:
    """Start the hook in the background; its stdin is the state JSON (a file, as `<`)."""
    with tempfile.TemporaryFile() as stdin:
        stdin.write(state.encode())
        stdin.seek(0)
        return subprocess.Popen(
            [str(hook_bin), *args], stdin=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env={},
        )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = HOOK_TIMEOUT) -> HookRun:
    """Wait for a started hook; one still running after `timeout` seconds fails the test."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the hook was still running after {timeout} s; its log:\n{out.decode()}")
    return HookRun(proc.returncode, out.decode(errors="replace"))


def hook_state(tmp_path: Path, ovl: Overlay, archives: dict[str, dict[str, str]],
               bundle: str = "bundle") -> str:  # fmt: skip
    """A state JSON whose config.json mounts ovl at /data and asks for these archives.

    archives: {name: {"archive_to": ..., "method": ..., "success": ...}}
    """
    annotations: dict[str, str] = {}
    for name, args in archives.items():
        annotations.update(archive_annotations(name, mount_point="/data", **args))
    return state_json(write_bundle(tmp_path / bundle, [ovl.mount_entry("/data")], annotations))


# --- building upperdirs through real overlay mounts ---------------------------


@contextmanager
def mounted(ovl: Overlay, extra: str = "") -> Iterator[Path]:
    """The overlay mounted for the time of a `with`: changes go through merged."""
    ovl.mount(extra)
    try:
        yield ovl.merged
    finally:
        ovl.unmount()


def small_tree(ovl: Overlay, tag: str = "") -> Overlay:
    """A lower with two files; through the mount: new files, a dir, a symlink, a deletion."""
    (ovl.lower / "kept").write_text("kept\n")
    (ovl.lower / "gone").write_text("deleted by the container\n")
    with mounted(ovl) as merged:
        (merged / "hello").write_text(f"hello {tag}\n")
        (merged / "dir").mkdir()
        (merged / "dir" / "file").write_bytes(os.urandom(4096) + tag.encode())
        os.symlink("../hello", merged / "dir" / "link")
        (merged / "gone").unlink()  # a whiteout: char 0/0
    return ovl


def random_files(merged: Path, count: int, size: int) -> None:
    for i in range(count):
        (merged / f"data{i:03}").write_bytes(os.urandom(size))


# --- describing trees and archives, never following a link ---------------------


def archived(archive_to: Path, method: str) -> Tree:
    return snapshot(archive_to) if method == "copy" else tar_snapshot(archive_to)


def assert_archive_of(archive_to: Path, method: str, upper: Path) -> None:
    if method == "copy":
        assert not archive_to.is_symlink() and archive_to.is_dir(), archive_to
    else:
        assert not archive_to.is_symlink() and archive_to.is_file(), archive_to
    assert_same_tree(snapshot(upper), archived(archive_to, method), f"{method} {archive_to}")


def assert_unchanged(before: Tree, path: Path, *but: Exemption, diag: str = "") -> None:
    """path is as `before` was taken, strictly (but for the named exemptions)."""
    assert_same_tree(before, snapshot(path), f"{path}, which must stay as it was", diag, but)


def temporaries(directory: Path) -> list[Path]:
    """The hook's temporaries under directory (their names hold `.archive_overlay-tmp-`)."""
    return [p for p in directory.rglob("*") if TMP_MARK in p.name]


def make_older_archive(archive_to: Path, method: str) -> None:
    """An archive from an earlier run, to be kept intact when a new one fails."""
    archive_to.parent.mkdir(parents=True, exist_ok=True)
    source = archive_to.parent / "older-source"
    source.mkdir()
    (source / "older").write_text("an older archive\n")
    if method == "copy":
        source.rename(archive_to)
        return
    with tarfile.open(archive_to, "w:gz") as tar:
        tar.add(source, arcname=".")
    (source / "older").unlink()
    source.rmdir()


@pytest.fixture
def tmpfs(tmp_path: Path):
    """Factory: tmpfs(name, options) -> a fresh tmpfs mounted at tmp_path/name."""
    mounted_dirs: list[Path] = []

    def mount(name: str, options: str = "size=1m") -> Path:
        target = tmp_path / name
        target.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)
        mounted_dirs.append(target)
        return target

    yield mount
    for target in reversed(mounted_dirs):
        subprocess.run(["umount", "-l", str(target)], check=False)


# --- --allow-dir and absolute paths ------------------------------------------------


@pytest.fixture
def places(tmp_path: Path) -> Path:
    """tmp/places: allowed/ (with links out of it), outside/, allowed2/, other/."""
    root = tmp_path / "places"
    for d in ("allowed", "outside", "allowed2", "other", "allowed/real"):
        (root / d).mkdir(parents=True)
    (root / "outside" / "precious").write_text("must stay as it is\n")
    os.symlink(root / "outside", root / "allowed" / "link")  # a dir symlink leading out
    os.symlink(root / "allowed" / "real", root / "allowed" / "inner")  # one staying inside
    return root


def allow(places: Path) -> list[str]:
    return ["--allow-dir", str(places / "other"), "--allow-dir", str(places / "allowed")]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "archive_to, lands_at",
    [
        ("allowed/archive", "allowed/archive"),
        ("allowed/new/sub/archive", "allowed/new/sub/archive"),
        ("allowed/real/../archive", "allowed/archive"),
        ("allowed/inner/archive", "allowed/real/archive"),
    ],
)
def test_allow_dir_inside_is_written(hook_bin, make_overlay, tmp_path, places, method,
                                     archive_to, lands_at):  # fmt: skip
    ovl = small_tree(make_overlay())
    success = places / "allowed" / "done" / "ok"
    archive = {"archive_to": str(places / archive_to), "method": method, "success": str(success)}
    outside_before = snapshot(places / "outside")
    run = hook(hook_bin, hook_state(tmp_path, ovl, {"data": archive}), *allow(places))
    assert run.returncode == 0, run.log
    assert_archive_of(places / lands_at, method, ovl.upper)
    assert success.is_file()
    assert_unchanged(outside_before, places / "outside")
    assert temporaries(places) == []


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "archive_to",
    [
        "outside/archive",
        "allowed/../outside/archive",  # `..` is resolved
        "allowed/link/archive",  # a symlink on the way leads out
        "allowed/link/new/archive",  # ... also when directories would be created
        "allowed2/archive",  # a sibling whose name starts with the allowed dir's
        "allowed",  # the allowed directory itself is not inside it
    ],
)
def test_allow_dir_refuses_archive_to_outside(hook_bin, make_overlay, tmp_path, places, method,
                                              archive_to):  # fmt: skip
    ovl = small_tree(make_overlay())
    success = places / "allowed" / "ok"
    path = str(places / archive_to)
    before = snapshot(places)
    run = hook(
        hook_bin,
        hook_state(tmp_path, ovl, {"data": {"archive_to": path, "method": method,
                                            "success": str(success)}}),
        *allow(places),
    )  # fmt: skip
    assert run.returncode == 1, run.log
    line = run.error_for("data")
    assert path in line and "allow" in line.replace(str(places), ""), line  # says why
    assert_unchanged(before, places)  # nothing written, not even a temporary or a parent dir


@pytest.mark.parametrize(
    "success",
    ["outside/ok", "allowed/../outside/ok", "allowed/link/ok", "allowed2/ok"],
)
def test_allow_dir_refuses_success_outside(hook_bin, make_overlay, tmp_path, places, success):
    ovl = small_tree(make_overlay())
    path = str(places / success)
    before = snapshot(places)
    archive = {"archive_to": str(places / "allowed" / "archive"), "success": path}
    run = hook(hook_bin, hook_state(tmp_path, ovl, {"data": archive}), *allow(places))
    assert run.returncode == 1, run.log
    line = run.error_for("data")
    assert path in line and "allow" in line.replace(str(places), ""), line  # says why
    assert_unchanged(before, places)  # the archive is refused whole: no success, no archive


@pytest.mark.parametrize("method", ALL_METHODS)
def test_archive_to_symlink_leading_out_is_not_written_through(hook_bin, make_overlay, tmp_path,
                                                                 places, method):  # fmt: skip
    """archive-to itself a symlink to outside: replaced by the archive (tar methods), refused
    (copy needs a directory there); never followed."""
    ovl = small_tree(make_overlay())
    link = places / "allowed" / "final"
    os.symlink(places / "outside" / "archive", link)
    outside_before = snapshot(places / "outside")
    archive = {"archive_to": str(link), "method": method}
    run = hook(hook_bin, hook_state(tmp_path, ovl, {"data": archive}), *allow(places))
    assert_unchanged(outside_before, places / "outside")
    if method == "copy":
        assert run.returncode == 1, run.log
        assert str(link) in run.error_for("data")
        assert os.readlink(link) == str(places / "outside" / "archive")
    else:
        assert run.returncode == 0, run.log
        assert not link.is_symlink() and link.is_file()  # the link itself was replaced
        if method in ("tar", "tar.gz"):
            assert_archive_of(link, method, ovl.upper)
    assert temporaries(places) == []


def test_success_symlink_leading_out_is_not_written_through(hook_bin, make_overlay, tmp_path,
                                                              places):  # fmt: skip
    """A success path that is a symlink to outside: the link itself is replaced."""
    ovl = small_tree(make_overlay())
    link = places / "allowed" / "ok"
    os.symlink(places / "outside" / "precious", link)
    outside_before = snapshot(places / "outside")
    archive = {"archive_to": str(places / "allowed" / "archive"), "success": str(link)}
    run = hook(hook_bin, hook_state(tmp_path, ovl, {"data": archive}), *allow(places))
    assert run.returncode == 0, run.log
    assert_unchanged(outside_before, places / "outside")  # not truncated through the link
    assert not link.is_symlink() and link.is_file() and link.stat().st_size == 0


@pytest.mark.parametrize("with_allow_dir", [False, True])
@pytest.mark.parametrize("relative", ["archive-to", "success"])
def test_relative_paths_are_refused(hook_bin, make_overlay, tmp_path, relative, with_allow_dir):
    ovl = small_tree(make_overlay())
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    out.mkdir()
    archive = {"archive_to": str(out / "archive"), "success": str(out / "ok")}
    path = "rel/archive" if relative == "archive-to" else "rel/ok"
    archive[relative.replace("-", "_")] = path
    args = ["--allow-dir", str(cwd), "--allow-dir", str(out)] if with_allow_dir else []
    run = hook(hook_bin, hook_state(tmp_path, ovl, {"data": archive}), *args, cwd=cwd)
    assert run.returncode == 1, run.log
    line = run.error_for("data")
    assert path in line and "absolute" in line, line
    assert list(cwd.iterdir()) == [] and list(out.iterdir()) == []


# --- nothing in the upperdir is followed ----------------------------------------------


@pytest.fixture
def hostile_overlay(make_overlay, tmp_path: Path) -> Overlay:
    """An upperdir holding links to host secrets, a FIFO, a /dev/zero device node and a
    hardlinked file."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_bytes(SECRET)
    ovl = make_overlay()
    with mounted(ovl) as merged:
        os.symlink("/etc/shadow", merged / "shadow")
        os.symlink(str(host), merged / "host-dir")
        os.symlink(str(host / "secret"), merged / "host-secret")
        os.symlink("host-dir/secret", merged / "relative-secret")
        os.mkfifo(merged / "fifo")
        os.mknod(merged / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # reading never ends
        (merged / "plain").write_text("plain\n")
        os.link(merged / "plain", merged / "plain-link")  # a hardlink: one inode, two names
    return ovl


SECRET = b"host secret 6f1c2a: must never be copied into an archive\n"


@pytest.mark.parametrize("method", METHODS)
def test_upperdir_symlinks_fifos_and_devices_are_archived_not_followed(
    hook_bin, hostile_overlay, tmp_path, method
):
    ovl = hostile_overlay
    host_before = snapshot(tmp_path / "host")
    archive_to = tmp_path / "out" / "archive"
    state = hook_state(tmp_path, ovl, {"data": {"archive_to": str(archive_to), "method": method}})
    run = hook(hook_bin, state, timeout=30)  # a FIFO or /dev/zero opened for reading would hang
    assert run.returncode == 0, run.log
    got = archived(archive_to, method)
    assert_same_tree(snapshot(ovl.upper), got, f"the {method} archive")
    for name, target in [("shadow", "/etc/shadow"), ("host-dir", str(tmp_path / "host")),
                         ("host-secret", str(tmp_path / "host" / "secret")),
                         ("relative-secret", "host-dir/secret")]:  # fmt: skip
        assert got[name]["type"] == "symlink" and got[name]["target"] == target, (name, got[name])
    assert got["fifo"]["type"] == "fifo"
    assert got["zero"]["type"] == "char" and got["zero"]["rdev"] == (1, 5)
    assert not any(name.startswith("host-dir/") for name in got)
    assert SECRET not in archive_bytes(archive_to, method)
    shadow = Path("/etc/shadow")
    if shadow.is_file() and shadow.stat().st_size > 16:
        assert shadow.read_bytes() not in archive_bytes(archive_to, method)
    assert_unchanged(host_before, tmp_path / "host")


def archive_bytes(archive_to: Path, method: str) -> bytes:
    """Every byte of data the archive holds: regular files' content, or the tar stream."""
    if method != "copy":
        return gzip.decompress(archive_to.read_bytes())
    data = b""
    for dirpath, _, filenames in os.walk(archive_to):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                data += path.read_bytes()
    return data


# --- redirect_dir and metacopy upperdirs -------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "change, marker",
    [("rename a directory", "trusted.overlay.redirect"),
     ("chmod a lower file", "trusted.overlay.metacopy")],
)  # fmt: skip
def test_redirect_dir_and_metacopy_upperdirs_are_refused(hook_bin, make_overlay, tmp_path,
                                                         method, change, marker):  # fmt: skip
    ovl = make_overlay()
    (ovl.lower / "dir").mkdir()
    (ovl.lower / "dir" / "file").write_text("in the lower layer\n")
    (ovl.lower / "file").write_bytes(os.urandom(1 << 16))
    with mounted(ovl, "redirect_dir=on,metacopy=on") as merged:
        (merged / "new").write_text("a plain new file\n")
        if change == "rename a directory":
            (merged / "dir").rename(merged / "moved")
        else:
            os.chmod(merged / "file", 0o600)
    changed = ovl.upper / ("moved" if change == "rename a directory" else "file")
    assert marker in os.listxattr(changed), f"the kernel did not write {marker}"
    out = tmp_path / "out"
    archive = {"archive_to": str(out / "archive"), "method": method, "success": str(out / "ok")}
    run = hook(hook_bin, hook_state(tmp_path, ovl, {"data": archive}))
    assert run.returncode == 1, run.log
    line = run.error_for("data")
    assert "redirect_dir" in line or "metacopy" in line, line
    assert not (out / "archive").exists() and not (out / "ok").exists()
    assert temporaries(out) == []


# --- faults at the destination ------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("older", [False, True], ids=["no-older-archive", "older-archive"])
def test_destination_full(hook_bin, make_overlay, tmp_path, tmpfs, method, older):
    """A 1 MiB tmpfs and a 3 MiB upperdir: that archive fails cleanly, the other is written."""
    ovl = make_overlay()
    with mounted(ovl) as merged:
        random_files(merged, 3, 1 << 20)
    small, roomy = tmpfs("small", "size=1m"), tmp_path / "roomy"
    if older:
        make_older_archive(small / "archive", method)
    before = snapshot(small)
    archives = {
        "full": {"archive_to": str(small / "archive"), "method": method,
                 "success": str(roomy / "full.ok")},
        "roomy": {"archive_to": str(roomy / "archive"), "method": method,
                  "success": str(roomy / "roomy.ok")},
    }  # fmt: skip
    run = hook(hook_bin, hook_state(tmp_path, ovl, archives))
    assert run.returncode == 1, run.log
    line = run.error_for("full")
    assert str(small / "archive") in line and "No space left on device" in line, line
    assert_unchanged(before, small, dir_mtimes)  # absent, or the older archive intact
    assert not (roomy / "full.ok").exists()
    assert_archive_of(roomy / "archive", method, ovl.upper)
    assert (roomy / "roomy.ok").is_file()
    assert temporaries(roomy) == []


@pytest.mark.parametrize("method", METHODS)
def test_destination_read_only(hook_bin, make_overlay, tmp_path, tmpfs, method):
    ovl = small_tree(make_overlay())
    ro = tmpfs("ro", "size=4m")
    make_older_archive(ro / "archive", method)
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    before = snapshot(ro)
    archives = {
        "data": {"archive_to": str(ro / "archive"), "method": method},
        "new": {"archive_to": str(ro / "sub" / "new"), "method": method},  # its parent made
    }
    run = hook(hook_bin, hook_state(tmp_path, ovl, archives))
    assert run.returncode == 1, run.log
    for name, path in (("data", ro / "archive"), ("new", ro / "sub" / "new")):
        line = run.error_for(name)
        assert str(path) in line and "Read-only file system" in line, line
    assert_unchanged(before, ro)


@pytest.mark.parametrize("method", METHODS)
def test_parent_of_archive_to_is_a_file(hook_bin, make_overlay, tmp_path, method):
    ovl = small_tree(make_overlay())
    parent = tmp_path / "out" / "file"
    parent.parent.mkdir()
    parent.write_text("a file, not a directory\n")
    before = snapshot(parent.parent)
    archive_to = parent / "archive"
    run = hook(hook_bin, hook_state(tmp_path, ovl, {"data": {"archive_to": str(archive_to),
                                                             "method": method}}))  # fmt: skip
    assert run.returncode == 1, run.log
    line = run.error_for("data")
    assert str(archive_to) in line and "Not a directory" in line, line
    assert_unchanged(before, parent.parent)


@pytest.mark.parametrize(
    "method, existing, message",
    [("copy", "file", "is not a directory"), ("tar.gz", "directory", "is a directory")],
)
def test_archive_to_of_the_other_kind_is_kept(hook_bin, make_overlay, tmp_path, method,
                                              existing, message):  # fmt: skip
    ovl = small_tree(make_overlay())
    out = tmp_path / "out"
    archive_to = out / "archive"
    out.mkdir()
    if existing == "file":
        archive_to.write_text("an existing file, not an archive directory\n")
    else:
        archive_to.mkdir()
        (archive_to / "inside").write_text("an existing directory's content\n")
    before = snapshot(out)
    state = hook_state(tmp_path, ovl, {"data": {"archive_to": str(archive_to), "method": method,
                                                "success": str(out / "ok")}})  # fmt: skip
    run = hook(hook_bin, state)
    assert run.returncode == 1, run.log
    line = run.error_for("data")
    assert str(archive_to) in line and message in line, line
    assert_unchanged(before, out, dir_mtimes)


# --- an unusable upperdir ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["vanished", "a file", "parent vanished"])
def test_upperdir_unusable(hook_bin, make_overlay, tmp_path, how):
    ovl = small_tree(make_overlay())
    subprocess.run(["rm", "-rf", str(ovl.upper)], check=True)
    if how == "a file":
        ovl.upper.write_text("not a directory\n")
    elif how == "parent vanished":
        subprocess.run(["rm", "-rf", str(ovl.root)], check=True)
    out = tmp_path / "out"
    archives = {m.replace(".", ""): {"archive_to": str(out / m), "method": m} for m in METHODS}
    run = hook(hook_bin, hook_state(tmp_path, ovl, archives))
    assert run.returncode == 1, run.log
    for name in archives:
        line = run.error_for(name)
        assert "upperdir" in line and str(ovl.upper) in line, line
    assert not out.exists() or (list(out.iterdir()) == [])


# --- killed mid-archive ---------------------------------------------------------------------

BIG_FILES, BIG_SIZE = 4, 48 << 20  # 192 MiB of random data: over a second to archive


@pytest.fixture(scope="module")
def big_overlay(tmp_path_factory) -> Iterator[Overlay]:
    ovl = Overlay(tmp_path_factory.mktemp("big"))
    for d in (ovl.lower, ovl.upper, ovl.work, ovl.merged):
        d.mkdir()
    (ovl.lower / "kept").write_text("kept\n")
    with mounted(ovl) as merged:
        random_files(merged, BIG_FILES, BIG_SIZE)
        (merged / "small").write_text("small\n")
    yield ovl
    subprocess.run(["rm", "-rf", str(ovl.root)], check=False)


def wait_for_temporary(directory: Path, name: str, proc: subprocess.Popen) -> Path:
    """The hook's temporary for archive-to directory/name, once it holds some data."""
    prefix = f".{name}{TMP_MARK}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for path in directory.iterdir() if directory.exists() else []:
            if path.name.startswith(prefix) and has_data(path):
                return path
        if proc.poll() is not None:
            pytest.fail(f"the hook ended before a temporary appeared:\n{finish(proc).log}")
        time.sleep(0.001)
    proc.kill()
    pytest.fail(f"no temporary in {directory} after 30 s")


def has_data(path: Path) -> bool:
    try:
        return any(path.iterdir()) if path.is_dir() else path.stat().st_size > 0
    except FileNotFoundError:
        return False


def kill_mid_archive(hook_bin: Path, state: str, archive_to: Path,
                     sig: int) -> tuple[HookRun, Path]:  # fmt: skip
    """Start the hook, send sig once its temporary holds data; the hook must end within 20 s."""
    proc = start_hook(hook_bin, state)
    temporary = wait_for_temporary(archive_to.parent, archive_to.name, proc)
    proc.send_signal(sig)
    return finish(proc, timeout=20), temporary


SIGTERM_ROUNDS = 4  # where SIGTERM lands varies: a hang after some of them must show


def fastest_level(method: str) -> dict[str, str]:
    """The quickest compression-level for the method (a level is an error where none applies)."""
    levels = {"tar.gz": "0", "oci-layer": "0", "tar.zst": "1", "oci-layer+zstd": "1"}
    return {"compression_level": levels[method]} if method in levels else {}


@pytest.mark.parametrize("method", METHODS)
def test_sigterm_mid_archive_removes_the_temporary(hook_bin, big_overlay, tmp_path, method):
    out = tmp_path / "out"
    archive_to = out / "archive"
    make_older_archive(archive_to, method)
    before = snapshot(out)
    archive = {"archive_to": str(archive_to), "method": method, "success": str(out / "ok"),
               **fastest_level(method)}  # fmt: skip
    state = hook_state(tmp_path, big_overlay, {"data": archive})
    for _ in range(SIGTERM_ROUNDS):
        run, temporary = kill_mid_archive(hook_bin, state, archive_to, signal.SIGTERM)
        assert run.returncode == 1, run.log
        assert "SIGTERM" in run.error_for_event("terminated")
        assert not os.path.lexists(temporary)
        # the older archive untouched, no temporary, no success file
        assert_unchanged(before, out, dir_mtimes)


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_mid_archive_then_the_next_run_cleans_up(hook_bin, big_overlay, tmp_path, method):
    out = tmp_path / "out"
    archive_to = out / "archive"
    make_older_archive(archive_to, method)
    before = snapshot(archive_to)
    archive = {"archive_to": str(archive_to), "method": method, "success": str(out / "ok"),
               **fastest_level(method)}  # fmt: skip
    state = hook_state(tmp_path, big_overlay, {"data": archive})
    run, temporary = kill_mid_archive(hook_bin, state, archive_to, signal.SIGKILL)
    assert run.returncode == -signal.SIGKILL, run.log
    assert_unchanged(before, archive_to)  # never partial: the older archive as it was
    assert not (out / "ok").exists()
    assert os.path.lexists(temporary)  # left behind, under a name saying what it is
    assert re.fullmatch(rf"\.archive\.archive_overlay-tmp-{run_pid(temporary)}-[0-9a-f]+",
                        temporary.name), temporary.name  # fmt: skip
    assert temporaries(out) == [temporary]

    again = hook(hook_bin, state)
    assert again.returncode == 0, again.log
    assert not os.path.lexists(temporary)
    assert temporaries(out) == []
    assert_archive_of(archive_to, method, big_overlay.upper)
    assert (out / "ok").is_file()
    subprocess.run(["rm", "-rf", str(out)], check=False)


def run_pid(temporary: Path) -> str:
    return temporary.name.split(TMP_MARK)[1].split("-")[0]


# --- load ------------------------------------------------------------------------------


def test_32_hooks_at_once(hook_bin, make_overlay, tmp_path):
    overlays = [small_tree(make_overlay(f"ovl{i}"), tag=str(i)) for i in range(32)]
    out = tmp_path / "out"
    jobs = []
    for i, ovl in enumerate(overlays):
        method = METHODS[i % 2]
        archive = {"archive_to": str(out / f"archive{i}"), "method": method,
                   "success": str(out / f"ok{i}")}  # fmt: skip
        state = hook_state(tmp_path, ovl, {"data": archive}, bundle=f"bundle{i}")
        jobs.append((ovl, method, i, start_hook(hook_bin, state)))
    for ovl, method, i, proc in jobs:
        run = finish(proc, timeout=120)
        assert run.returncode == 0, run.log
        assert_archive_of(out / f"archive{i}", method, ovl.upper)
        assert (out / f"ok{i}").is_file()
    assert temporaries(out) == []


@pytest.mark.parametrize("method", METHODS)
def test_two_hooks_writing_one_archive_to(hook_bin, make_overlay, tmp_path, method):
    """Each round, two hooks race for one archive-to: it ends as one of them, whole."""
    sides = []
    for side in ("a", "b"):
        ovl = make_overlay(side)
        with mounted(ovl) as merged:
            random_files(merged, 24, 256 << 10)
            (merged / f"only-in-{side}").write_text(side)
        sides.append(ovl)
    expected = [snapshot(ovl.upper) for ovl in sides]
    out = tmp_path / "out"
    archive_to = out / "archive"
    states = [
        hook_state(tmp_path, ovl, {"data": {"archive_to": str(archive_to), "method": method}},
                   bundle=f"bundle-{i}")
        for i, ovl in enumerate(sides)
    ]  # fmt: skip
    for _ in range(4):
        procs = [start_hook(hook_bin, state) for state in states]
        runs = [finish(proc) for proc in procs]
        assert [r.returncode for r in runs] == [0, 0], "\n".join(r.log for r in runs)
        assert archived(archive_to, method) in expected  # one of them exactly, never a mix
        assert temporaries(out) == []


# --- SIGKILL at every step of the commit -------------------------------------------------

COMMIT_CALLS = ("renameat2", "renameat", "rename", "fsync", "fdatasync", "syncfs", "unlinkat")
STRACE_LINE = re.compile(r"^(\d+)\s+(\w+)\(")


def traced_calls(hook_bin: Path, state: str, trace: Path) -> list[tuple[int, str]]:
    """(tid, system call) of a whole run, in order, for the calls a commit makes."""
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={','.join(COMMIT_CALLS)}",
         str(hook_bin)], input=state.encode(), capture_output=True, env={}, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    calls = []
    for line in trace.read_text().splitlines():
        match = STRACE_LINE.match(line)
        if match and "resumed>" not in line:
            calls.append((int(match.group(1)), match.group(2)))
    return calls


def commit_steps(calls: list[tuple[int, str]]) -> list[tuple[str, int]]:
    """Each call of the commit as (system call, its invocation number in its thread): from
    the last sync of the temporary before its first rename to the end of the run (the
    exchange, the directory fsync, the removal of what was swapped out, the success file)."""
    first_rename = next(i for i, (_, name) in enumerate(calls) if name.startswith("rename"))
    tid = calls[first_rename][0]
    mine = [(i, name) for i, (t, name) in enumerate(calls) if t == tid]
    syncs = [i for i, name in mine if i < first_rename and name in ("fsync", "syncfs")]
    start = syncs[-1] if syncs else first_rename
    steps, seen = [], {}
    for i, name in mine:
        seen[name] = seen.get(name, 0) + 1
        if i >= start:
            steps.append((name, seen[name]))
    return steps


def read_any(archive_to: Path, method: str) -> Tree:
    if method == "copy" or not method.endswith("zstd") and not method.endswith("zst"):
        return archived(archive_to, method)
    plain = archive_to.parent.parent / "plain.tar"
    with open(plain, "wb") as out:
        subprocess.run(["zstd", "-dc", str(archive_to)], stdout=out, check=True)
    try:
        return tar_snapshot(plain)
    finally:
        plain.unlink()


def fresh_older(out: Path, archive_to: Path, method: str) -> Tree:
    subprocess.run(["rm", "-rf", str(out)], check=True)
    make_older_archive(archive_to, method)
    return snapshot(archive_to)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_sigkill_at_every_step_of_the_commit(hook_bin, make_overlay, tmp_path, method):
    """SIGKILL (strace injects it) at each call of the commit, one run each: archive-to is the
    old archive or the new one, whole (never missing, never a mix), the success file only
    beside the new one, an oci-layer's descriptor only for the layer beside it; the next run
    writes the archive and leaves no temporary."""
    if subprocess.run(["which", "strace"], check=False, capture_output=True).returncode:
        pytest.fail("strace missing (apt-get install strace)")
    ovl = small_tree(make_overlay())
    out = tmp_path / "out"
    archive_to = out / "archive"
    archive = {"archive_to": str(archive_to), "method": method, "success": str(out / "ok")}
    state = hook_state(tmp_path, ovl, {"data": archive})
    old = fresh_older(out, archive_to, method)
    steps = commit_steps(traced_calls(hook_bin, state, tmp_path / "trace"))
    new = read_any(archive_to, method)  # what the untouched run wrote
    if method == "copy":
        assert_same_tree(snapshot(ovl.upper), new, "the copy")
    assert any(name == "renameat2" for name, _ in steps), steps  # the exchange is among them
    outcomes = set()
    for name, when in steps:
        old = fresh_older(out, archive_to, method)
        proc = subprocess.run(
            ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={name}",
             "-e", f"inject={name}:signal=KILL:when={when}", str(hook_bin)],
            input=state.encode(), capture_output=True, env={}, timeout=60, check=False,
        )  # fmt: skip
        at = f"SIGKILL at {name} #{when}"
        assert proc.returncode in (-9, 137), (at, proc.returncode, proc.stderr.decode())
        if snapshot(archive_to) == old:
            outcome = "old"
            assert not (out / "ok").exists(), at
        else:
            outcome = "new"
            assert read_any(archive_to, method) == new, at
        descriptor = Path(f"{archive_to}.json")
        if descriptor.exists():
            assert outcome == "new", at
            digest_now = "sha256:" + hashlib.sha256(archive_to.read_bytes()).hexdigest()
            assert json_digest(descriptor) == digest_now, at
        outcomes.add(outcome)
        after = hook(hook_bin, state)
        assert after.returncode == 0, (at, after.log)
        assert temporaries(out) == [], (at, temporaries(out))
        assert read_any(archive_to, method) == new and (out / "ok").is_file(), at
    assert outcomes == {"old", "new"}, (steps, outcomes)  # both sides of the exchange were hit


def json_digest(descriptor: Path) -> str:
    import json

    return json.loads(descriptor.read_text())["digest"]


# --- temporaries of other runs: which the next run removes -----------------------------

# Makes a temporary for archive-to DIR/NAME named with PID (its own when "self"), with some
# data in it; holds an flock on it (as a live writer does) when asked; waits on stdin.
MAKE_TEMPORARY = """import fcntl, os, sys
directory, name, pid, lock = sys.argv[1:]
pid = os.getpid() if pid == "self" else int(pid)
path = os.path.join(directory, f".{name}.archive_overlay-tmp-{pid}-0badc0de")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, b"half an archive")
if lock == "lock":
    fcntl.flock(fd, fcntl.LOCK_EX)
print(path, flush=True)
sys.stdin.readline()
"""

TEMPORARY_CASES = {  # case: (whose pid names it, held locked, removed by the next run)
    "live-writer": ("self", True, False),
    "dead-pid-but-locked": ("dead", True, False),  # a writer this namespace cannot see
    "reused-pid": ("alive", False, False),  # its writer died, another process got its pid
    "dead-writer": ("dead", False, True),
}


def gone_pid() -> int:
    """A pid that was just used and whose process has ended."""
    proc = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


@pytest.mark.parametrize("case", TEMPORARY_CASES)
def test_the_next_run_removes_only_dead_unlocked_temporaries(hook_bin, make_overlay, tmp_path,
                                                             case):  # fmt: skip
    """A run for the same archive-to (here while the other temporary's writer is still
    there) removes a temporary only once its pid is gone and nobody holds its lock."""
    whose, locked, removed = TEMPORARY_CASES[case]
    ovl = small_tree(make_overlay())
    out = tmp_path / "out"
    out.mkdir()
    archive_to = out / "archive.tar"
    other = subprocess.Popen(["sleep", "60"])  # a live process that is not a writer
    pid = {"self": "self", "dead": str(gone_pid()), "alive": str(other.pid)}[whose]
    maker = subprocess.Popen(
        [sys.executable, "-c", MAKE_TEMPORARY, str(out), archive_to.name, pid,
         "lock" if locked else "no"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert maker.stdout is not None
        temporary = Path(maker.stdout.readline().strip())
        assert temporary.exists()
        if whose == "dead":
            assert not Path(f"/proc/{pid}").exists()
        if not locked:
            maker.communicate("done\n", timeout=10)  # its maker gone: no lock, no holder
        run = hook(hook_bin, hook_state(tmp_path, ovl, {"data": {
            "archive_to": str(archive_to), "method": "tar"}}))  # fmt: skip
        assert run.returncode == 0, run.log
        assert_archive_of(archive_to, "tar", ovl.upper)
        assert temporary.exists() != removed, f"{case}: {temporaries(out)}\n{run.log}"
        assert ("removing a stale temporary" in run.log) == removed, run.log
    finally:
        other.kill()
        if maker.poll() is None:
            maker.communicate("done\n", timeout=10)


# --- a symlink swapped in after the check ----------------------------------------------

# Swaps allowed/sub (a directory) and allowed/sub.swap (a symlink leading out) with
# renameat2(RENAME_EXCHANGE), as fast as it can, until killed: at any instant `sub` is one
# or the other, so a hook's check and its component walk can see different things.
SWAPPER = """import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = (os.fsencode(p) for p in sys.argv[1:3])
print("swapping", flush=True)
while True:
    libc.renameat2(-100, a, -100, b, 2)
"""
RACE_RUNS = 40


def test_a_symlink_swapped_in_after_the_check_is_refused_not_followed(hook_bin, make_overlay,
                                                                     tmp_path, places):  # fmt: skip
    """A racing process swaps a directory of archive-to's path with a symlink leading out of
    --allow-dir. Runs whose check saw the directory and whose component walk (O_NOFOLLOW)
    met the symlink must fail there; nothing is ever written outside. (Which runs meet which
    is chance: the next two tests make each race happen.)"""
    ovl = small_tree(make_overlay())
    sub, swap = places / "allowed" / "sub", places / "allowed" / "sub.swap"
    sub.mkdir()
    os.symlink(places / "outside", swap)
    outside_before = snapshot(places / "outside")
    state = hook_state(tmp_path, ovl, {"data": {"archive_to": str(sub / "a.tar"),
                                                "method": "tar"}})  # fmt: skip
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(sub), str(swap)],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    outcomes = {"checked out": 0, "refused by the walk": 0, "failed in the check": 0,
                "written": 0}  # fmt: skip
    try:
        assert swapper.stdout is not None and swapper.stdout.readline() == "swapping\n"
        for _ in range(RACE_RUNS):
            run = hook(hook_bin, state, *allow(places))
            if run.returncode == 0:
                outcomes["written"] += 1
            elif "is outside the allowed directories" in run.log:
                outcomes["checked out"] += 1
            elif f"cannot open {sub}, the directory of archive-to: " in run.log:
                error = run.error_for("data")
                assert "Too many levels of symbolic links" in error or "Not a dir" in error
                outcomes["refused by the walk"] += 1
            else:  # realpath met `sub` mid-swap (lstat saw a link, readlink a directory)
                assert resolve_error(sub / "a.tar") in run.error_for("data"), run.log
                outcomes["failed in the check"] += 1
            assert_unchanged(outside_before, places / "outside", diag=f"\n{outcomes}\n{run.log}")
    finally:
        swapper.kill()
        swapper.wait()
    assert sum(outcomes.values()) == RACE_RUNS, outcomes


def test_a_symlink_swapped_in_after_the_check_is_refused_by_the_walk(hook_bin, make_overlay,
                                                                      tmp_path, places):  # fmt: skip
    """strace holds the hook at each openat relative to allowed/ (the component walk
    opening sub, after the check resolved it a directory); sub becomes a symlink leading out
    meanwhile. The walk (O_NOFOLLOW) refuses it: one error line, nothing written outside."""
    require_x86_64()
    ovl = small_tree(make_overlay())
    allowed = places / "allowed"
    sub = allowed / "sub"
    sub.mkdir()
    outside_before = snapshot(places / "outside")
    archive_to = sub / "a.tar"
    state = hook_state(tmp_path, ovl, {"data": {"archive_to": str(archive_to), "method": "tar"}})
    strace = start_hook(Path("strace"), state, "-qq", "-o", "/dev/null", "-P", str(allowed),
                        "-e", "trace=openat",
                        "-e", "inject=openat:delay_enter=2000000",
                        str(hook_bin), *allow(places))  # fmt: skip
    try:
        pid = traced_child(strace)

        def opening_sub_in_allowed(args: list[int]) -> bool:  # openat(dirfd, path, flags)
            dir_of = os.readlink(f"/proc/{pid}/fd/{args[0]}") if args[0] < 1 << 31 else ""
            return dir_of == str(allowed) and bool(args[2] & os.O_NOFOLLOW)

        stopped_in(pid, SYS_OPENAT, strace, at=opening_sub_in_allowed)
        sub.rmdir()
        os.symlink(places / "outside", sub)
    finally:
        run = finish(strace)
    assert run.returncode == 1, run.log
    errors = [line for line in run.log.splitlines() if "level=error" in line]
    assert errors == [run.error_for("data")], run.log
    # O_DIRECTORY before O_NOFOLLOW: a symlink there is "not a directory"
    refused = f'error="cannot open {sub}, the directory of archive-to: Not a directory: sub"'
    assert refused in errors[0], run.log
    assert_unchanged(outside_before, places / "outside", diag=run.log)


def resolve_error(archive_to: Path) -> str:
    """The cause logged when realpath found a component of archive-to's directory a symlink
    (lstat), then no symlink (readlink: EINVAL)."""
    return f'error="cannot resolve archive-to {archive_to}: Invalid argument: {archive_to.parent}"'


def traced_child(strace: subprocess.Popen, timeout: float = 10.0) -> int:
    """The pid of the program strace runs: its child that runs another program (strace forks
    children of its own to test ptrace first)."""
    children = Path(f"/proc/{strace.pid}/task/{strace.pid}/children")
    own = os.readlink(f"/proc/{strace.pid}/exe")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and strace.poll() is None:
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/exe") != own:
                    return int(pid)
        time.sleep(0.01)
    pytest.fail("strace started no program")


def stopped_in(pid: int, syscall: int, proc: subprocess.Popen, timeout: float = 30.0,
               at: Callable[[list[int]], bool] = lambda args: True) -> None:  # fmt: skip
    """Wait until the process is held at the entry of this system call, with arguments
    `at` accepts (another call of it held first is let go: strace's delay ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/syscall").read_text().split()
            if fields[0] == str(syscall) and at([int(f, 16) for f in fields[1:7]]):
                return
        time.sleep(0.01)
    pytest.fail(f"pid {pid} never reached system call {syscall} as asked")


def string_at(pid: int, address: int) -> str:
    """The C string at address in the process's memory (a system call's path argument)."""
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(address)
        return mem.read(4096).split(b"\0", 1)[0].decode(errors="replace")


SYS_READLINK, SYS_OPENAT = 89, 257  # x86_64


def require_x86_64() -> None:
    if platform.machine() != "x86_64":
        pytest.fail(f"the system call numbers are x86_64's; add {platform.machine()}'s")


def test_a_component_swapped_while_it_is_checked_fails_in_one_line(hook_bin, make_overlay,
                                                                   tmp_path, places):  # fmt: skip
    """The race the swapper test meets by chance, made to happen: strace holds the hook at the
    readlink of allowed/sub, a symlink leading out when realpath's lstat saw it, and sub
    becomes a directory meanwhile. Python 3.11: the archive fails in one line naming the
    archive, the annotation and the path; nothing is written. Python 3.13 (realpath goes on
    past a name it cannot readlink): the archive is written in the directory sub now is,
    inside the allowed one. Either way nothing outside changes."""
    require_x86_64()
    ovl = small_tree(make_overlay())
    sub = places / "allowed" / "sub"
    os.symlink(places / "outside", sub)
    before = snapshot(places)
    archive_to = sub / "a.tar"
    state = hook_state(tmp_path, ovl, {"data": {"archive_to": str(archive_to), "method": "tar"}})
    # Every readlink is held (strace 6.13 resolves a -P path that is a symlink and then
    # matches only its target): the test waits for the one of allowed/sub.
    strace = start_hook(Path("strace"), state, "-qq", "-o", "/dev/null",
                        "-e", "trace=readlink", "-e", "inject=readlink:delay_enter=1000000",
                        str(hook_bin), *allow(places))  # fmt: skip
    try:
        pid = traced_child(strace)
        stopped_in(pid, SYS_READLINK, strace, timeout=60,
                   at=lambda args: string_at(pid, args[0]) == str(sub))  # fmt: skip
        sub.unlink()
        sub.mkdir()
    finally:
        run = finish(strace)
    assert "Traceback" not in run.log
    if sys.version_info >= (3, 13):  # realpath takes a name it cannot readlink as no link
        assert run.returncode == 0 and "level=error" not in run.log, run.log
        assert [p.name for p in sub.iterdir()] == ["a.tar"], run.log  # inside allowed/
        (sub / "a.tar").unlink()
    else:
        assert run.returncode == 1, run.log
        errors = [line for line in run.log.splitlines() if "level=error" in line]
        assert errors == [run.error_for("data")], run.log
        assert f"archive_to={archive_to} " in errors[0] and resolve_error(archive_to) in errors[0]
        assert list(sub.iterdir()) == [], run.log  # nothing where sub leads now, nor where it led

    def not_sub(rel: str) -> bool:
        return rel == "allowed/sub"

    assert_same_tree(before.without(not_sub), snapshot(places).without(not_sub), str(places),
                     run.log, but=(dir_mtimes,))  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_a_live_writers_temporary_survives_another_run(hook_bin, big_overlay, tmp_path, method):
    """A hook is stopped (SIGSTOP) while its temporary holds data; a second run for the same
    archive-to runs whole meanwhile and must leave that temporary alone; the first, resumed,
    then commits its archive too."""
    out = tmp_path / "out"
    archive_to = out / "archive"
    archive = {"archive_to": str(archive_to), "method": method, **fastest_level(method)}
    state = hook_state(tmp_path, big_overlay, {"data": archive})
    first = start_hook(hook_bin, state)
    try:
        temporary = wait_for_temporary(out, archive_to.name, first)
        first.send_signal(signal.SIGSTOP)
        second = hook(hook_bin, state)
        assert second.returncode == 0, second.log
        assert os.path.lexists(temporary), second.log  # the live writer's, kept
        assert "removing a stale temporary" not in second.log
    finally:
        first.send_signal(signal.SIGCONT)
    run = finish(first)
    assert run.returncode == 0, run.log
    assert temporaries(out) == []
    assert_archive_of(archive_to, method, big_overlay.upper)
