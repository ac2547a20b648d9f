"""Helpers for the end-to-end tests: images, engine configs, the rootless user.

Each engine set-up keeps all of its state (storage, run dirs, configs, hooks
dir, home) under one directory of its own, made under /var/tmp so that a
rootless user can reach it, and removes it at teardown.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOOK_JSON = REPO / "hooks.d" / "archive-overlay.json"
FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
BUSYBOX_APPLETS = (
    "sh", "ls", "rm", "echo", "mkdir", "touch", "cat", "ln", "mknod", "mv", "chown", "chmod",
    "mkfifo", "true", "stat",
)  # fmt: skip
ROOTFS_DIRS = ("bin", "dev", "proc", "sys", "tmp", "etc", "d1", "d2", "ro")
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 120
HOOK_WAIT = 30  # seconds podman's cleanup may take to run the hook after `podman run`
RUNROOT_MAX = 50
TEST_USER = os.environ.get("ARCHIVE_OVERLAY_TEST_USER", "ao-rootless")


def require(ok: bool, reason: str) -> None:
    """A tool or set-up the suite needs: missing, the test fails saying what to install
    (README, Tests), never a silent skip."""
    if not ok:
        pytest.fail(f"the suite needs it, but: {reason}", pytrace=False)


def needs_kernel(ok: bool, reason: str) -> None:
    """A kernel capability some test needs: missing, the test is skipped with the kernel's
    release and the reason, listed in the summary (conftest adds -rs)."""
    if not ok:
        pytest.skip(f"kernel {os.uname().release}: {reason}")


class CommandFailed(AssertionError):
    pass


def run(
    cmd: list[str],
    *,
    input: str | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess:
    """Run cmd, capturing text output; with check, fail showing that output.

    It runs in "/": the checkout may sit where the rootless user cannot enter
    (CI clones under /root, mode 0700), and podman would fail to chdir there.
    """
    proc = subprocess.run(
        cmd, input=input, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL, check=False, cwd="/",
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise CommandFailed(
            f"{' '.join(cmd)} -> exit {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def scratch_dir(prefix: str) -> Path:
    """A new directory under /var/tmp (reachable by the rootless user) with a short name
    that podman accepts inside an image reference: lowercase letters and digits only
    (mkdtemp's names may end in "_", which `podman pull oci:DIR` rejects)."""
    while True:
        path = Path("/var/tmp") / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            continue


# --- the README's blocks, run as written ---------------------------------------------------

README = REPO / "README.md"


def readme_block(name: str) -> str:
    """The fenced block that follows `<!-- test: name -->` in the README."""
    text = README.read_text()
    marker = f"<!-- test: {name} -->\n"
    assert text.count(marker) == 1, f"README has no single {marker!r}"
    after = text.split(marker, 1)[1]
    assert after.startswith("```sh\n"), f"{marker!r} is not followed by a sh block"
    return after[len("```sh\n") :].split("```\n", 1)[0]


def run_readme_with_podman(hook_bin: Path, name: str | tuple[str, ...], allow_dir: str,
                           env: dict[str, str], in_namespace: str,
                           ) -> tuple[subprocess.CompletedProcess, str]:  # fmt: skip
    """The README block `name` (or blocks, one after the other), run by sh (dash) as written, with a private rootful podman set up
    as the README says (the hook in its hooks dir, confined to allow_dir), in a private mount
    namespace prepared by the shell commands in_namespace (tmpfs mounts over the paths the
    block writes).  The busybox image the block names as $IMAGE is at $BB.  Returns the
    run and a diagnostic with its output and the hook's log."""
    base = scratch_dir("ao-rd-")
    base.chmod(0o755)
    podman = Podman(base / "p")
    try:
        podman.setup()
        podman.install_hook(hook_bin, base / "hook.log", allow_dir=Path(allow_dir))
        build_oci_image(base / "img", "bb", build_rootfs(base / "rootfs"))
        env = podman.env() | {"IMAGE": "localhost/readme-bb", "BB": f"oci:{base / 'img'}:bb"} | env
        names = (name,) if isinstance(name, str) else name
        script = "\n".join(readme_block(n) for n in names)
        setup = (
            in_namespace
            + ' && podman tag $(podman pull -q "$BB") localhost/readme-bb && exec sh -e -c "$0"'
        )
        proc = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", setup,
                    script], env=env, check=False)  # fmt: skip
        log = base / "hook.log"
        diag = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
        diag += log.read_text(errors="replace") if log.exists() else "(no hook log)"
    finally:
        podman.teardown()
        remove_tree(base)
    return proc, diag


# --- images -------------------------------------------------------------------------------


def busybox_path() -> Path | None:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def build_rootfs(dest: Path) -> Path:
    """A minimal rootfs: a static busybox and its applets as symlinks."""
    busybox = busybox_path()
    assert busybox is not None, "busybox missing: apt-get install busybox-static"
    for d in ROOTFS_DIRS:
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    return dest


