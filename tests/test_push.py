"""image-push=REF: each committed revision goes to a registry.

Debian's docker-registry (CNCF distribution) runs on a free port of 127.0.0.1
with TLS (a CA made here, trusted through containers-certs.d) and htpasswd
authentication; credentials go where `skopeo login` and `podman login` put
them (containers-auth.json(5)).  All of it happens in a private mount
namespace whose /etc/containers and /run are overlays onto scratch
directories: the host's certs.d, registries.conf and /run/containers are
untouched.  The hook runs as podman runs it, with an empty environment.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import archive_annotations, requires_root
from engines import CLEAN_PATH, TEST_USER, Podman, ensure_user, require, run, run_readme_with_podman
from test_oci_image import (
    LOOP,
    RUNS,
    assert_run_changes,
    blob,
    check_layout,
    image_args,
    image_state,
    loop_images,  # noqa: F401 - a fixture
    loop_podman,
    read_json_blob,
    tagged,
    user_tool,
    written_manifest,
)
from test_oci_layer import (
    BB_IMAGE,
    LISTING,
    assert_same_tree,
    parse_listing,
    podman_run_args,
    read_log,
    require_tools,
)
from test_safety import TMP_MARK, HookRun, finish, hook, mounted, start_hook

pytestmark = requires_root

USER, PASSWORD = "alice", "s3cret-pw"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CLONE_NEWNS = 0x00020000


# --- a private /etc/containers and /run ------------------------------------------------------


@pytest.fixture
def private_containers_config(tmp_path: Path) -> Iterator[Path]:
    """This process (and all it starts) in a new mount namespace whose /etc/containers and
    /run are overlays onto scratch dirs; back in the session's namespace afterwards."""
    require(shutil.which("docker-registry") is not None, "docker-registry not installed")
    require(shutil.which("htpasswd") is not None, "htpasswd not installed (apache2-utils)")
    libc = ctypes.CDLL(None, use_errno=True)
    cwd = os.getcwd()
    old_ns = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    scratch = tmp_path / "ns"
    try:
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        run(["mount", "--make-rprivate", "/"])
        for target, key in (("/etc/containers", "etc"), ("/run", "run")):
            for part in ("upper", "work"):
                (scratch / key / part).mkdir(parents=True)
            opts = f"lowerdir={target},upperdir={scratch / key}/upper,workdir={scratch / key}/work"
            run(["mount", "-t", "overlay", "overlay", "-o", opts, target])
        yield scratch
    finally:
        if libc.setns(old_ns, CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the session's mount namespace")
        os.close(old_ns)
        os.chdir(cwd)


# --- a registry: TLS from a CA made here, htpasswd --------------------------------------------

REGISTRY_CONFIG = """version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}/storage
http:
  addr: 127.0.0.1:{port}
  tls:
    certificate: {root}/server.crt
    key: {root}/server.key
auth:
  htpasswd:
    realm: test-realm
    path: {root}/htpasswd
"""
ACCESS_RE = re.compile(r'"(HEAD|GET|PUT|POST|PATCH) (/v2/\S*) HTTP/[0-9.]+" (\d{3})')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ca_and_server_cert(root: Path, name: str = "ca") -> None:
    """A CA made for the test and a server certificate for 127.0.0.1 signed by it.

    The CA states its key usage: Python 3.13's default context (VERIFY_X509_STRICT) refuses
    a CA without it ("CA cert does not include key usage extension"), and openssl 3.5's
    `req -x509` adds none by default."""
    key, crt = root / f"{name}.key", root / f"{name}.crt"
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(crt), "-days", "2", "-subj", f"/CN=archive_overlay test {name}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])  # fmt: skip
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(root / "server.key"),
         "-out", str(root / "server.csr"), "-subj", "/CN=127.0.0.1"])  # fmt: skip
    (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1\nauthorityKeyIdentifier=keyid\n")
    run(["openssl", "x509", "-req", "-in", str(root / "server.csr"), "-CA", str(crt),
         "-CAkey", str(key), "-CAcreateserial", "-out", str(root / "server.crt"), "-days", "2",
         "-extfile", str(root / "san.ext")])  # fmt: skip


class Registry:
    """docker-registry serving TLS with htpasswd on 127.0.0.1:port; its log in root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True)
        make_ca_and_server_cert(root)
        htpasswd = run(["htpasswd", "-Bbn", USER, PASSWORD]).stdout
        (root / "htpasswd").write_text(htpasswd)
        (root / "registry.yml").write_text(REGISTRY_CONFIG.format(root=root, port=self.port))
        self.log = root / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def certs_d(self) -> Path:
        return Path("/etc/containers/certs.d") / self.host

    def trust(self) -> None:
        """The CA into containers-certs.d(5), as a user installs a private registry's CA."""
        self.certs_d.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.root / "ca.crt", self.certs_d / "ca.crt")

    def distrust(self) -> None:
        shutil.rmtree(self.certs_d)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(self.root / "registry.yml")], stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                self.request("GET", "/v2/")
                return
            except (OSError, urllib.error.HTTPError):
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, f"registry not up:\n{self.log.read_text()}"
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def request(self, method: str, path: str, accept: str = MANIFEST) -> tuple[bytes, dict]:
        """An authenticated HTTPS request, verified against the test's CA."""
        context = ssl.create_default_context(cafile=str(self.root / "ca.crt"))
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        headers = {"Authorization": f"Basic {token}", "Accept": accept}
        req = urllib.request.Request(f"https://{self.host}{path}", method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=10, context=context) as response:
            return response.read(), dict(response.headers)

    def manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        """The manifest's bytes as the registry serves them, and its digest header."""
        data, headers = self.request("GET", f"/v2/{repo}/manifests/{ref}")
        return data, headers["Docker-Content-Digest"]

    def has_blob(self, repo: str, digest: str) -> bool:
        try:
            self.request("HEAD", f"/v2/{repo}/blobs/{digest}")
            return True
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return False
            raise

    def access(self) -> list[tuple[str, str, str]]:
        """(method, path, status) of every request in the access log, in order."""
        return ACCESS_RE.findall(self.log.read_text(errors="replace"))


