"""The host is left as it was: what the rootless tests need (an account with sub-ids, a
/dev/fuse open to everybody, podman's shm locks) exists only in the session's private mount
namespace (conftest.keep_host_clean); the host's files are read through an fd opened before
the session left the host's namespace.  pytest_sessionfinish checks the same after a run."""

from __future__ import annotations

import os
import pwd
import secrets
import stat
from pathlib import Path

import conftest
from conftest import requires_root
from engines import Podman, ensure_fuse_device, ensure_user, scratch_dir

pytestmark = requires_root


def host_read(name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=conftest.HOST_ROOT)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def test_the_session_runs_outside_the_hosts_namespace():
    assert conftest.HOST_ROOT is not None, "conftest did not enter a private mount namespace"
    parent = f"/proc/{os.getppid()}/ns/mnt"  # pytest's parent stayed in the host's namespace
    assert os.readlink("/proc/self/ns/mnt") != os.readlink(parent)


def test_the_rootless_account_is_made_in_the_session_only():
    """ensure_user, as the rootless tests call it: the account and its sub-ids are there for
    the session (runuser, newuidmap read them), and not in the host's files."""
    name = f"ao-probe{secrets.token_hex(3)}"
    user = ensure_user(name)
    assert pwd.getpwnam(name).pw_uid == user.uid
    for path in ("etc/subuid", "etc/subgid"):
        assert f"{name}:" in Path("/", path).read_text()
    for path in ("etc/passwd", "etc/group", "etc/shadow", "etc/subuid", "etc/subgid"):
        assert name.encode() not in host_read(path), f"/{path} of the host names {name}"
        assert host_read(path) == conftest.HOST_BEFORE[path], f"/{path} of the host changed"
    for path in ("var/log/lastlog", "var/log/faillog"):
        if conftest.HOST_BEFORE[path] is not None:
            assert host_read(path) == conftest.HOST_BEFORE[path], f"/{path} of the host changed"


def test_the_fuse_device_opened_to_everybody_is_the_sessions_own():
    if not Path("/dev/fuse").exists():
        return  # nothing to open: the fuse tests fail with their own message
    ensure_fuse_device()
    assert stat.S_IMODE(os.stat("/dev/fuse").st_mode) == 0o666
    host = os.stat("dev/fuse", dir_fd=conftest.HOST_ROOT)
    assert (oct(host.st_mode), host.st_rdev) == conftest.HOST_BEFORE["dev/fuse"]
    assert os.stat("/dev/fuse").st_rdev == host.st_rdev  # the same device, another node
    assert os.stat("/dev/fuse").st_ino != host.st_ino


def test_podmans_shm_lock_is_the_sessions_own(hook_bin):
    """Rootful podman makes /dev/shm/libpod_lock: in the session's /dev/shm, a tmpfs of its
    own, not in the host's."""
    podman = Podman(scratch_dir("ao-shm-"))
    try:
        podman.setup()
        podman("info")
    finally:
        podman.teardown()
    assert "libpod_lock" in os.listdir("/dev/shm")
    host_shm = os.stat("dev/shm", dir_fd=conftest.HOST_ROOT)
    assert os.stat("/dev/shm").st_dev != host_shm.st_dev
    assert conftest.host_changes() == []
