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
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import archive_annotations, requires_root
from engines import CLEAN_PATH, require, run
from test_oci_image import blob, check_layout, image_args, image_state, tagged, written_manifest
from test_safety import TMP_MARK, HookRun, hook, mounted

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
    """A CA made for the test and a server certificate for 127.0.0.1 signed by it."""
    key, crt = root / f"{name}.key", root / f"{name}.crt"
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(crt), "-days", "2", "-subj", f"/CN=archive_overlay test {name}"])  # fmt: skip
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(root / "server.key"),
         "-out", str(root / "server.csr"), "-subj", "/CN=127.0.0.1"])  # fmt: skip
    (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
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
    return [m.group(1) for method, path, _ in requests if method == "HEAD" and (m := head.match(path))]


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