def uploaded_blobs(requests: list[tuple[str, str, str]], repo: str) -> list[str]:
    """Blobs whose upload completed (the PUT that closes an upload names the digest)."""
    done = re.compile(rf"/v2/{re.escape(repo)}/blobs/uploads/\S*digest=sha256%3A([0-9a-f]{{64}})")
    return [f"sha256:{m.group(1)}" for method, path, status in requests
            if method == "PUT" and status == "201" and (m := done.search(path))]  # fmt: skip


def headed_blobs(requests: list[tuple[str, str, str]], repo: str) -> list[str]:
    head = re.compile(rf"/v2/{re.escape(repo)}/blobs/(sha256:[0-9a-f]{{64}})$")
    return [
        m.group(1) for method, path, _ in requests if method == "HEAD" and (m := head.match(path))
    ]


def login(host: str, password: str = PASSWORD) -> None:
    """`skopeo login` as root with no environment: /run/containers/0/auth.json."""
    run(["env", "-i", f"PATH={CLEAN_PATH}", "skopeo", "login", "--username", USER,
         "--password-stdin", host], input=password)  # fmt: skip


@pytest.fixture
def registry(private_containers_config: Path, tmp_path: Path) -> Iterator[Registry]:
    """A running registry, its CA trusted, root logged in to it."""
    reg = Registry(tmp_path / "registry")
    try:
        reg.trust()
        reg.start()
        login(reg.host)
        assert Path("/run/containers/0/auth.json").is_file()
        yield reg
    finally:
        reg.stop()


# --- the hook on a hand-made overlay ----------------------------------------------------------


def change(ovl, n: int) -> None:
    """Run n's change through the mount: a new file, and one file rewritten."""
    with mounted(ovl) as merged:
        (merged / f"run-{n}.txt").write_text(f"run {n}\n")
        (merged / "changing.txt").write_bytes(os.urandom(2048) + f"run {n}\n".encode())


