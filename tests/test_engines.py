"""End to end: real engines run a real container, then the installed hook at poststop.

Each scenario runs ONE container whose command changes two image mounts
(/d1, /d2) and leaves a third one read-only (/ro). Its annotations ask for
four archives at once:

    copy  /d1 -> copy       method copy,   success copy.done
    tgz   /d2 -> d2.tar.gz  method tar.gz, success tgz.done, tar-content-owner 1234:5678
    raw   /d1 -> d1.tar.gz  method tar.gz, owners as the hook sees them
    ro    /ro -> ro         no upperdir: must fail in the log, write nothing

and the tests below check what the hook left on disk. Engines exit 0 even
when a poststop hook fails, so nothing here trusts an engine's exit status
for the hook: every assertion shows the hook's log (--log-file) on failure.

Everything is set up here (images, configs, the rootless user, /dev/fuse)
and removed afterwards. Outside CI, a scenario whose tools are missing is
skipped with the reason; with CI=true it fails instead.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import Overlay, archive_annotations, is_root, state_json, write_bundle
from engines import (
    FUSE_OVERLAYFS,
    TEST_USER,
    Podman,
    User,
    build_oci_image,
    build_rootfs,
    busybox_path,
    ensure_fuse_device,
    ensure_user,
    remove_tree,
    require,
    run,
    runc_config,
    scratch_dir,
)

OWNER = (1234, 5678)
BB_IMAGE = "localhost/e2e-bb"
DATA_IMAGE = "localhost/e2e-data"

# The container's command, run as `sh -c CHANGES sh /d1 /d2`: per mount a new
# file, a deleted file and a deleted dir (whiteouts), a dir deleted and made
# again (opaque) and a chown'd dir. keep.txt is left alone.
CHANGES = """set -e
for d in "$@"; do
  echo new > "$d/new.txt"
  rm "$d/delete-me.txt"
  rm -r "$d/gone"
  rm -r "$d/opaque"
  mkdir "$d/opaque"
  echo fresh > "$d/opaque/fresh.txt"
  mkdir "$d/owned"
  echo owned > "$d/owned/file"
  chown -R 1234:5678 "$d/owned"
done
"""


def write_data_tree(root: Path) -> Path:
    """The data image: what the container changes."""
    for d in ("gone", "opaque"):
        (root / d).mkdir(parents=True)
    (root / "keep.txt").write_text("keep\n")
    (root / "delete-me.txt").write_text("delete me\n")
    (root / "gone" / "g.txt").write_text("g\n")
    (root / "opaque" / "old.txt").write_text("old\n")
    return root


# --- scenarios ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    engine: str  # podman, runc or hand
    dirname: str  # short: podman's runroot must stay within 50 characters
    rootless: bool = False
    fuse: bool = False

    @property
    def opaque_xattr(self) -> str:
        """The xattr marking an opaque dir in this scenario's upperdir."""
        if self.fuse:
            return "user.fuseoverlayfs.opaque" if self.rootless else "trusted.overlay.opaque"
        return "user.overlay.opaque" if self.rootless else "trusted.overlay.opaque"

    @property
    def opaque_entries(self) -> list[str]:
        """What the recreated dir holds in the upperdir (and so in the archive).

        fuse-overlayfs marks a new dir opaque with two more entries: an empty
        file .wh..wh..opq and a whiteout .wh..opq; they are kept as they are.
        """
        return [".wh..opq", ".wh..wh..opq", "fresh.txt"] if self.fuse else ["fresh.txt"]


SCENARIOS = [
    Scenario("podman-rootful-native", "podman", "native"),
    Scenario("podman-rootful-fuse", "podman", "fuse", fuse=True),
    Scenario("podman-rootless-native", "podman", "rl-native", rootless=True),
    Scenario("podman-rootless-fuse", "podman", "rl-fuse", rootless=True, fuse=True),
    Scenario("runc", "runc", "runc"),
    Scenario("by-hand", "hand", "by-hand"),
]


