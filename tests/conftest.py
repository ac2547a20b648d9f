"""Shared fixtures: the installed hook, real overlay mounts, bundles and hook runs.

Every test that archives something runs the *installed* console script as a
subprocess, with an empty environment (as podman and runc run it) and a piped
state JSON, on overlay mounts made here with mount(8).
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PREFIX = "com.launchplatform.oci-hooks.archive-overlay."


def project_version() -> str:
    """The version pyproject.toml gives the release."""
    text = (REPO / "pyproject.toml").read_text()
    return text.split('\nversion = "', 1)[1].split('"', 1)[0]


def is_root() -> bool:
    return os.geteuid() == 0


CLONE_NEWNS = 0x00020000


# What the suite must leave on the host as it found it (README, Tests): the accounts the
# rootless tests add, the fuse device they open to everybody, and podman's shm locks.
HOST_FILES = (
    "etc/passwd", "etc/group", "etc/shadow", "etc/gshadow", "etc/subuid", "etc/subgid",
    "var/log/lastlog", "var/log/faillog",
)  # fmt: skip
HOST_ROOT: int | None = None  # an fd on the host's "/", opened before the session's unshare


def host_state(root_fd: int) -> dict[str, object]:
    """The host's accounts, /dev/fuse's mode and /dev/shm's names, read through root_fd
    (the host's mount namespace, whatever namespace the caller is in)."""
    state: dict[str, object] = {}
    for name in HOST_FILES:
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=root_fd)
        except FileNotFoundError:
            state[name] = None
            continue
        with os.fdopen(fd, "rb") as f:
            state[name] = f.read()
    try:
        st = os.stat("dev/fuse", dir_fd=root_fd)
        state["dev/fuse"] = (oct(st.st_mode), st.st_rdev)
    except FileNotFoundError:
        state["dev/fuse"] = None
    shm = os.open("dev/shm", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
    try:
        state["dev/shm"] = sorted(os.listdir(shm))
    finally:
        os.close(shm)
    return state


HOST_BEFORE: dict[str, object] = {}


def keep_host_clean() -> None:
    """Run the whole session in a private mount namespace where what the tests (and the
    engines they start) write outside their temporary directories lands on a scratch
    directory instead of the host:

    - /var/lib is an overlay onto it: rootful podman and skopeo write their blob-info
      cache to /var/lib/containers/cache whatever their configuration says;
    - /etc is an overlay onto it: the rootless tests' account (useradd, usermod
      --add-subuids/--add-subgids) exists only in the session;
    - /dev/shm is a tmpfs of its own: podman's shm locks (libpod_lock,
      libpod_rootless_lock_UID);
    - /dev/fuse is a device node of its own, bind-mounted over the host's, which the
      rootless tests may make mode 0666.

    Every process the tests start (podman, the hook, the rootless user's podman, newuidmap)
    inherits the namespace.  The host's state is taken first, and compared at the end of
    the session (pytest_sessionfinish)."""
    global HOST_ROOT
    if not is_root() or os.environ.get("ARCHIVE_OVERLAY_TEST_NS") == str(os.getpid()):
        return
    import ctypes
    import tempfile

    HOST_ROOT = os.open("/", os.O_PATH | os.O_DIRECTORY)
    HOST_BEFORE.update(host_state(HOST_ROOT))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) for the test session")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    scratch = Path(tempfile.mkdtemp(prefix="ao-var-lib-", dir="/var/tmp"))
    for lower in ("/var/lib", "/etc"):
        name = lower.strip("/").replace("/", "-")
        (scratch / f"{name}.upper").mkdir()
        (scratch / f"{name}.work").mkdir()
        opts = f"lowerdir={lower},upperdir={scratch}/{name}.upper,workdir={scratch}/{name}.work"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, lower], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/dev/shm"], check=True)
    if os.path.exists("/dev/fuse"):
        fuse = scratch / "fuse"
        os.mknod(fuse, 0o600 | stat.S_IFCHR, os.stat("/dev/fuse").st_rdev)
        subprocess.run(["mount", "--bind", str(fuse), "/dev/fuse"], check=True)
    os.environ["ARCHIVE_OVERLAY_TEST_NS"] = str(os.getpid())
    import atexit

    atexit.register(shutil.rmtree, scratch, True)  # the namespace goes with the process


keep_host_clean()


def pytest_configure(config) -> None:
    """Every skip is listed with its reason in the summary (as -rs would)."""
    if "s" not in config.option.reportchars and "a" not in config.option.reportchars:
        config.option.reportchars += "s"