def push_args(layout: Path, ref: str, **more: str) -> dict:
    return image_args(layout, image_push=ref, **more)


def pulled_whole(reg: Registry, ref: str, dest: Path) -> str:
    """skopeo copies the registry's revision into a fresh layout (checking every blob's
    digest); the manifest digest it names."""
    run(["env", "-i", f"PATH={CLEAN_PATH}", "skopeo", "copy", "--quiet", "--preserve-digests",
         f"docker://{ref}", f"oci:{dest}:got"])  # fmt: skip
    index = check_layout(dest)
    return tagged(index, "got")[0]


def test_each_revision_is_pushed_and_only_its_new_blobs_upload(hook_bin, make_overlay, tmp_path,
                                                               registry):  # fmt: skip
    ovl = make_overlay()
    (ovl.lower / "base.txt").write_text("base\n")
    layout = tmp_path / "layout"
    ref = f"{registry.host}/team/data:latest"
    pushed: list[str] = []
    for n in range(1, 4):
        change(ovl, n)
        before = len(registry.access())
        result = hook(hook_bin, image_state(tmp_path, ovl, {"data": push_args(layout, ref)},
                                            container=f"run{n}"))  # fmt: skip
        assert result.returncode == 0, result.log
        digest = written_manifest(result)
        assert tagged(check_layout(layout), "data") == [digest]
        assert re.search(rf"event=\"revision pushed\" .*image_push={re.escape(ref)} "
                         rf"manifest={digest} ", result.log), result.log  # fmt: skip
        # the registry serves the layout's manifest byte for byte under the tag
        data, header = registry.manifest("team/data", "latest")
        assert header == digest and data == blob(layout, digest).read_bytes()
        manifest = json.loads(data)
        config = json.loads(registry.request("GET", f"/v2/team/data/blobs/"
                                             f"{manifest['config']['digest']}")[0])  # fmt: skip
        assert [h["comment"] for h in config["history"]] == [
            f"container run{i} archive data" for i in range(1, n + 1)
        ]
        requests = registry.access()[before:]
        new = {manifest["layers"][-1]["digest"], manifest["config"]["digest"]}
        uploads = uploaded_blobs(requests, "team/data")
        assert sorted(uploads) == sorted(new), (n, uploads, new)  # only what the registry lacked
        heads = headed_blobs(requests, "team/data")
        assert set(heads) >= {d["digest"] for d in manifest["layers"]}, heads  # HEAD first
        puts = [p for m, p, _ in requests if m == "PUT"]
        assert puts[-1] == "/v2/team/data/manifests/latest", puts  # the manifest last
        pushed.append(digest)
    assert not [p for p in layout.iterdir() if TMP_MARK in p.name]
    for n, digest in enumerate(pushed, 1):  # every revision stays reachable by digest
        assert pulled_whole(registry, f"{registry.host}/team/data@{digest}",
                            tmp_path / f"pulled{n}") == digest  # fmt: skip


def committed_not_pushed(result: HookRun, layout: Path, ref: str, cause: str) -> str:
    """Exit 1, one error line naming REF and the cause; the tag moved in the layout."""
    assert result.returncode == 1, result.log
    errors = [line for line in result.log.splitlines() if "level=error" in line]
    assert len(errors) == 1, result.log
    line = result.error_for("data")
    assert f"image-push {ref}: {cause}: revision sha256:" in line, line
    assert "committed, not pushed" in line and "Traceback" not in result.log, line
    digest = re.search(r"revision (sha256:[0-9a-f]{64})", line).group(1)
    assert tagged(check_layout(layout), "data") == [digest]  # the local commit stands
    return digest