def build_oci_image(layout: Path, tag: str, source: Path) -> str:
    """Add `source` as a one-layer image `tag` to the OCI layout; return `oci:` ref.

    The layout (not `podman import`) keeps podman's blob cache inside its own
    graphroot: `podman import` writes /var/lib/containers/cache as root.
    """
    if not (layout / "index.json").exists():
        run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:{tag}"])
    run(["umoci", "insert", "--image", f"{layout}:{tag}", str(source), "/"])
    run(["chmod", "-R", "a+rX", str(layout)])  # readable by the rootless user
    return f"oci:{layout}:{tag}"


# --- the rootless user --------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


SUBID_COUNT = 65536


def _subid_lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split(":") for line in path.read_text().splitlines() if line.count(":") == 2]


def _ensure_subids(user: User) -> None:
    """Give the user one sub-id range in each file unless it has one already."""
    for path, option in (
        (Path("/etc/subuid"), "--add-subuids"),
        (Path("/etc/subgid"), "--add-subgids"),
    ):
        lines = _subid_lines(path)
        if any(name in (user.name, str(user.uid)) for name, _, _ in lines):
            continue
        start = max([100000] + [int(s) + int(c) for _, s, c in lines])
        run(["usermod", option, f"{start}-{start + SUBID_COUNT - 1}", user.name])


