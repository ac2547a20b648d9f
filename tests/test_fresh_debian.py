"""First use on a fresh Debian 12: the README from its Install section on, as written, in a
root that has none of the tools the examples use.

The root is made with debootstrap (--variant=minbase: no python3, podman, runc, skopeo,
umoci, jq or busybox) and cached under /var/cache/archive_overlay-ci; each run mounts an
overlay on it whose upper layer is in the test's temporary directory, enters it with
unshare (mount and pid namespaces) and pivot_root, and follows the README: its pipx line,
"Try it", the apt line, containers.conf, the images, rootful podman, the two revision loops,
then, as an ordinary user made in that root, the rootless and fuse-overlayfs blocks.  apt
and pip download from Debian's mirror and PyPI (the .debs are cached beside the root).
The host's accounts are checked unchanged at the end.  It takes 3-6 minutes (the first
time, debootstrap adds about 45 s; 2 m 48 s measured with the .debs cached).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import conftest
from conftest import REPO, project_version, requires_root
from engines import readme_block, require

pytestmark = requires_root

CACHE = Path("/var/cache/archive_overlay-ci")
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 1800
ABSENT = ("podman", "runc", "crun", "skopeo", "umoci", "jq", "busybox", "python3", "pipx")


def debian_root() -> Path:
    """The cached minbase root, made by debootstrap once."""
    root = CACHE / f"{SUITE}-minbase"
    if (root / "etc" / "debian_version").exists():
        return root
    require(shutil.which("debootstrap") is not None, "debootstrap is not installed")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f"{SUITE}-minbase.partial"
    shutil.rmtree(partial, ignore_errors=True)
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", SUITE, str(partial), MIRROR],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"debootstrap failed (network?):\n{proc.stdout}\n{proc.stderr}"
    partial.rename(root)
    return root


def section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def install_line() -> str:
    """The README's install command, as written (apt-get for pipx, then pipx)."""
    line = next(ln.strip() for ln in section("Install").splitlines() if "pipx install" in ln)
    assert line.startswith("apt-get install -y pipx && "), line
    return line


def try_it_block() -> str:
    return section("Try it").split("```sh\n", 1)[1].split("```\n", 1)[0]


# Runs outside, in new mount and pid namespaces: the root, its mounts, then pivot_root.
ENTER = r"""
set -eu
R=$WORK/root
mkdir -p "$R" "$WORK/upper" "$WORK/work"
mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$WORK/upper,workdir=$WORK/work" "$R"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
# Container storage cannot be on the root's overlay (an overlay's upperdir may not be on
# one): as on a disk-backed install, /var/lib/containers and /home are filesystems of their own.
for d in tmp run var/lib/containers home srv; do mkdir -p "$R/$d"; mount -t tmpfs tmpfs "$R/$d"; done
chmod 1777 "$R/tmp"
mkdir -p "$R/out" "$R/var/cache/apt/archives"
mount --bind "$OUT" "$R/out"
mount --bind "$DEBS" "$R/var/cache/apt/archives"
cp /etc/resolv.conf "$R/etc/resolv.conf"  # this machine's network: its resolver, and the
cp /etc/ssl/certs/ca-certificates.crt "$R/etc/host-ca.crt"  # CAs its HTTPS proxy may need
cp -a "$CHECKOUT" "$R/root/checkout"
cp "$SCRIPT" "$R/script.sh"
cd "$R"
mkdir .old
pivot_root . .old
umount -l /.old
rmdir /.old
cd /
exec env -i PATH="$SYSTEM_PATH" HOME=/root DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 \
  PIP_CERT=/etc/host-ca.crt sh /script.sh
"""