def test_registry_down_the_commit_stands_and_the_next_push_catches_up(hook_bin, make_overlay,
                                                                      tmp_path, registry):  # fmt: skip
    ovl = make_overlay()
    layout = tmp_path / "layout"
    ref = f"{registry.host}/data:latest"

    def state(n: int) -> str:  # another container each run: each commit stacks on the tag
        return image_state(tmp_path, ovl, {"data": push_args(layout, ref)}, container=f"run{n}")

    change(ovl, 1)
    assert hook(hook_bin, state(1)).returncode == 0
    registry.stop()
    change(ovl, 2)
    started = time.monotonic()
    down = hook(hook_bin, state(2), "--push-timeout", "20")
    assert time.monotonic() - started < 20
    missed = committed_not_pushed(down, layout, ref, "connection refused")
    assert f"dial tcp {registry.host}: connect: connection refused" in down.error_for("data")
    registry.start()
    change(ovl, 3)
    up = hook(hook_bin, state(3))
    assert up.returncode == 0, up.log
    digest = written_manifest(up)
    _, header = registry.manifest("data", "latest")
    assert header == digest
    # the registry's revision is whole: it holds the missed revision's layer too
    manifest = json.loads(blob(layout, digest).read_bytes())
    missed_layer = json.loads(blob(layout, missed).read_bytes())["layers"][-1]
    assert missed_layer in manifest["layers"] and len(manifest["layers"]) == 3
    assert pulled_whole(registry, ref, tmp_path / "pulled") == digest