def host_changes() -> list[str]:
    """What differs on the host from the session's start (empty outside the namespace)."""
    if HOST_ROOT is None:
        return []
    now = host_state(HOST_ROOT)
    changed = []
    for name, before in HOST_BEFORE.items():
        if name == "dev/shm":
            added = sorted(set(now[name]) - set(before))
            if added:
                changed.append(f"/dev/shm gained {', '.join(added)}")
        elif now[name] != before:
            changed.append(f"/{name} changed")
    return changed


HOST_CHANGES = pytest.StashKey[list]()


def pytest_sessionfinish(session, exitstatus) -> None:
    """The host is as it was: fail the session if the suite changed the host's accounts,
    /dev/fuse or /dev/shm."""
    changed = host_changes()
    session.config.stash[HOST_CHANGES] = changed
    if changed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    changed = config.stash.get(HOST_CHANGES, [])
    if changed:
        terminalreporter.section("the host was changed", red=True)
        for line in changed:
            terminalreporter.line(f"FAILED host: {line}", red=True)


requires_root = pytest.mark.skipif(not is_root(), reason="needs root: mounts overlayfs")


def hook_venv() -> Path:
    """The venv holding the hook under test: this interpreter's, unless overridden."""
    return Path(os.environ.get("ARCHIVE_OVERLAY_VENV", sys.prefix))


def _installed_module(venv: Path) -> Path | None:
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import archive_overlay; print(archive_overlay.__file__)",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd="/",
    )
    return Path(out.stdout.strip()) if out.returncode == 0 else None


@pytest.fixture(scope="session")
def hook_bin() -> Path:
    """The installed `archive_overlay` script, reinstalled from this tree if stale."""
    venv = hook_venv()
    installed = _installed_module(venv)
    if installed is None or not filecmp.cmp(installed, REPO / "archive_overlay.py", shallow=False):
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
             "--force-reinstall", str(REPO)],
            check=True,
        )  # fmt: skip
    script = venv / "bin" / "archive_overlay"
    assert script.exists(), f"{script} missing: install the project into {venv}"
    keep_read_only(venv)
    return script


def keep_read_only(venv: Path) -> None:
    """The venv, once installed, read-only for the rest of the session (a read-only bind
    mount in the session's namespace): a run as root cannot write a missing .pyc there, so
    every run meets the venv as a rootless user does, and test_startup's bytecode test sees
    what the install left."""
    if HOST_ROOT is None or not os.access(venv, os.W_OK):
        return
    subprocess.run(["mount", "--bind", str(venv), str(venv)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(venv)], check=True)


@dataclass
class Overlay:
    """A real overlayfs mount: lower (the image), upper (the changes), merged."""

    root: Path

    @property
    def lower(self) -> Path:
        return self.root / "lower"

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    def options(self) -> list[str]:
        return [f"lowerdir={self.lower}", f"upperdir={self.upper}", f"workdir={self.work}"]

    def mount(self, extra: str = "") -> None:
        opts = ",".join(self.options() + ([extra] if extra else []))
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(self.merged)], check=True
        )

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.merged)], check=False)

    def mount_entry(self, destination: str = "/data") -> dict:
        """The mount as podman writes it into config.json (rootful, native overlay)."""
        return {
            "destination": destination,
            "type": "overlay",
            "source": str(self.merged),
            "options": self.options() + ["private"],
        }


@pytest.fixture
def make_overlay(tmp_path: Path):
    """Factory: make_overlay(name) -> an Overlay with empty lower/upper, not yet mounted."""
    made: list[Overlay] = []

    def make(name: str = "ovl") -> Overlay:
        ovl = Overlay(tmp_path / name)
        for d in (ovl.lower, ovl.upper, ovl.work, ovl.merged):
            d.mkdir(parents=True)
        made.append(ovl)
        return ovl

    yield make
    for ovl in made:
        ovl.unmount()


def write_bundle(bundle: Path, mounts: list[dict], annotations: dict[str, str]) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    config = {"ociVersion": "1.0.2", "mounts": mounts, "annotations": annotations}
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def archive_annotations(name: str, **args: str) -> dict[str, str]:
    """archive_annotations("data", mount_point="/data", archive_to=...) -> annotations."""
    return {f"{PREFIX}{name}.{arg.replace('_', '-')}": value for arg, value in args.items()}


def state_json(bundle: Path, annotations: dict[str, str] | None = None) -> str:
    state = {"ociVersion": "1.0.2", "id": "test", "status": "stopped", "bundle": str(bundle)}
    if annotations is not None:
        state["annotations"] = annotations
    return json.dumps(state)


@pytest.fixture
def run_hook(hook_bin: Path):
    """run_hook(stdin, *args) -> CompletedProcess; empty environment, as engines run it."""

    def run(stdin: str | bytes, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        return subprocess.run(
            [str(hook_bin), *args],
            input=data,
            check=False,
            capture_output=True,
            env={},
            timeout=timeout,
        )

    return run


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