@dataclass(frozen=True)
class Outputs:
    """Where one container's archives, success files and hook log go."""

    dir: Path

    copy = property(lambda self: self.dir / "copy")
    copy_done = property(lambda self: self.dir / "copy.done")
    tgz = property(lambda self: self.dir / "d2.tar.gz")
    tgz_done = property(lambda self: self.dir / "tgz.done")
    raw = property(lambda self: self.dir / "d1.tar.gz")
    ro = property(lambda self: self.dir / "ro")
    ro_done = property(lambda self: self.dir / "ro.done")
    log = property(lambda self: self.dir / "hook.log")

    def annotations(self) -> dict[str, str]:
        return {
            **archive_annotations(
                "copy", mount_point="/d1", archive_to=str(self.copy), method="copy",
                success=str(self.copy_done),
            ),
            **archive_annotations(
                "tgz", mount_point="/d2", archive_to=str(self.tgz), method="tar.gz",
                success=str(self.tgz_done), tar_content_owner=f"{OWNER[0]}:{OWNER[1]}",
            ),
            **archive_annotations(
                "raw", mount_point="/d1", archive_to=str(self.raw), method="tar.gz",
            ),
            **archive_annotations(
                "ro", mount_point="/ro", archive_to=str(self.ro), success=str(self.ro_done),
            ),
        }  # fmt: skip


def lstat_owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


@dataclass
class Result:
    """One scenario's container run, kept for the tests to look at."""

    scenario: Scenario
    out: Outputs
    host_uid: int  # who owns the archives on the host
    engine_output: str
    seconds: float
    ns_owner: Callable[[Path], tuple[int, int]] = lstat_owner  # owner seen by the hook
    hook_exit: int | None = None  # known only when the test runs the hook itself

    def log(self) -> str:
        try:
            return self.out.log.read_text()
        except OSError as err:
            return f"(no hook log: {err})"

    def diag(self) -> str:
        listing = sorted(str(p.relative_to(self.out.dir)) for p in self.out.dir.rglob("*"))
        return (
            f"\n[{self.scenario.name}, ran {self.seconds:.1f}s] outputs: {listing}\n"
            f"--- hook log {self.out.log}:\n{self.log()}"
            f"--- engine output:\n{self.engine_output}"
        )


# --- requirements -------------------------------------------------------------------------


def require_tools(scenario: Scenario) -> None:
    require(is_root(), "needs root (mounts, engines, a rootless user)")
    require(busybox_path() is not None, "busybox missing (apt-get install busybox-static)")
    tools = {"podman": ["podman", "runc", "umoci"], "runc": ["runc"], "hand": []}[scenario.engine]
    if scenario.rootless:
        tools += ["runuser", "newuidmap", "newgidmap", "useradd"]
    for tool in tools:
        require(shutil.which(tool) is not None, f"{tool} not installed")
    if scenario.fuse:
        require(Path(FUSE_OVERLAYFS).exists(), "fuse-overlayfs not installed")
        require(Path("/dev/fuse").exists(), "no /dev/fuse")


# --- session set-up ---------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    rootfs: Path
    data: Path
    layout: Path

    def oci_refs(self) -> tuple[str, str]:
        """(busybox, data) as oci: references, built on first use."""
        if not (self.layout / "index.json").exists():
            build_oci_image(self.layout, "bb", self.rootfs)
            build_oci_image(self.layout, "data", self.data)
        return f"oci:{self.layout}:bb", f"oci:{self.layout}:data"


@pytest.fixture(scope="session")
def e2e_base() -> Iterator[Path]:
    """A world-reachable dir for all engine state (not /tmp/pytest-of-root: 0700)."""
    require(is_root(), "needs root")
    base = scratch_dir("ao-e2e-")  # short: see Podman
    base.chmod(0o755)
    yield base
    remove_tree(base)


@pytest.fixture(scope="session")
def images(e2e_base: Path) -> Images:
    require(is_root(), "needs root")
    require(busybox_path() is not None, "busybox missing (apt-get install busybox-static)")
    root = e2e_base / "images"
    return Images(build_rootfs(root / "rootfs"), write_data_tree(root / "data"), root / "oci")