class SilentRegistry:
    """A TCP port that takes connections (the kernel completes the handshake for the
    listen backlog) and never answers: a hung registry.  No thread: setns back to the
    session's namespace refuses a multithreaded process."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


def test_a_hung_registry_is_given_up_after_the_push_timeout(hook_bin, make_overlay, tmp_path,
                                                            private_containers_config):  # fmt: skip
    silent = SilentRegistry()
    try:
        ovl = make_overlay()
        change(ovl, 1)
        layout = tmp_path / "layout"
        ref = f"{silent.host}/data:v1"
        state = image_state(tmp_path, ovl, {"data": push_args(layout, ref)})
        started = time.monotonic()
        result = hook(hook_bin, state, "--push-timeout", "3")
        took = time.monotonic() - started
        assert 3 <= took < 10, took
        line = result.error_for("data")
        assert "(no push within 3 s, --push-timeout; skopeo killed)" in line, line
        committed_not_pushed(result, layout, ref, "timed out")
        assert not [p for p in layout.iterdir() if TMP_MARK in p.name]
    finally:
        silent.close()


def auth_file(path: Path, host: str, password: str) -> Path:
    """A containers-auth.json(5) file as `podman login --authfile` writes it."""
    token = base64.b64encode(f"{USER}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


def refused_login() -> str:
    """The cause skopeo names for credentials the registry refuses: skopeo 1.9.3 (Debian 12)
    says `unauthorized`; skopeo 1.18 (Debian 13) asks first whether a blob is there and says
    `authentication required`."""
    found = re.search(r"(\d+)\.(\d+)", run(["skopeo", "--version"]).stdout)
    version = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    return "unauthorized" if version < (1, 18) else "authentication required"


def test_wrong_password_fails_with_unauthorized(hook_bin, make_overlay, tmp_path, registry):
    ovl = make_overlay()
    layout = tmp_path / "layout"
    ref = f"{registry.host}/data:latest"
    state = image_state(tmp_path, ovl, {"data": push_args(layout, ref)})
    wrong = auth_file(tmp_path / "wrong.json", registry.host, "not-the-password")
    change(ovl, 1)
    result = hook(hook_bin, state, "--auth-file", str(wrong))
    committed_not_pushed(result, layout, ref, refused_login())
    Path("/run/containers/0/auth.json").unlink()  # no credentials at all
    change(ovl, 2)
    committed_not_pushed(hook(hook_bin, state), layout, ref, refused_login())
    right = auth_file(tmp_path / "right.json", registry.host, PASSWORD)
    change(ovl, 3)
    result = hook(hook_bin, state, "--auth-file", str(right))
    assert result.returncode == 0, result.log
    assert registry.manifest("data", "latest")[1] == written_manifest(result)


def test_untrusted_certificate_fails_and_is_never_skipped(hook_bin, make_overlay, tmp_path,
                                                          registry):  # fmt: skip
    registry.distrust()  # the CA is no longer in certs.d: the system's CAs do not know it
    ovl = make_overlay()
    layout = tmp_path / "layout"
    ref = f"docker://{registry.host}/data:latest"
    change(ovl, 1)
    result = hook(hook_bin, image_state(tmp_path, ovl, {"data": push_args(layout, ref)}))
    committed_not_pushed(result, layout, ref.removeprefix("docker://"),
                         "certificate signed by unknown authority")  # fmt: skip
    manifest = json.loads(blob(layout, tagged(check_layout(layout), "data")[0]).read_bytes())
    assert not registry.has_blob("data", manifest["config"]["digest"])


def test_skopeo_not_there_fails_naming_the_option(hook_bin, make_overlay, tmp_path, registry):
    ovl = make_overlay()
    layout = tmp_path / "layout"
    ref = f"{registry.host}/data:latest"
    change(ovl, 1)
    state = image_state(tmp_path, ovl, {"data": push_args(layout, ref)})
    result = hook(hook_bin, state, "--skopeo", "/nonexistent/skopeo")
    assert result.returncode == 1, result.log
    line = result.error_for("data")
    assert f"image-push {ref}: cannot run /nonexistent/skopeo (--skopeo): No such file" in line
    assert len(tagged(check_layout(layout), "data")) == 1


@pytest.mark.parametrize(
    ("method", "ref", "words"),
    [
        ("oci-image", "data:latest", "is not a registry reference host[:port]/repo[:tag]"),
        ("oci-image", "127.0.0.1:5000/Data:v1", "is not a registry reference"),
        ("oci-image", "127.0.0.1:5000/data@sha256:" + "0" * 64, "is not a registry reference"),
        ("oci-image", "127.0.0.1:5000/data:bad tag", "is not a registry reference"),
        ("oci-image", "https://127.0.0.1:5000/data", "is not a registry reference"),
        ("oci-image", "127.0.0.1:5000/data:{nope}", "unknown placeholder {nope}"),
        ("oci-image", "127.0.0.1:5000/{name}:v1", "is not a registry reference"),  # NAME upper
        ("tar", "127.0.0.1:5000/data:v1", "image-push is only for oci-image, not method tar"),
        ("oci-layer", "127.0.0.1:5000/data:v1", "image-push is only for oci-image"),
    ],
)
def test_bad_image_push_fails_before_anything_is_written(hook_bin, make_overlay, tmp_path,
                                                         method, ref, words):  # fmt: skip
    ovl = make_overlay()
    change(ovl, 1)
    target = tmp_path / "out"
    args = {"archive_to": str(target), "method": method, "image_push": ref}
    if method.startswith("oci-image"):
        args["image_tag"] = "data"
    result = hook(hook_bin, image_state(tmp_path, ovl, {"Data": args}))
    assert result.returncode == 1, result.log
    line = result.error_for("Data")
    assert "annotation=com.launchplatform.oci-hooks.archive-overlay.Data.image-push" in line, line
    assert words in line and line.endswith('archive not written"'), line
    assert not target.exists() and not Path(f"{target}.json").exists()


def test_a_dead_pushs_private_layout_is_swept(hook_bin, make_overlay, tmp_path, registry):
    ovl = make_overlay()
    layout = tmp_path / "layout"
    ref = f"{registry.host}/data:latest"
    state = image_state(tmp_path, ovl, {"data": push_args(layout, ref)})
    change(ovl, 1)
    assert hook(hook_bin, state).returncode == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = layout / f".push{TMP_MARK}{dead.pid}-0badc0de"
    (stale / "blobs").parent.mkdir()
    (stale / "index.json").write_text("{}")
    change(ovl, 2)
    result = hook(hook_bin, state)
    assert result.returncode == 0, result.log
    assert "removing a stale temporary" in result.log and not stale.exists()


def test_a_collection_never_takes_the_blobs_of_a_push_in_flight(hook_bin, make_overlay, tmp_path,
                                                               registry):  # fmt: skip
    """Commit A's push is held (its skopeo waits for a file) while commit B, with
    image-keep=1, drops A from index.json and collects: B leaves the collection to the next
    commit, A's push then uploads A whole; the next commit collects A's own blobs."""
    ovl = make_overlay()
    layout = tmp_path / "layout"
    ref = f"{registry.host}/data:latest"
    started, go = tmp_path / "skopeo-started", tmp_path / "skopeo-go"
    wrapper = tmp_path / "held-skopeo"
    wrapper.write_text(f"#!/bin/sh\ntouch {started}\nwhile [ ! -e {go} ]; do sleep 0.05; done\n"
                       f"exec {shutil.which('skopeo')} \"$@\"\n")  # fmt: skip
    wrapper.chmod(0o755)
    change(ovl, 1)
    first = hook(hook_bin, image_state(tmp_path, ovl, {"data": image_args(layout)},
                                       container="run1"))  # fmt: skip
    assert first.returncode == 0, first.log
    change(ovl, 2)
    held = start_hook(hook_bin, image_state(tmp_path / "a", ovl, {"data": push_args(layout, ref)},
                                            container="run2"), "--skopeo", str(wrapper))  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert held.poll() is None and time.monotonic() < deadline, held.stdout.read()
            time.sleep(0.02)
        pushing = tagged(json.loads((layout / "index.json").read_text()), "data")[0]
        pushed_blobs = [pushing, read_json_blob(layout, pushing)["config"]["digest"]]
        change(ovl, 3)
        other = hook(hook_bin, image_state(tmp_path / "b", ovl,
                                           {"data": image_args(layout, image_keep="1")},
                                           container="run3"))  # fmt: skip
        assert other.returncode == 0, other.log
        assert "collection left to the next commit" in other.log, other.log
        index = json.loads((layout / "index.json").read_text())  # the push's layout is there
        assert pushing not in [d["digest"] for d in index["manifests"]]
        assert all(blob(layout, d).exists() for d in pushed_blobs), "a push in flight lost blobs"
    finally:
        go.touch()
    result = finish(held)
    assert result.returncode == 0, result.log
    assert registry.manifest("data", "latest")[1] == pushing
    assert pulled_whole(registry, f"{registry.host}/data@{pushing}", tmp_path / "pulled") == pushing
    change(ovl, 4)
    last = hook(hook_bin, image_state(tmp_path / "c", ovl,
                                      {"data": image_args(layout, image_keep="1")},
                                      container="run4"))  # fmt: skip
    assert last.returncode == 0, last.log
    assert not any(blob(layout, d).exists() for d in pushed_blobs), "the next commit collects"


def test_two_hosts_one_tag_last_push_wins_and_a_tag_per_container_keeps_each_chain(
    hook_bin, make_overlay, tmp_path, registry
):
    """Two hosts (each its own layout and container) commit in turn.  Pushed to one tag,
    the last push wins it and every revision stays reachable by digest; pushed with
    `{id}` in the tag, each container's chain is whole under its own tag."""
    hosts = {
        "a": ("a" * 64, make_overlay("host-a"), tmp_path / "host-a" / "layout"),
        "b": ("b" * 64, make_overlay("host-b"), tmp_path / "host-b" / "layout"),
    }
    shared = f"{registry.host}/data:shared"
    own = f"{registry.host}/data:c-{{id}}"
    pushed: list[str] = []
    for n in (1, 2):
        for key, (cid, ovl, layout) in hosts.items():
            change(ovl, n)
            archives = {
                "data": push_args(layout, shared),
                "mine": push_args(layout, own, image_tag="mine"),
            }
            result = hook(hook_bin, image_state(tmp_path / key, ovl, archives, container=cid))
            assert result.returncode == 0, result.log
            pushed.append(written_manifest(result, "data"))
            assert registry.manifest("data", "shared")[1] == pushed[-1]  # the last push wins
    for n, digest in enumerate(pushed):  # and none is lost: each is there by digest, whole
        assert pulled_whole(registry, f"{registry.host}/data@{digest}",
                            tmp_path / f"by-digest-{n}") == digest  # fmt: skip
    for cid, _, layout in hosts.values():  # a tag per container: each chain under its tag
        data, digest = registry.manifest("data", f"c-{cid}")
        assert tagged(check_layout(layout), "mine") == [digest]
        config_digest = json.loads(data)["config"]["digest"]
        config = json.loads(registry.request("GET", f"/v2/data/blobs/{config_digest}")[0])
        comments = [h["comment"] for h in config["history"]]
        # the container's second stop commits its whole (cumulative) upperdir on the
        # base of its first commit (none here): one entry, the revision whole by itself
        assert comments == [f"container {cid} archive mine"], comments