def ensure_user(name: str) -> User:
    """The rootless test user, created (with sub-ids, no home) if missing: in the session's
    /etc, an overlay of conftest's private mount namespace, never in the host's."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "--no-create-home", "--no-log-init", "--shell", "/usr/sbin/nologin", name])
        entry = pwd.getpwnam(name)
    user = User(name, entry.pw_uid, entry.pw_gid)
    _ensure_subids(user)
    return user


def ensure_fuse_device() -> None:
    """Rootless fuse-overlayfs needs /dev/fuse open to everybody: the session's own node
    (conftest bind-mounts it over the host's), never the host's."""
    os.chmod("/dev/fuse", 0o666)


# --- mounts -------------------------------------------------------------------------------


def unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape")


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below root (this mount namespace), deepest first."""
    prefix = str(root)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = unescape_mountinfo(line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_under(root: Path) -> None:
    for point in mounts_under(root):
        if run(["umount", point], check=False).returncode != 0:
            run(["umount", "--lazy", point], check=False)


def remove_tree(root: Path) -> None:
    """rm -rf that first unmounts whatever is still mounted below root."""
    unmount_under(root)
    shutil.rmtree(root, ignore_errors=True)


# --- hooks ----------------------------------------------------------------------------------


def hook_config(hook_bin: Path, log_file: Path, allow_dir: Path | None = None) -> dict:
    """The project's hooks.d JSON, pointed at hook_bin, logging to log_file, and
    confined to allow_dir (as the README recommends) when given."""
    config = json.loads(HOOK_JSON.read_text())
    config["hook"]["path"] = str(hook_bin)
    config["hook"]["args"] = [str(hook_bin), "--log-file", str(log_file)]
    if allow_dir is not None:
        config["hook"]["args"] += ["--allow-dir", str(allow_dir)]
    return config


# --- podman -----------------------------------------------------------------------------------


def _toml_list(items: list[str]) -> str:
    return json.dumps(items)


@cache
def podman_version() -> tuple[int, ...]:
    """The installed podman's version ("podman version 5.4.2" -> (5, 4, 2)): podman 4 and 5
    differ in their network backend, their log and a fresh rootless store."""
    out = run(["podman", "--version"]).stdout
    return tuple(int(n) for n in re.findall(r"\d+", out.split()[-1])[:3])


def network_backend() -> str:
    """podman 5 is built without CNI (netavark only); Debian 12's podman 4 has CNI only."""
    return "netavark" if podman_version() >= (5,) else "cni"


@dataclass
class Podman:
    """A podman with its own storage, run dirs and configs under `root`.

    With `user`, every command runs as that user (rootless podman).
    """

    root: Path
    user: User | None = None
    fuse: bool = False

    @property
    def hooks_dir(self) -> Path:
        return self.root / "hooks.d"

    @property
    def graphroot(self) -> Path:
        return self.root / "storage"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def runroot(self) -> Path:
        """Rootless podman ignores storage.conf's runroot and uses $XDG_RUNTIME_DIR's."""
        return self.root / ("xdg/containers" if self.user is not None else "run")

    def setup(self) -> None:
        # podman refuses a runroot longer than 50 characters in the cleanup command
        # that conmon runs when the container exits; the run then stalls 20 s.
        assert len(str(self.runroot)) <= RUNROOT_MAX, f"{self.runroot}: too long for podman"
        names = ("hooks.d", "storage", "run", "tmp", "copy-tmp", "net", "home", "xdg")
        for name in names:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        (self.root / "xdg").chmod(0o700)
        (self.root / "storage.conf").write_text(self._storage_conf())
        (self.root / "containers.conf").write_text(self._containers_conf())
        if self.user is not None:
            run(["chown", "-R", f"{self.user.uid}:{self.user.gid}", str(self.root)])

    def _storage_conf(self) -> str:
        conf = [
            "[storage]",
            'driver = "overlay"',
            f"graphroot = {json.dumps(str(self.graphroot))}",
            f"runroot = {json.dumps(str(self.root / 'run'))}",  # rootful only
            # rootless podman ignores graphroot
            f"rootless_storage_path = {json.dumps(str(self.graphroot))}",
        ]
        if self.fuse:
            conf += ["[storage.options.overlay]", f"mount_program = {json.dumps(FUSE_OVERLAYFS)}"]
        return "\n".join(conf) + "\n"

    def _containers_conf(self) -> str:
        return "\n".join([
            "[containers]",
            f"default_ulimits = {_toml_list(['nofile=1024:1024', 'nproc=1024:1024'])}",
            "[network]",
            f"network_backend = {json.dumps(network_backend())}",
            f"network_config_dir = {json.dumps(str(self.root / 'net'))}",
            "[engine]",
            'runtime = "runc"',
            'cgroup_manager = "cgroupfs"',
            'events_logger = "file"',
            f"tmp_dir = {json.dumps(str(self.tmp_dir))}",
            f"image_copy_tmp_dir = {json.dumps(str(self.root / 'copy-tmp'))}",
            f"hooks_dir = {_toml_list([str(self.hooks_dir)])}",
        ]) + "\n"  # fmt: skip

    def env(self) -> dict[str, str]:
        return {
            "PATH": CLEAN_PATH,
            "HOME": str(self.root / "home"),
            "XDG_RUNTIME_DIR": str(self.root / "xdg"),
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
            # podman 5 on hybrid cgroups warns on every command that v1 is deprecated
            "PODMAN_IGNORE_CGROUPSV1_WARNING": "1",
        }

    def as_user(self, cmd: list[str]) -> list[str]:
        """cmd run with this podman's environment, as its user if rootless."""
        env = [f"{k}={v}" for k, v in self.env().items()]
        prefix = ["runuser", "-u", self.user.name, "--"] if self.user is not None else []
        return [*prefix, "env", "-i", *env, *cmd]

    def __call__(self, *args: str, input: str | None = None, check: bool = True):
        return run(self.as_user(["podman", *args]), input=input, check=check)

    def install_hook(self, hook_bin: Path, log_file: Path, allow_dir: Path | None = None) -> None:
        path = self.hooks_dir / "archive-overlay.json"
        path.write_text(json.dumps(hook_config(hook_bin, log_file, allow_dir), indent=2))
        path.chmod(0o644)

    def load(self, ref: str, name: str) -> None:
        image_id = self("pull", "--quiet", ref).stdout.strip().splitlines()[-1]
        self("tag", image_id, name)

    def _pause_pid(self) -> int | None:
        pid_file = self.tmp_dir / "pause.pid"
        try:
            return int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _kill_own_pause(self, pid: int | None) -> None:
        """Rootless podman's pause process, if `podman system reset` left it."""
        if pid is None or self.user is None:
            return
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        if str(self.user.uid) in uids and (b"catatonit" in cmdline or b"podman" in cmdline):
            os.kill(pid, signal.SIGKILL)

    def teardown(self) -> None:
        pause = self._pause_pid()
        self("rm", "--all", "--force", check=False)
        self("system", "reset", "--force", check=False)
        self._kill_own_pause(pause)
        remove_tree(self.root)


def wait_for_hook(log: Path, annotations: dict[str, str]) -> str:
    """The hook's log once it holds the outcome (written or failed) of each archive these
    annotations ask for.

    podman 4.3's `podman run` returns after the poststop hook ran. podman 5.4's, without
    `--rm`, may return before it: the cleanup process that conmon starts when the
    container exits runs the hook, and `podman wait` does not always wait for it
    (README, podman 4 and 5). `podman run --rm` returns after it.
    """
    deadline = time.monotonic() + HOOK_WAIT
    while True:
        text = log.read_text() if log.exists() else ""
        done = re.findall(r'event="archive (?:written|failed)" .*?\barchive=(\S+)', text)
        pending = {key.split(".")[-2] for key in annotations if key.endswith(".archive-to")}
        pending -= set(done)
        if not pending:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"no outcome for {sorted(pending)} {HOOK_WAIT} s after the "
                                 f"container exited; hook log:\n{text or '(none)'}")  # fmt: skip
        time.sleep(0.1)


# --- runc -----------------------------------------------------------------------------------

CAPS = ("CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_MKNOD", "CAP_KILL")


def runc_config(
    bundle: Path,
    rootfs: Path,
    args: list[str],
    mounts: list[dict],
    annotations: dict[str, str],
    poststop: list[dict],
) -> Path:
    """`runc spec`'s template made runnable here, with our mounts and hooks."""
    bundle.mkdir(parents=True, exist_ok=True)
    run(["runc", "spec", "--bundle", str(bundle)])
    path = bundle / "config.json"
    config = json.loads(path.read_text())
    process = config["process"]
    process["terminal"] = False
    process["args"] = args
    process["capabilities"] = {kind: list(CAPS) for kind in ("bounding", "effective", "permitted")}
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["mounts"] += mounts
    config["annotations"] = annotations
    config["hooks"] = {"poststop": poststop}
    path.write_text(json.dumps(config, indent=2))
    return path