def require_user_can_run(user: User, hook_bin: Path) -> None:
    proc = run(["runuser", "-u", user.name, "--", str(hook_bin), "--help"], check=False)
    assert proc.returncode == 0, (
        f"{user.name} cannot run {hook_bin}: rootless podman would skip the hook silently. "
        f"The hook's venv must be world-readable and made from /usr/bin/python3.\n{proc.stderr}"
    )


@pytest.fixture(scope="session")
def rootless_user(hook_bin: Path) -> User:
    user = ensure_user(TEST_USER)
    require_user_can_run(user, hook_bin)
    return user


# --- one run per scenario -------------------------------------------------------------------


def make_outputs(parent: Path, user: User | None = None) -> Outputs:
    out = Outputs(parent / "out")
    out.dir.mkdir(parents=True)
    if user is not None:
        os.chown(out.dir, user.uid, user.gid)
    return out


def podman_flags(out: Outputs) -> list[str]:
    flags = ["--rm", "--network", "none", "--pull", "never"]
    for key, value in out.annotations().items():
        flags += ["--annotation", f"{key}={value}"]
    for dest, rw in (("/d1", "true"), ("/d2", "true"), ("/ro", "false")):
        flags += ["--mount", f"type=image,source={DATA_IMAGE},destination={dest},rw={rw}"]
    return flags


def run_podman(request: pytest.FixtureRequest, scenario: Scenario) -> Iterator[Result]:
    hook_bin: Path = request.getfixturevalue("hook_bin")
    images: Images = request.getfixturevalue("images")
    user = request.getfixturevalue("rootless_user") if scenario.rootless else None
    if scenario.fuse and scenario.rootless:
        ensure_fuse_device()
    bb_ref, data_ref = images.oci_refs()
    root = request.getfixturevalue("e2e_base") / scenario.dirname
    podman = Podman(root, user=user, fuse=scenario.fuse)
    try:
        podman.setup()
        out = make_outputs(root, user)
        podman.install_hook(hook_bin, out.log, allow_dir=out.dir)
        podman.load(bb_ref, BB_IMAGE)
        podman.load(data_ref, DATA_IMAGE)
        start = time.monotonic()
        proc = podman("run", *podman_flags(out), BB_IMAGE, "sh", "-c", CHANGES, "sh", "/d1", "/d2",
                      check=False)  # fmt: skip
        result = Result(
            scenario, out, host_uid=user.uid if user else 0,
            engine_output=proc.stdout + proc.stderr, seconds=time.monotonic() - start,
        )  # fmt: skip
        if user is not None:
            result.ns_owner = lambda path: ns_owner(podman, path)
        assert proc.returncode == 0, f"the container failed{result.diag()}"
        yield result
    finally:
        podman.teardown()


def ns_owner(podman: Podman, path: Path) -> tuple[int, int]:
    """Owner of path inside rootless podman's user namespace (where the hook ran)."""
    uid, gid = podman("unshare", "stat", "-c", "%u %g", str(path)).stdout.split()
    return int(uid), int(gid)


def new_overlay(root: Path, lower_from: Path) -> Overlay:
    ovl = Overlay(root)
    shutil.copytree(lower_from, ovl.lower, symlinks=True)
    for d in (ovl.upper, ovl.work, ovl.merged):
        d.mkdir(parents=True)
    return ovl


def ro_bind(source: Path) -> dict:
    return {"destination": "/ro", "type": "bind", "source": str(source), "options": ["rbind", "ro"]}


def run_runc(request: pytest.FixtureRequest, scenario: Scenario) -> Iterator[Result]:
    hook_bin: Path = request.getfixturevalue("hook_bin")
    images: Images = request.getfixturevalue("images")
    root = request.getfixturevalue("e2e_base") / scenario.dirname
    state_root = root / "runc-state"
    container = f"archive-overlay-e2e-{secrets.token_hex(4)}"
    try:
        out = make_outputs(root)
        d1, d2 = (new_overlay(root / d, images.data) for d in ("d1", "d2"))
        runc_config(
            root / "bundle", images.rootfs,
            args=["sh", "-c", CHANGES, "sh", "/d1", "/d2"],
            mounts=[d1.mount_entry("/d1"), d2.mount_entry("/d2"), ro_bind(images.data)],
            annotations=out.annotations(),
            poststop=[{"path": str(hook_bin), "args": [str(hook_bin), "--log-file", str(out.log)]}],
        )  # fmt: skip
        start = time.monotonic()
        proc = run(["runc", "--root", str(state_root), "run", "--bundle", str(root / "bundle"),
                    container], check=False)  # fmt: skip
        result = Result(scenario, out, host_uid=0, engine_output=proc.stdout + proc.stderr,
                        seconds=time.monotonic() - start)  # fmt: skip
        assert proc.returncode == 0, f"the container failed{result.diag()}"
        yield result
    finally:
        run(["runc", "--root", str(state_root), "delete", "--force", container], check=False)
        remove_tree(root)


