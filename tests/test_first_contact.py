"""First contact: the README's blocks run as written, as a new user would run them.

The blocks are read from README.md (a fenced block after a `<!-- test: NAME -->`
line, or the first one of a section), so the test and the document cannot drift.
The podman blocks run with podman's default hooks directory, default storage and
default config paths, as root and as the rootless test user, in a private mount
namespace where every host path they or podman write is a tmpfs, or an overlay
whose upper layer is on a tmpfs: the host is left untouched.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PREFIX, REPO, project_version, requires_root
from engines import (
    busybox_path,
    ensure_fuse_device,
    ensure_user,
    podman_version,
    readme_block,
    require,
)

pytestmark = requires_root

README = REPO / "README.md"
HOOKS_DIR = "/usr/share/containers/oci/hooks.d"  # podman 4.3's only default
ROOTLESS_LOG = ".local/state/archive_overlay.log"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 900


# --- the README's blocks ----------------------------------------------------------------


def section_block(title: str) -> str:
    """The first sh block of the README section with this title."""
    section = README.read_text().split(f"## {title}\n", 1)[1]
    return section.split("```sh\n", 1)[1].split("```\n", 1)[0]


# --- a private mount namespace over the host's paths -------------------------------------

NAMESPACE_SETUP = r"""
set -euo pipefail
W=$WORKSPACE
mount -t tmpfs -o mode=755 tmpfs "$W"
writable() {  # an overlay on a tmpfs upper: the host's files show, writes stay here
  local n; n=$(echo "$1" | tr / _)
  mkdir -p "$W/$n.upper" "$W/$n.work"
  mount -t overlay overlay -o "lowerdir=$1,upperdir=$W/$n.upper,workdir=$W/$n.work" "$1"
}
writable /etc
writable /usr
writable /var
mkdir -p /var/lib/containers
for d in /var/lib/containers /var/log /var/tmp /run /srv /home; do mount -t tmpfs tmpfs "$d"; done
ln -sf "$HOOK" /usr/bin/archive_overlay  # as the README's install puts it
# A /dev of our own: the host's nodes and mounts, but /dev/log is our socket or absent.
mkdir "$W/dev"; mount --rbind /dev "$W/dev"
mount -t tmpfs -o mode=755,nosuid tmpfs /dev
for e in "$W"/dev/*; do
  n=${e##*/}
  if [ "$n" = log ]; then continue; fi
  if [ -d "$e" ] && [ ! -L "$e" ]; then mkdir "/dev/$n"; mount --rbind "$e" "/dev/$n";
  else cp -a "$e" "/dev/$n"; fi
done
if [ -n "$SYSLOG_SOCKET" ]; then touch /dev/log; mount --bind "$SYSLOG_SOCKET" /dev/log; fi
"""


@dataclass
class Namespace:
    """Where a test's namespace keeps its state, and what it hands back."""

    root: Path

    @property
    def workspace(self) -> Path:
        return self.root / "ns"

    @property
    def out(self) -> Path:
        """Results copied out of the namespace for the test to check."""
        return self.root / "out"

    @property
    def checkout(self) -> Path:
        """A copy of the repository's files the README's blocks read (hooks.d)."""
        return self.root / "checkout"

    def prepare(self) -> None:
        for d in (self.workspace, self.out, self.checkout):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copytree(REPO / "hooks.d", self.checkout / "hooks.d")

    def run(self, script: str, hook_bin: Path, syslog_socket: Path | None = None):
        env = {
            "PATH": SYSTEM_PATH,
            "HOME": "/root",
            "WORKSPACE": str(self.workspace),
            "HOOK": str(hook_bin),
            "SYSLOG_SOCKET": str(syslog_socket or ""),
            "CHECKOUT": str(self.checkout),
            "OUT": str(self.out),
            # podman 5 on hybrid cgroups warns on every command that v1 is deprecated
            "PODMAN_IGNORE_CGROUPSV1_WARNING": "1",
        }
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c",
             NAMESPACE_SETUP + script],
            env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd="/",
        )  # fmt: skip