# --- podman: the loop users run, each revision pushed ----------------------------------------


def podman_login(podman: Podman, host: str) -> None:
    """`podman login` as a user does it, its credentials where podman puts them by default
    and the hook, run with an empty environment, looks.  Rootful, in a root shell without
    XDG_RUNTIME_DIR (sudo, su -): /run/containers/0/auth.json.  Rootless, in the user's
    login session: /run/user/UID/containers/auth.json."""
    cmd = ["podman", "login", "--username", USER, "--password-stdin", host]
    env = {k: v for k, v in podman.env().items() if k != "XDG_RUNTIME_DIR"}
    prefix = []
    if podman.user is not None:
        runtime_dir = Path(f"/run/user/{podman.user.uid}")  # /run is this test's overlay
        runtime_dir.mkdir(mode=0o700, parents=True)  # no /run/user where no systemd made it
        os.chown(runtime_dir, podman.user.uid, podman.user.gid)
        # That session's default auth file, named: podman 5's login joins the user namespace
        # of the pause process its XDG_RUNTIME_DIR holds, and this podman's is elsewhere.
        env["XDG_RUNTIME_DIR"] = str(podman.root / "xdg")
        cmd += ["--authfile", str(runtime_dir / "containers" / "auth.json")]
        prefix = ["runuser", "-u", podman.user.name, "--"]
    run([*prefix, "env", "-i", *[f"{k}={v}" for k, v in env.items()], *cmd], input=PASSWORD)