def run_by_hand(request: pytest.FixtureRequest, scenario: Scenario) -> Iterator[Result]:
    """`archive_overlay < state.json`, the bundle's mounts made and changed here."""
    hook_bin: Path = request.getfixturevalue("hook_bin")
    images: Images = request.getfixturevalue("images")
    root = request.getfixturevalue("e2e_base") / scenario.dirname
    try:
        out = make_outputs(root)
        d1, d2 = (new_overlay(root / d, images.data) for d in ("d1", "d2"))
        for ovl in (d1, d2):
            ovl.mount()
        run(["/bin/sh", "-c", CHANGES, "sh", str(d1.merged), str(d2.merged)])
        for ovl in (d1, d2):
            ovl.unmount()  # the container has stopped
        mounts = [d1.mount_entry("/d1"), d2.mount_entry("/d2"), ro_bind(images.data)]
        bundle = write_bundle(root / "bundle", mounts, out.annotations())
        state = root / "state.json"
        state.write_text(state_json(bundle))
        start = time.monotonic()
        with state.open("rb") as stdin:
            proc = subprocess.run(
                [str(hook_bin), "--log-file", str(out.log)],
                stdin=stdin, env={}, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        yield Result(scenario, out, host_uid=0, engine_output=f"hook stderr:\n{proc.stderr}",
                     seconds=time.monotonic() - start, hook_exit=proc.returncode)  # fmt: skip
    finally:
        remove_tree(root)


RUNNERS = {"podman": run_podman, "runc": run_runc, "hand": run_by_hand}


@pytest.fixture(scope="module", params=SCENARIOS, ids=lambda s: s.name)
def ran(request: pytest.FixtureRequest) -> Iterator[Result]:
    """The scenario's one container run (module scope: all tests share it)."""
    scenario: Scenario = request.param
    require_tools(scenario)
    yield from RUNNERS[scenario.engine](request, scenario)


# --- checks ---------------------------------------------------------------------------------


def xattrs(path: Path) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in names}


def is_whiteout_mode(mode: int, major: int, minor: int) -> bool:
    return stat.S_ISCHR(mode) and (major, minor) == (0, 0)


def assert_success_file(path: Path, ran: Result) -> None:
    assert path.is_file(), f"success file {path} missing{ran.diag()}"
    assert path.stat().st_size == 0


def read_tar(path: Path) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    """name -> (member, data of a regular file)."""
    members = {}
    with tarfile.open(path, "r:gz") as tar:
        for info in tar:
            data = tar.extractfile(info).read() if info.isreg() else None
            members[info.name] = (info, data)
    return members


def assert_tree_in_tar(path: Path, ran: Result) -> dict[str, tarfile.TarInfo]:
    """The changes of CHANGES, as the tar must hold them."""
    assert path.is_file(), f"{path} missing{ran.diag()}"
    assert os.stat(path).st_uid == ran.host_uid, ran.diag()
    tar = read_tar(path)
    members = {name: info for name, (info, _) in tar.items()}
    assert "." in members, f"no root entry ./ in {sorted(members)}{ran.diag()}"
    assert all(name == "." or name.startswith("./") for name in members), sorted(members)
    assert tar["./new.txt"][1] == b"new\n"
    assert tar["./owned/file"][1] == b"owned\n"
    assert "./keep.txt" not in members, "unchanged files stay in the image"
    for name in ("./delete-me.txt", "./gone"):
        info = members[name]
        assert info.ischr() and (info.devmajor, info.devminor) == (0, 0), (
            f"{name}: whiteout expected, got type {info.type!r}"
        )
    opaque = members["./opaque"]
    xattr = f"SCHILY.xattr.{ran.scenario.opaque_xattr}"
    assert opaque.isdir() and opaque.pax_headers.get(xattr) == "y", (
        f"opaque marker {xattr} missing: {opaque.pax_headers}{ran.diag()}"
    )
    inside = sorted(n[len("./opaque/") :] for n in members if n.startswith("./opaque/"))
    assert inside == ran.scenario.opaque_entries, ran.diag()
    if ran.scenario.fuse:
        assert (
            members["./opaque/.wh..wh..opq"].isreg() and members["./opaque/.wh..wh..opq"].size == 0
        )
        marker = members["./opaque/.wh..opq"]
        assert marker.ischr() and (marker.devmajor, marker.devminor) == (0, 0)
    return members