# Runs inside the fresh root, as root.  Each step's output goes to /out/<step>.out.
INSIDE = r"""
step() {{ echo "$1" > /out/step; }}
fail() {{ echo "failed: $1" >> /out/step; exit 1; }}
step absent
for tool in {absent}; do
  if command -v "$tool" > /dev/null; then echo "$tool" >> /out/present; fi
done
step apt-update; apt-get update > /out/apt-update.out 2>&1 || fail apt-update
cd /root/checkout
step install; sh -e -c {install} > /out/install.out 2>&1 || fail install
archive_overlay --version > /out/version 2>&1 || fail version
step try-it; sh -e -c {try_it} > /out/try-it.out 2>&1 || fail try-it
step apt; sh -e -c {apt} > /out/apt.out 2>&1 || fail apt
step machine; sh -e -c {machine} > /out/machine.out 2>&1 || fail machine
step images; sh -e -c {images} > /out/images.out 2>&1 || fail images
step rootful; sh -e -c {rootful} > /out/rootful.out 2>&1 || fail rootful
step revision-loop; sh -e -c {revision_loop} > /out/revision-loop.out 2>&1 || fail revision-loop
step commit-on-exit-loop
sh -e -c {commit_loop} > /out/commit-on-exit-loop.out 2>&1 || fail commit-on-exit-loop
# An ordinary user of this root, with the sub-ids useradd gives; its own copy of the checkout.
step user
useradd --create-home --shell /bin/sh newcomer > /out/user.out 2>&1 || fail user
cp -r /root/checkout /home/newcomer/checkout && chown -R newcomer: /home/newcomer
uid=$(id -u newcomer); mkdir -p /run/user/$uid; chown newcomer: /run/user/$uid
chmod 700 /run/user/$uid
as_user() {{
  runuser -u newcomer -- env -i HOME=/home/newcomer XDG_RUNTIME_DIR=/run/user/$uid \
    PATH="$PATH" sh -e -c "cd ~/checkout; $1"
}}
step user-images; as_user {images} > /out/user-images.out 2>&1 || fail user-images
step rootless; as_user {rootless} > /out/rootless.out 2>&1 || fail rootless
chmod 666 /dev/fuse  # "Rootless use needs /dev/fuse usable by the user (mode 0666)"
step fuse; as_user {fuse} > /out/fuse.out 2>&1 || fail fuse
cp -a /home/newcomer/archives /out/user-archives
cp -a /srv/archives /out/archives
pid=$(cat /run/user/$uid/libpod/tmp/pause.pid 2>/dev/null) && kill -9 "$pid" || true
step done
"""


def test_readme_on_a_fresh_debian_12(tmp_path: Path, hook_bin: Path) -> None:
    """The README's install, Try it and podman blocks, as written, in a fresh Debian 12 root."""
    for tool in ("unshare", "pivot_root"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    base = debian_root()
    debs = CACHE / f"{SUITE}-debs"
    (debs / "partial").mkdir(parents=True, exist_ok=True)
    out, work, checkout = tmp_path / "out", tmp_path / "w", tmp_path / "checkout"
    for d in (out, work):
        d.mkdir()
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "__pycache__", ".pytest_cache", ".ruff_cache", "bench"))  # fmt: skip
    blocks = {name.replace("-", "_"): readme_block(name) for name in (
        "apt", "machine", "images", "rootful", "revision-loop", "rootless", "fuse")}  # fmt: skip
    blocks["commit_loop"] = readme_block("commit-on-exit-loop")
    script = INSIDE.format(
        absent=" ".join(ABSENT),
        install=shlex.quote(install_line()),
        try_it=shlex.quote(try_it_block()),
        **{k: shlex.quote(v) for k, v in blocks.items()},
    )
    (tmp_path / "inside.sh").write_text(script)
    env = {
        "PATH": SYSTEM_PATH, "SYSTEM_PATH": SYSTEM_PATH, "WORK": str(work), "BASE": str(base),
        "OUT": str(out), "DEBS": str(debs), "CHECKOUT": str(checkout),
        "SCRIPT": str(tmp_path / "inside.sh"),
    }  # fmt: skip
    try:
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
             "sh", "-c", ENTER],
            env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd="/",
        )  # fmt: skip
    finally:
        subprocess.run(["umount", "-R", str(work / "root")], check=False, capture_output=True)
    step = read(out / "step").strip()
    last = step.split()[-1] if step else "?"
    tail = "\n".join(read(out / f"{last}.out").splitlines()[-60:])
    diag = f"{proc.stdout}\n{proc.stderr}\nstep: {step}\n{tail}"
    # Before its install line, the root has none of the tools the README's examples use.
    assert read(out / "present") == "<present missing>", read(out / "present")
    assert proc.returncode == 0 and step == "done", diag
    assert read(out / "version").strip() == f"archive_overlay, version {project_version()}"
    assert "./greeting" in read(out / "try-it.out")
    with tarfile.open(out / "archives" / "data.tar.gz") as tf:
        assert sorted(tf.getnames()) == [".", "./hello", "./old.txt"], diag
    with tarfile.open(out / "user-archives" / "data.tar.gz") as tf:
        assert sorted(tf.getnames()) == [".", "./hello"], diag
    with tarfile.open(out / "user-archives" / "fuse.tar") as tf:
        assert "./hello" in tf.getnames(), diag
    revisions = read(out / "revision-loop.out").splitlines()
    assert revisions[-4:] == ["hello", "run 1", "run 2", "run 3"], diag
    commits = read(out / "commit-on-exit-loop.out").splitlines()
    assert commits[-3:] == ["run 1", "run 2", "run 3"], diag
    assert conftest.host_changes() == []


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path.name} missing>"