@pytest.mark.parametrize("rootless", [False, True], ids=["rootful", "rootless"])
def test_podman_loop_pushes_each_revision_and_another_podman_pulls_it(
    rootless: bool,
    loop_images: Path,  # noqa: F811 - the fixture
    hook_bin: Path,
    tmp_path: Path,
    registry: Registry,
) -> None:
    user = None
    if rootless:
        require_tools("runuser", "newuidmap", "newgidmap")
        user = ensure_user(TEST_USER)
    key = "pl" if rootless else "pf"
    ref = f"{registry.host}/loop/data:{key}"
    with loop_podman(loop_images, key, hook_bin, user) as (podman, layout, log):
        # After podman's first run: podman 5 would take login's XDG_RUNTIME_DIR as its own.
        Path("/run/containers/0/auth.json").unlink()  # podman login's, not the fixture's
        podman_login(podman, registry.host)
        views = []
        for n in range(1, RUNS + 1):
            pinned = user_tool(podman, "skopeo", "inspect", "--format", "{{.Digest}}",
                               f"oci:{layout}:data").stdout.strip()  # fmt: skip
            podman.load(f"oci:{layout}:data", f"localhost/data:in{n}")
            annotations = archive_annotations(
                "data", mount_point="/data", archive_to=str(layout), image_tag="data",
                image_base=pinned, method="oci-image", image_push=ref,
            )  # fmt: skip
            proc = podman(*podman_run_args(annotations, f"localhost/data:in{n}", True, LOOP,
                                           "/data", str(n)), check=False)  # fmt: skip
            diag = f"\nrun {n}: exit {proc.returncode}\n{proc.stderr}\n{read_log(log)}"
            assert proc.returncode == 0, diag
            before, _, after = proc.stdout.partition("#####\n")
            if views:
                assert_same_tree(views[-1], parse_listing(before), f"run {n} before", diag)
            views.append(parse_listing(after))
            assert_run_changes(views[-1], n, diag)
            assert read_log(log).count('event="revision pushed"') == n, diag
            digest = written_manifest(HookRun(0, read_log(log).splitlines()[-1]))
            assert tagged(check_layout(layout), "data") == [digest]
            assert registry.manifest("loop/data", key)[1] == digest, diag
        check_another_podman(loop_images / f"{key}2", registry, ref, views[-1])