# --- tests ----------------------------------------------------------------------------------


def test_copy_archive(ran: Result) -> None:
    copy = ran.out.copy
    assert copy.is_dir(), f"copy archive {copy} missing{ran.diag()}"
    assert (copy / "new.txt").read_text() == "new\n"
    assert not (copy / "keep.txt").exists(), "unchanged files stay in the image"
    for name in ("delete-me.txt", "gone"):
        st = os.lstat(copy / name)
        assert is_whiteout_mode(st.st_mode, os.major(st.st_rdev), os.minor(st.st_rdev)), (
            f"{name}: whiteout (char 0/0) expected, got mode {stat.filemode(st.st_mode)}"
        )
    opaque = copy / "opaque"
    xattr = ran.scenario.opaque_xattr
    assert xattrs(opaque).get(xattr) == b"y", f"{xattr} missing: {xattrs(opaque)}{ran.diag()}"
    assert sorted(os.listdir(opaque)) == ran.scenario.opaque_entries, ran.diag()
    assert (opaque / "fresh.txt").read_text() == "fresh\n"
    assert_success_file(ran.out.copy_done, ran)


def test_copy_archive_owners(ran: Result) -> None:
    """Owned by the user on the host, with the owners of the hook's namespace inside."""
    copy = ran.out.copy
    assert copy.is_dir(), ran.diag()
    assert os.stat(copy).st_uid == ran.host_uid, ran.diag()
    assert ran.ns_owner(copy / "new.txt") == (0, 0)
    assert ran.ns_owner(copy / "owned") == OWNER
    assert ran.ns_owner(copy / "owned" / "file") == OWNER


def test_targz_archive_with_content_owner(ran: Result) -> None:
    members = assert_tree_in_tar(ran.out.tgz, ran)
    wrong = {n: (m.uid, m.gid, m.uname, m.gname) for n, m in members.items()
             if (m.uid, m.gid, m.uname, m.gname) != (*OWNER, "", "")}  # fmt: skip
    assert not wrong, f"tar-content-owner 1234:5678 not applied to: {wrong}"
    assert_success_file(ran.out.tgz_done, ran)


def test_targz_archive_keeps_namespace_owners(ran: Result) -> None:
    members = assert_tree_in_tar(ran.out.raw, ran)
    assert (members["./new.txt"].uid, members["./new.txt"].gid) == (0, 0)
    assert (members["./owned/file"].uid, members["./owned/file"].gid) == OWNER


def error_lines(log: str, archive: str) -> list[str]:
    pattern = re.compile(rf'\barchive="?{re.escape(archive)}"?(\s|$)')
    return [line for line in log.splitlines() if "level=error" in line and pattern.search(line)]


def test_read_only_mount_fails_clearly(ran: Result) -> None:
    assert error_lines(ran.log(), "ro"), f"no level=error line for archive=ro{ran.diag()}"
    assert not ran.out.ro.exists(), ran.diag()
    assert not ran.out.ro_done.exists(), "success file written for a failed archive"
    # ... while the container's other archives are written all the same
    for path in (ran.out.copy_done, ran.out.tgz_done, ran.out.raw):
        assert path.exists(), f"{path} missing{ran.diag()}"
    if ran.hook_exit is not None:
        assert ran.hook_exit == 1, f"exit status 1 expected: an archive failed{ran.diag()}"