class SyslogServer:
    """A datagram socket standing in for /dev/log, read as records come: runuser, conmon and
    podman log there too, and a full queue (10 datagrams) would block them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        path.chmod(0o666)  # the rootless user's hook sends here too
        self.received: list[str] = []
        self.done = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while not self.done.is_set():
            try:
                self.received.append(self.sock.recv(65536).decode(errors="replace"))
            except socket.timeout:
                continue

    def records(self) -> list[str]:
        """What the hook sent (records from runuser, conmon or podman left out)."""
        return [r for r in self.received if "archive_overlay[" in r]

    def close(self) -> None:
        self.done.set()
        self.reader.join()
        self.sock.close()


@pytest.fixture
def syslog(tmp_path):
    server = SyslogServer(tmp_path / "log.sock")
    yield server
    server.close()


def engines_present() -> None:
    for tool in ("podman", "runc", "unshare"):
        require(shutil.which(tool, path=SYSTEM_PATH) is not None, f"{tool} is not installed")
    require(busybox_path() == Path("/bin/busybox"), "busybox-static is not installed")


def bash(block: str) -> str:
    """A README block as an `sh -e` command line (dash on Debian, as the README's fences say),
    its output kept in the namespace's log."""
    return f"sh -e -c {shlex.quote(block)}"


def archive_written(lines: list[str]) -> list[str]:
    return [line for line in lines if 'event="archive written"' in line]


def tar_listing(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return {m.name: m for m in tf.getmembers()}


# --- rootful podman -------------------------------------------------------------------------


def late_hook(signal_file: str) -> str:
    """A hook that outlives a 1 s timeout and notes a SIGTERM if one comes."""
    return (
        f"trap 'echo TERM >> {signal_file}; exit 0' TERM; echo started >> {signal_file}; "
        f"sleep 5 > /dev/null 2>&1 & wait; echo not-killed >> {signal_file}"
    )


LATE_HOOK = late_hook("$OUT/podman-signal")
MISSPELT = (
    f"--annotation={PREFIX}bad.mount-point=/data "
    f"--annotation={PREFIX}bad.archive-to=/srv/archives/bad.tar.gz "
    f"--annotation={PREFIX}bad.method=tar.gzip "
)
ROOTFUL_AFTER = rf"""
cd "$CHECKOUT"
{{ {bash(readme_block("machine"))} && {bash(readme_block("images"))} \
   && {bash(readme_block("rootful"))}; }} > "$OUT/readme.stdout" 2> "$OUT/readme.stderr"
# What a newcomer sees when the hook fails: podman's own output, at its default level.
set +e
podman run --rm {MISSPELT} \
  --mount type=image,source=localhost/my-data:rev1,destination=/data,rw=true \
  localhost/busybox sh -c 'echo hi > /data/x' > "$OUT/fail.stdout" 2> "$OUT/fail.stderr"
echo $? > "$OUT/fail.status"
# Which hooks directories podman reads: by default, and with a containers.conf hooks_dir.
podman --log-level=debug run --rm localhost/busybox sh -c : 2>&1 \
  | grep -o 'reading hooks from [^"]*' > "$OUT/hooks-read"
printf '[engine]\nhooks_dir = ["/etc/containers/oci/hooks.d"]\n' > "$W/hooks-dir.conf"
CONTAINERS_CONF="$W/hooks-dir.conf" podman --log-level=debug run --rm localhost/busybox sh -c : \
  2>&1 | grep -o 'reading hooks from [^"]*' > "$OUT/hooks-read-conf"
set -e
ls -A {HOOKS_DIR} > "$OUT/hooks-dir"
cp -a /srv/archives "$OUT/archives"
cp /var/log/archive_overlay.log "$OUT/hook.log"
# What podman gives a hook: its environment, and what ends a hook past its timeout.
cat > {HOOKS_DIR}/probe-env.json <<EOF
{{"version": "1.0.0", "hook": {{"path": "/bin/sh", "args": ["sh", "-c", "env > $OUT/podman-env"]}},
 "when": {{"always": true}}, "stages": ["poststop"]}}
EOF
cat > {HOOKS_DIR}/probe-timeout.json <<EOF
{{"version": "1.0.0", "hook": {{"path": "/bin/sh", "args": ["sh", "-c", "{LATE_HOOK}"],
 "timeout": 1}}, "when": {{"always": true}}, "stages": ["poststop"]}}
EOF
podman run --rm localhost/busybox sh -c : > "$OUT/probe.out" 2>&1
"""


def test_readme_rootful_podman_as_written(hook_bin, tmp_path, syslog):
    """Default hooks dir, default storage, the README's hooks.d file: archive and a record."""
    engines_present()
    ns = Namespace(tmp_path)
    ns.prepare()
    result = ns.run(ROOTFUL_AFTER, hook_bin, syslog.path)
    out = ns.out
    assert result.returncode == 0, f"{result.stderr}\n{read(out / 'readme.stderr')}"
    assert (out / "hooks-dir").read_text().split() == ["archive-overlay.json"]
    assert read(out / "hooks-read").splitlines() == [f"reading hooks from {HOOKS_DIR}"]
    assert read(out / "hooks-read-conf").splitlines() == [
        "reading hooks from /etc/containers/oci/hooks.d"  # hooks_dir replaces the default
    ]
    members = tar_listing(out / "archives" / "data.tar.gz")
    assert sorted(members) == [".", "./hello", "./old.txt"]
    assert members["./old.txt"].ischr() and members["./old.txt"].devmajor == 0
    assert "./hello" in read(out / "readme.stdout")  # the block's own tar -tv
    assert not (out / "archives" / "bad.tar.gz").exists()
    # podman exits 0; at its default level podman 4.3 says nothing about the failing hook;
    # podman 5 says nothing or (when `podman run` itself ran the hook, not conmon's cleanup
    # process: both were seen) one warning with the hook's exit status, not its output
    assert read(out / "fail.status").strip() == "0"
    said = read(out / "fail.stderr")
    if podman_version() < (5,):
        assert said == "", said
    else:
        hook = "/usr/bin/archive_overlay --syslog --log-file /var/log/archive_overlay.log"
        warning = (r'time="[^"]+" level=warning msg="Container [0-9a-f]{64}: poststop hook 0: '
                   rf'executing \[{re.escape(hook)}\]: exit status 1"\n')  # fmt: skip
        assert said == "" or re.fullmatch(warning, said), said
    # ... but the hook's log file and syslog have it, one error line naming the annotation
    log = read(out / "hook.log").splitlines()
    errors = [line for line in log if "level=error" in line]
    assert len(errors) == 1 and "archive=bad " in errors[0], log
    assert f"annotation={PREFIX}bad.method " in errors[0]
    assert "unknown method 'tar.gzip'" in errors[0]
    assert len(archive_written(log)) == 1
    records = syslog.records()
    assert records and all(r.startswith("<") for r in records), syslog.received
    assert len(archive_written(records)) == 1 and "archive=data" in archive_written(records)[0]
    assert sum(f"annotation={PREFIX}bad.method" in r for r in records) == 1
    assert not any("no syslog socket" in r for r in log)
    # podman runs hooks with an empty environment, and kills a late one with SIGKILL
    names = [line.split("=", 1)[0] for line in read(out / "podman-env").splitlines()]
    assert names == ["PWD"], read(out / "podman-env")  # dash sets PWD itself; nothing else
    assert read(out / "podman-signal").split() == ["started"]


def read(path: Path) -> str:
    return path.read_text() if path.exists() else f"<{path.name} missing>"


def test_without_a_syslog_socket_the_log_file_keeps_the_record(hook_bin, tmp_path):
    """Where no /dev/log exists, the README's hooks.d file still leaves a record: the log
    file, which also says that syslog was not reached."""
    engines_present()
    ns = Namespace(tmp_path)
    ns.prepare()
    result = ns.run(ROOTFUL_AFTER, hook_bin)
    assert result.returncode == 0, f"{result.stderr}\n{read(ns.out / 'readme.stderr')}"
    log = read(ns.out / "hook.log").splitlines()
    errors = [line for line in log if f"annotation={PREFIX}bad.method" in line]
    assert len(errors) == 1 and len(archive_written(log)) == 1, log
    runs = len(errors) + len(archive_written(log))
    assert sum("no syslog socket at /dev/log" in line for line in log) == runs  # once a run


# --- rootless podman, with the hardened hook file; then fuse-overlayfs -----------------------

ROOTLESS_AFTER = r"""
cd "$CHECKOUT"
{bash_machine} > "$OUT/machine.out" 2>&1
mkdir -p "/run/user/$TEST_UID" "/home/$TEST_USER"
cp -r "$CHECKOUT" "/home/$TEST_USER/checkout"  # the user's own checkout, in its home
chown -R "$TEST_USER:" "/home/$TEST_USER" "/run/user/$TEST_UID"; chmod 700 "/run/user/$TEST_UID"
as_user() {{
  runuser -u "$TEST_USER" -- env -i HOME="/home/$TEST_USER" XDG_RUNTIME_DIR="/run/user/$TEST_UID" \
    PATH="$PATH" PODMAN_IGNORE_CGROUPSV1_WARNING=1 sh -e -c "cd ~/checkout; $1"
}}
cleanup() {{  # rootless podman leaves a pause process: end it, by its pid
  pid=$(cat "/run/user/$TEST_UID/libpod/tmp/pause.pid" 2>/dev/null) && kill -9 "$pid" || true
}}
trap cleanup EXIT
step() {{ echo "$1" > "$OUT/step"; }}
step images; as_user {bash_images} > "$OUT/images.out" 2>&1
step rootless; as_user {bash_rootless} > "$OUT/rootless.out" 2>&1
step refused
as_user 'podman run --rm {refused} \
  --mount type=image,source=localhost/my-data:rev1,destination=/data,rw=true \
  localhost/busybox sh -c "echo hi > /data/x"' > "$OUT/refused.out" 2>&1
cp "/home/$TEST_USER/{log}" "$OUT/rootless.log"
step fuse; as_user {bash_fuse} > "$OUT/fuse.out" 2>&1
as_user 'podman info --format "{{{{.Store.GraphDriverName}}}} {{{{.Store.GraphOptions}}}}"' \
  > "$OUT/store" 2>&1
as_user 'podman run --name fuse-check \
  --mount type=image,source=localhost/my-data:rev1,destination=/data,rw=true localhost/busybox \
  sh -c : && jq -c ".mounts[] | select(.destination == \"/data\")" \
  "$(podman inspect --format "{{{{.OCIConfigPath}}}}" fuse-check)"' > "$OUT/fuse-mount" 2>&1
step done
cp -a "/home/$TEST_USER/archives" "$OUT/archives"
cp "/home/$TEST_USER/{log}" "$OUT/hook.log"
as_user 'podman system reset --force' > /dev/null 2>&1 || true
"""


def test_readme_rootless_podman_hardened_then_fuse_overlayfs(hook_bin, tmp_path, syslog):
    """The rootless user follows the README: its own hooks dir and hook file, confined to
    ~/archives, logging to a file of its own and to syslog; then switches to fuse-overlayfs."""
    engines_present()
    require(Path("/usr/bin/fuse-overlayfs").exists(), "fuse-overlayfs is not installed")
    user = ensure_user(os.environ.get("ARCHIVE_OVERLAY_TEST_USER", "ao-rootless"))
    ensure_fuse_device()
    home = Path(pwd.getpwnam(user.name).pw_dir)
    require(home.parent == Path("/home"), f"{user.name}'s home is not under /home")
    ns = Namespace(tmp_path)
    ns.prepare()
    refused = (
        f"--annotation={PREFIX}out.mount-point=/data "
        f"--annotation={PREFIX}out.archive-to=/srv/outside.tar "
    )
    script = ROOTLESS_AFTER.format(
        bash_machine=bash(readme_block("machine")),
        bash_images=shlex.quote(readme_block("images")),
        bash_rootless=shlex.quote(readme_block("rootless")),
        bash_fuse=shlex.quote(readme_block("fuse")),
        refused=refused,
        log=ROOTLESS_LOG,
    )
    ns_env_script = f"TEST_USER={user.name}; TEST_UID={user.uid}\n{script}"
    result = ns.run(ns_env_script, hook_bin, syslog.path)
    out = ns.out
    step = read(out / "step").strip()
    assert result.returncode == 0 and step == "done", (
        f"failed at {step}: {result.stderr}\n{read(out / f'{step}.out')}"
    )
    rootless = tar_listing(out / "archives" / "data.tar.gz")
    assert sorted(rootless) == [".", "./hello"]
    assert "./hello" in read(out / "rootless.out")
    fuse = tar_listing(out / "archives" / "fuse.tar")
    assert "./hello" in fuse
    assert "./hello" in read(out / "fuse.out")
    store = read(out / "store")
    assert (
        store.startswith("overlay ")
        and "mount_program:map[Executable:/usr/bin/fuse-overlayfs" in store
    )
    fuse_mount = json.loads(read(out / "fuse-mount"))  # podman gives the hook a bind mount
    assert fuse_mount["type"] == "bind" and fuse_mount["source"].endswith("/merge"), fuse_mount
    log = read(out / "hook.log").splitlines()
    written = archive_written(log)
    assert len(written) == 2, log
    # A fresh rootless store: vfs with podman 4.3, native overlay with podman 5.
    first_store = "/vfs-containers/" if podman_version() < (5,) else "/overlay-containers/"
    assert first_store in written[0] and "/overlay-containers/" in written[1], written
    refusals = [line for line in log if "level=error" in line]
    assert len(refusals) == 1 and "archive=out " in refusals[0], log
    assert "/srv/outside.tar is outside the allowed directories" in refusals[0]
    records = syslog.records()
    assert len(archive_written(records)) == 2 and any("archive=out" in r for r in records)


# --- the other README blocks ----------------------------------------------------------------


def test_readme_try_it(hook_bin, tmp_path):
    """The README's "Try it" block as written, run by sh (dash), with /tmp a tmpfs of a private
    mount namespace: the host's /tmp is untouched. Its log line matches the README's, `…`
    aside."""
    script = section_block("Try it")
    out = tmp_path / "out"
    out.mkdir()
    runner = (
        f"mount --bind {out} /mnt && mount -t tmpfs tmpfs /tmp && "
        f"sh -e -c {shlex.quote(script)} > /mnt/stdout 2> /mnt/stderr"
    )
    env = {"PATH": f"{hook_bin.parent}:{SYSTEM_PATH}"}
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-e", "-c", runner],
        check=False, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + read(out / "stderr")
    listing = read(out / "stdout").split()
    assert "./greeting" in listing and "./new" in listing and "./" in listing
    shown = README.read_text().split("The hook logs one line per archive", 1)[1]
    example = next(line.strip() for line in shown.splitlines() if "timestamp=" in line)
    pattern = "".join(
        "[^ ]+" if part == "…" else re.escape(part) for part in re.split("(…)", example)
    )
    logged = read(out / "stderr").strip().splitlines()
    assert len(logged) == 1 and re.fullmatch(pattern, logged[0]), (example, logged)


def pipx_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PIPX_HOME": str(tmp_path / "pipx"),
        "PIPX_BIN_DIR": str(tmp_path / "bin"),
    }


def readme_pipx_command(label: str) -> list[str]:
    """The README's pipx command (install or upgrade) with the scratch PIPX_* from the env."""
    install = README.read_text().split("## Install\n", 1)[1].split("\n## ", 1)[0]
    line = next(
        line.strip() for line in install.splitlines() if "pipx install" in line and label in line
    )
    command = line.split("&&")[-1].split()
    assert command[:2] == ["PIPX_HOME=/opt/pipx", "PIPX_BIN_DIR=/usr/bin"], line
    return ["/usr/bin/pipx", *command[3:]]


def version_of(tmp_path: Path) -> str:
    result = subprocess.run(
        [str(tmp_path / "bin" / "archive_overlay"), "--version"],
        check=False, capture_output=True, text=True, env={},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_readme_install_and_upgrade_with_pipx(tmp_path):
    """The README's install command, then its upgrade command on a newer checkout, into a
    scratch PIPX_HOME: the install line again keeps the old version, the upgrade replaces it."""
    require(Path("/usr/bin/pipx").exists(), "pipx is not installed (apt-get install pipx)")
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build"))
    env = pipx_env(tmp_path)
    install, upgrade = readme_pipx_command("pipx install --python"), readme_pipx_command("--force")
    assert "--force" not in install and "--force" in upgrade

    def pipx(cmd: list[str]) -> subprocess.CompletedProcess:
        result = subprocess.run(
            cmd, check=False, capture_output=True, text=True, env=env, cwd=checkout
        )
        assert result.returncode == 0, result.stderr
        return result

    pipx(install)
    old = version_of(tmp_path)
    assert old.startswith("archive_overlay, version ")
    module = checkout / "archive_overlay.py"
    text = module.read_text()
    version = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)
    newer = version + ".post1"
    module.write_text(text.replace(f'__version__ = "{version}"', f'__version__ = "{newer}"'))
    project = checkout / "pyproject.toml"
    project.write_text(
        project.read_text().replace(f'version = "{version}"', f'version = "{newer}"')
    )
    again = pipx(install)
    assert "already seems to be installed" in again.stdout + again.stderr
    assert version_of(tmp_path) == old  # what the README warns about
    pipx(upgrade)
    assert version_of(tmp_path) == f"archive_overlay, version {newer}"


# --- what the engines do to hooks (README claims) -------------------------------------------


def test_runc_passes_its_environment_and_kills_a_late_hook_with_sigkill(tmp_path):
    """runc gives hooks its own environment (podman's is empty: see the engine tests), and
    ends a hook past its `timeout` with SIGKILL: a SIGTERM trap never runs."""
    engines_present()
    from engines import build_rootfs, runc_config

    rootfs = build_rootfs(tmp_path / "rootfs")
    env_file, signal_file = tmp_path / "env", tmp_path / "signal"
    poststop = [
        {"path": "/bin/sh", "args": ["sh", "-c", f"env > {env_file}"]},
        {"path": "/bin/sh", "args": ["sh", "-c", late_hook(str(signal_file))], "timeout": 1},
    ]
    bundle = tmp_path / "bundle"
    runc_config(bundle, rootfs, ["/bin/true"], [], {}, poststop)
    runc_env = {"PATH": SYSTEM_PATH, "HOME": "/nonexistent-home", "MARKER": "from-runc"}
    result = subprocess.run(
        ["runc", "--root", str(tmp_path / "runc-state"), "run", "--bundle", str(bundle),
         f"c{os.getpid()}"],
        check=False, capture_output=True, text=True, env=runc_env, timeout=120,
    )  # fmt: skip
    hook_env = dict(line.split("=", 1) for line in read(env_file).splitlines() if "=" in line)
    assert {k: hook_env.get(k) for k in runc_env} == runc_env, (hook_env, result.stderr)
    assert read(signal_file).split() == ["started"], result.stderr  # no TERM, not survived
    assert "error running hook #1" in result.stderr


def test_readme_names_the_default_hooks_dir():
    text = README.read_text()
    assert "/usr/share/containers/oci/hooks.d/archive-overlay.json" in readme_block("rootful")
    assert "install -D -m 644" in readme_block("rootful")
    assert "hooks_dir" not in readme_block("machine")  # it would replace the default
    assert "/etc/containers/oci/hooks.d/archive-overlay.json" not in text


def test_the_installed_hook_says_its_release(hook_bin):
    """`archive_overlay --version` names the release pyproject.toml gives: 4.0.0 added
    oci-image, placeholders, exclude and mount-point=/ since 3.0.0."""
    result = subprocess.run(
        [str(hook_bin), "--version"], check=False, capture_output=True, text=True, env={}
    )
    assert result.returncode == 0, result.stderr
    assert project_version() == "4.0.0"
    assert result.stdout.strip() == "archive_overlay, version 4.0.0"