def check_another_podman(root: Path, registry: Registry, ref: str, expected) -> None:
    """A podman with a storage of its own pulls the tag and sees what the last run left."""
    other = Podman(root)
    try:
        other.setup()
        other.load(f"oci:{root.parent / 'img'}:bb", BB_IMAGE)
        other("pull", "--quiet", "--creds", f"{USER}:{PASSWORD}", ref)
        proc = other(*podman_run_args({}, ref, False, LISTING, "/data"))
        assert_same_tree(expected, parse_listing(proc.stdout), "the tag pulled elsewhere")
    finally:
        other.teardown()


def test_readme_push_loop(hook_bin: Path, registry: Registry) -> None:
    """The README's push loop, run by bash as written with rootful podman (the hook in a
    hooks dir, --allow-dir /srv/revisions), a tmpfs on /srv, and podman login's credentials
    in /run/containers/0/auth.json (no XDG_RUNTIME_DIR, as in `sudo -i`)."""
    require_tools("podman", "runc", "jq", "unshare")
    Path("/run/containers/0/auth.json").unlink()  # the block's podman login writes it
    env = {"REG": registry.host, "REG_USER": USER, "REG_PASSWORD": PASSWORD,
           "XDG_RUNTIME_DIR": ""}  # fmt: skip
    proc, diag = run_readme_with_podman(hook_bin, "push-loop", "/srv/revisions", env,
                                        "mount -t tmpfs tmpfs /srv")  # fmt: skip
    assert proc.returncode == 0, diag
    lines = proc.stdout.splitlines()
    assert lines[-4:] == ["hello", "run 1", "run 2", "run 3"], diag
    pushed, local = lines[-6:-4]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", pushed) and pushed == local, diag
    assert diag.count('event="revision pushed"') == 3, diag


PLAIN_REGISTRY_CONFIG = """version: 0.1
storage:
  filesystem:
    rootdirectory: {root}/storage
http:
  addr: 127.0.0.1:{port}
"""


def test_plain_http_only_where_registries_conf_says_insecure(hook_bin, make_overlay, tmp_path,
                                                              private_containers_config):  # fmt: skip
    root, port = tmp_path / "plain", free_port()
    root.mkdir()
    (root / "registry.yml").write_text(PLAIN_REGISTRY_CONFIG.format(root=root, port=port))
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "registry.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "registry not up"
                time.sleep(0.2)
        ovl = make_overlay()
        layout = tmp_path / "layout"
        ref = f"127.0.0.1:{port}/data:latest"
        state = image_state(tmp_path, ovl, {"data": push_args(layout, ref)})
        change(ovl, 1)
        refused = hook(hook_bin, state)  # HTTPS asked, HTTP answered: no fallback
        committed_not_pushed(refused, layout, ref, "server gave HTTP response to HTTPS client")
        conf = Path("/etc/containers/registries.conf.d/50-test-insecure.conf")
        conf.write_text(f'[[registry]]\nlocation = "127.0.0.1:{port}"\ninsecure = true\n')
        change(ovl, 2)
        result = hook(hook_bin, state)
        assert result.returncode == 0, result.log
        digest = run(["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                      f"docker://{ref}"]).stdout.strip()  # fmt: skip
        assert digest == written_manifest(result)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
