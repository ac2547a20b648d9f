"""The revision loop at its edges (issue 16), each case reproduced with the tool that found it.

A base without history (umoci insert --no-history) that buildah and podman must
still build on; SIGKILL at every step of a commit, then `umoci gc` and skopeo;
a container that stops twice (podman start twice); a container id that is not
UTF-8; two hooks in the same second with {time}; names as long as NAME_MAX.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import archive_annotations, requires_root
from engines import Podman, build_oci_image, build_rootfs, remove_tree, run, scratch_dir
from test_oci_image import (
    COMMITTED_BY_ARCHIVE,
    COMMITTED_BY_ID,
    REF_NAME,
    check_layout,
    image_args,
    image_state,
    read_json_blob,
    tagged,
    written_manifest,
)
from test_oci_layer import require_tools
from test_safety import TMP_MARK, finish, hook, mounted, small_tree, start_hook
from trees import assert_same_tree, snapshot

pytestmark = requires_root


@pytest.fixture
def engine_dir() -> Iterator[Path]:
    """A world-reachable scratch dir with a short, lowercase name (podman's `oci:` refs)."""
    base = scratch_dir("ao-re-")
    base.chmod(0o755)
    try:
        yield base
    finally:
        remove_tree(base)


def non_empty_history(config: dict) -> int:
    return sum(1 for h in config.get("history", []) if not h.get("empty_layer"))


# --- 2. a base without history ------------------------------------------------------------


def test_revision_on_a_base_without_history_is_built_on_by_buildah_and_podman(
    hook_bin, make_overlay, tmp_path, engine_dir
):
    """umoci insert --no-history makes a 2-layer base with no history; the revision on it
    must list one non-empty history entry per layer, or buildah commit and podman commit of
    a container made from it fail ("history lists 2 non-empty layers, but we have 4 layers on disk")."""
    require_tools("umoci", "buildah", "podman", "runc", "skopeo")
    layout = engine_dir / "layout"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:data"])
    rootfs = build_rootfs(engine_dir / "rootfs")
    run(["umoci", "insert", "--no-history", "--image", f"{layout}:data", str(rootfs), "/"])
    extra = engine_dir / "extra"
    extra.mkdir()
    (extra / "from-the-base.txt").write_text("second base layer\n")
    run(["umoci", "insert", "--no-history", "--image", f"{layout}:data", str(extra), "/etc"])
    base_config = json.loads(run(["skopeo", "inspect", "--config", f"oci:{layout}:data"]).stdout)
    assert non_empty_history(base_config) == 0 and len(base_config["rootfs"]["diff_ids"]) == 2

    ovl = small_tree(make_overlay())
    commit = hook(hook_bin, image_state(tmp_path, ovl, {"data": image_args(layout)}))
    assert commit.returncode == 0, commit.log
    check_layout(layout)

    podman = Podman(engine_dir / "p")
    try:
        podman.setup()
        podman.load(f"oci:{layout}:data", "localhost/revision")
        podman("create", "--name", "from-revision", "localhost/revision", "/bin/true")
        podman("commit", "--quiet", "from-revision", "localhost/by-podman")
        buildah = podman.as_user(["buildah", "--storage-driver", "overlay"])
        work = run([*buildah, "from", "--quiet", "--pull-never", f"oci:{layout}:data"]).stdout
        made = run([*buildah, "commit", "--quiet", work.strip(), "localhost/by-buildah"])
        assert made.returncode == 0
        for image in ("localhost/by-buildah", "localhost/by-podman"):
            layers = json.loads(podman("image", "inspect", image).stdout)[0]["RootFS"]["Layers"]
            assert len(layers) == 4, (image, layers)  # the revision's 3 and the commit's
    finally:
        run([*podman.as_user(["buildah", "rm", "--all"])], check=False)
        podman.teardown()
    config = json.loads(run(["skopeo", "inspect", "--config", f"oci:{layout}:data"]).stdout)
    assert non_empty_history(config) == len(config["rootfs"]["diff_ids"]) == 3, config
    padding, ours = config["history"][:2], config["history"][2]
    assert not any(h.get("created_by", "").startswith("archive_overlay") for h in padding)
    assert all("recorded no history" in h["comment"] for h in padding), padding
    assert ours["created_by"].startswith("archive_overlay ")


# --- 4. a killed commit's temporaries and `umoci gc` ----------------------------------------

# A commit's steps after the layer's first write: fsyncs of the layer (1), the blobs dir (2),
# config and blobs dir (3, 4), manifest and blobs dir (5, 6), index.json (7), the layout (8);
# renames of the layer, config, manifest (into blobs/sha256) and index.json (1-4).
COMMIT_STEPS = (
    [("write", 1)] + [("fsync", n) for n in range(1, 9)] + [("renameat", n) for n in range(1, 5)]
)
# A commit that merges writes one blob more: the merged layer, between its own layer and
# its config (10 fsyncs and 5 renames in all: an 11th or a 6th is never reached).
MERGING_STEPS = [("fsync", n) for n in range(1, 11)] + [("renameat", n) for n in range(1, 6)]
KILLS = [(s, n, False) for s, n in COMMIT_STEPS] + [(s, n, True) for s, n in MERGING_STEPS]


@pytest.mark.parametrize(
    ("syscall", "when", "merging"), KILLS,
    ids=[f"{s}-{n}{'-merging' if m else ''}" for s, n, m in KILLS],
)  # fmt: skip
def test_sigkill_at_any_step_of_a_commit_leaves_a_layout_umoci_gc_and_skopeo_accept(
    hook_bin, make_overlay, tmp_path, syscall, when, merging
):
    """Nothing but digest-named blobs in blobs/sha256, even after a SIGKILL (how podman and
    runc end a hook past its timeout): `umoci gc` refuses a layout holding anything else.
    The same for a commit that merges layers (image-max-layers=2 on a third commit)."""
    require_tools("strace", "umoci", "skopeo")
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    first = hook(hook_bin, image_state(tmp_path, ovl, {"data": image_args(layout)}, "first"))
    assert first.returncode == 0, first.log
    more = {"image_max_layers": "2"} if merging else {}
    if merging:
        with mounted(ovl) as merged:
            (merged / "hello").unlink()  # a deletion the merge must keep
            (merged / "between").write_text("a layer the merge takes\n")
        between = hook(hook_bin, image_state(tmp_path, ovl, {"data": image_args(layout)},
                                             "between"))  # fmt: skip
        assert between.returncode == 0, between.log
    with mounted(ovl) as merged:
        (merged / "second").write_text("a new layer, config and manifest\n")
    state = image_state(tmp_path, ovl, {"data": image_args(layout, **more)}, "second")
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}", "-e",
         f"inject={syscall}:signal=KILL:when={when}", str(hook_bin)],
        input=state.encode(), capture_output=True, env={}, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode in (-9, 137), (proc.returncode, proc.stderr.decode())
    blobs = [p.name for p in (layout / "blobs" / "sha256").iterdir()]
    run(["umoci", "gc", "--layout", str(layout)])  # before the fix: "invalid digest"
    assert all(re.fullmatch("[0-9a-f]{64}", name) for name in blobs), blobs
    run(["skopeo", "inspect", f"oci:{layout}:data"])
    after = hook(hook_bin, state)  # the next run removes the dead one's temporaries, commits
    assert after.returncode == 0, after.log
    assert ("layers merged" in after.log) == merging, after.log
    assert tagged(check_layout(layout), "data") == [written_manifest(after)]
    run(["umoci", "gc", "--layout", str(layout)])
    run(["skopeo", "inspect", f"oci:{layout}:data"])


# --- 1. a container that stops twice ---------------------------------------------------------

# Run 1 creates first.txt in / and in /data; run 2 (the same container, started again)
# deletes them, which leaves no whiteout: they were only in the upperdir.  podman 4.3 keeps
# the rootfs's upperdir across starts, but mounts an image mount afresh (a new upperdir):
# there /data/first.txt is gone already, and each commit must still be what run 2 left.
TWICE = """set -e
if [ -e /stopped-once ]; then
  rm /first.txt; rm -f /data/first.txt
  echo two > /second.txt; echo two > /data/second.txt
else
  touch /stopped-once
  echo one > /first.txt; echo one > /data/first.txt
fi
"""


def wait_for_commits(log: Path, count: int) -> list[str]:
    """The hook's `archive written` lines, once there are `count` of them."""
    deadline = time.monotonic() + 60
    while True:
        text = log.read_text() if log.exists() else ""
        lines = [line for line in text.splitlines() if "archive written" in line]
        if len(lines) >= count or time.monotonic() > deadline:
            assert len(lines) == count and "level=error" not in text, text
            return lines


def unpacked_names(layout: Path, tag: str, work: Path) -> set[str]:
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(work)])
    return {p.name for p in (work / "rootfs").iterdir()}


def test_a_container_that_stops_twice_commits_on_the_base_its_upperdir_is_relative_to(
    hook_bin, tmp_path, engine_dir
):
    """podman start -a twice: the second commit goes on the base of the first (the image the
    container was made from), not on the first commit: the file run 2 deleted is gone."""
    require_tools("podman", "runc", "umoci")
    roots, datas = engine_dir / "root", engine_dir / "data"
    build_oci_image(roots, "app", build_rootfs(engine_dir / "rootfs"))
    (engine_dir / "seed").mkdir()
    (engine_dir / "seed" / "keep.txt").write_text("kept\n")
    build_oci_image(datas, "data", engine_dir / "seed")
    original = {name: json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
                for name, layout in (("root", roots), ("data", datas))}  # fmt: skip
    podman, log = Podman(engine_dir / "p"), engine_dir / "hook.log"
    try:
        podman.setup()
        podman.install_hook(hook_bin, log, allow_dir=engine_dir)
        podman.load(f"oci:{roots}:app", "localhost/app:0")
        podman.load(f"oci:{datas}:data", "localhost/data:0")
        annotations = archive_annotations("root", mount_point="/", archive_to=str(roots),
                                          method="oci-image", image_tag="app")  # fmt: skip
        annotations |= archive_annotations("data", mount_point="/data", archive_to=str(datas),
                                           method="oci-image", image_tag="data")  # fmt: skip
        flags = [f"--annotation={key}={value}" for key, value in annotations.items()]
        podman("create", "--name", "twice", "--network", "none", *flags, "--mount",
               "type=image,source=localhost/data:0,destination=/data,rw=true",
               "localhost/app:0", "sh", "-c", TWICE)  # fmt: skip
        for run_number in (1, 2):
            podman("start", "--attach", "twice")
            wait_for_commits(log, 2 * run_number)
        podman.load(f"oci:{roots}:app", "localhost/app:2")
        podman.load(f"oci:{datas}:data", "localhost/data:2")
        seen = podman("run", "--rm", "--network", "none", "--mount",
                      "type=image,source=localhost/data:2,destination=/data",
                      "localhost/app:2", "ls", "/", "/data").stdout.split()  # fmt: skip
        assert seen.count("second.txt") == 2 and "first.txt" not in seen, seen
        assert "keep.txt" in seen, seen
        container = podman("inspect", "--format", "{{.Id}}", "twice").stdout.strip()
        for name, layout, tag in (("root", roots, "app"), ("data", datas, "data")):
            names = unpacked_names(layout, tag, tmp_path / f"unpacked-{name}")
            assert "second.txt" in names and "first.txt" not in names, (name, names)
            index = check_layout(layout)
            first, second = (read_json_blob(layout, d["digest"]) for d in index["manifests"][1:])
            for manifest, descriptor in ((first, index["manifests"][1]),
                                         (second, index["manifests"][2])):  # fmt: skip
                assert manifest["annotations"]["org.opencontainers.image.base.digest"] == (
                    original[name])  # fmt: skip
                origin = {COMMITTED_BY_ID: container, COMMITTED_BY_ARCHIVE: name}
                assert origin.items() <= manifest["annotations"].items(), manifest
                assert origin.items() <= descriptor["annotations"].items(), descriptor
            assert len(second["layers"]) == 2, second  # the image's layer and run 2's upperdir
    finally:
        podman.teardown()


def test_the_base_of_an_earlier_commit_that_is_gone_fails_before_writing(
    hook_bin, make_overlay, tmp_path
):
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    state = image_state(tmp_path, ovl, {"data": image_args(layout)}, container="other")
    assert hook(hook_bin, state).returncode == 0  # revision 1, another container's
    state = image_state(tmp_path, ovl, {"data": image_args(layout)}, container="twice")
    assert hook(hook_bin, state).returncode == 0  # revision 2, on 1
    index = json.loads((layout / "index.json").read_text())
    gone = index["manifests"][0]["digest"]
    index["manifests"] = index["manifests"][1:]  # revision 1 dropped, then collected
    (layout / "index.json").write_text(json.dumps(index))
    run(["umoci", "gc", "--layout", str(layout)])
    before = snapshot(layout)
    again = hook(hook_bin, state)
    assert again.returncode == 1, again.log
    line = again.error_for("data")
    assert gone in line and "earlier commit" in line and "image-base" in line, line
    assert str(layout) in line and "Traceback" not in again.log
    assert_same_tree(before, snapshot(layout), "the layout", again.log)
    pinned = image_state(tmp_path, ovl, {"data": image_args(layout, image_base="data")}, "twice")
    assert hook(hook_bin, pinned).returncode == 0  # image-base given still wins


# --- 6. a container id that is not UTF-8 ----------------------------------------------------


@pytest.mark.parametrize("layout_there", [False, True], ids=["new-layout", "existing-layout"])
def test_a_container_id_that_is_not_utf8_fails_before_writing(hook_bin, make_overlay, tmp_path,
                                                               layout_there):  # fmt: skip
    """A lone surrogate in the state's id: a tar's {id} takes it (as a file name, the bytes
    it escapes), a revision cannot (its config and annotations are UTF-8 JSON)."""
    ovl = small_tree(make_overlay())
    layout = tmp_path / "layout"
    if layout_there:
        state = image_state(tmp_path, ovl, {"data": image_args(layout)}, container="earlier")
        assert hook(hook_bin, state).returncode == 0
    before = snapshot(layout) if layout_there else None
    archives = {"data": image_args(layout),
                "tarred": {"archive_to": f"{tmp_path}/out/{{id}}.tar", "method": "tar"}}  # fmt: skip
    bad = hook(hook_bin, image_state(tmp_path, ovl, archives, container="bad\udc80id"))
    assert bad.returncode == 1, bad.log
    line = bad.error_for("data")
    assert "container id 'bad\\\\udc80id' is not valid UTF-8" in line, line
    assert "Traceback" not in bad.log and "codec" not in bad.log, bad.log
    if layout_there:
        assert before is not None
        assert_same_tree(before, snapshot(layout), "the layout (no orphan blob)", bad.log)
    else:
        assert not layout.exists()
    assert [p.name.encode("utf-8", "surrogateescape") for p in (tmp_path / "out").iterdir()] == [
        b"bad\x80id.tar"
    ]


# --- 3. {time}: one archive per run -----------------------------------------------------------

STAMP_RE = re.compile(r"(\d{8}T\d{6})\.(\d{6})Z")


def timed_archives(out: Path, layout: Path) -> dict[str, dict[str, str]]:
    return {"data": {"archive_to": f"{out}/{{name}}-{{time}}.tar.gz", "method": "tar.gz"},
            "image": image_args(layout, tag="rev-{time}")}  # fmt: skip


def test_two_hooks_in_the_same_second_keep_two_archives_and_two_revisions(
    hook_bin, make_overlay, tmp_path
):
    """Two containers stop in the same second: {time} differs (microseconds), both archives
    and both revisions are kept, each readable by tools we did not write."""
    require_tools("bsdtar", "skopeo")
    ovl = small_tree(make_overlay())
    for attempt in range(5):  # until both runs fall in the same second
        out, layout = tmp_path / f"out{attempt}", tmp_path / f"layout{attempt}"
        states = [image_state(tmp_path / f"s{i}", ovl, timed_archives(out, layout), f"c{i}")
                  for i in range(2)]  # fmt: skip
        time.sleep(1.05 - time.time() % 1)  # start both just after a second begins
        runs = [finish(p) for p in [start_hook(hook_bin, state) for state in states]]
        assert [r.returncode for r in runs] == [0, 0], "\n".join(r.log for r in runs)
        names = sorted(p.name for p in out.iterdir())
        stamps = [STAMP_RE.search(name) for name in names]
        if len({m.group(1) for m in stamps if m}) == 1:
            break
    else:
        pytest.fail(f"5 tries: the two hooks never ran in the same second: {names}")
    assert len(names) == 2 and stamps[0].group(0) != stamps[1].group(0), names
    for name in names:
        listing = run(["bsdtar", "-tzf", str(out / name)]).stdout.split()
        assert "./hello" in listing, listing
    index = check_layout(layout)
    tags = sorted(d["annotations"][REF_NAME] for d in index["manifests"])
    assert tags == [f"rev-{m.group(0)}" for m in stamps], (tags, names)
    for tag in tags:
        run(["skopeo", "inspect", f"oci:{layout}:{tag}"])


def test_a_time_archive_to_or_image_tag_taken_already_fails_and_is_kept(
    hook_bin, make_overlay, tmp_path
):
    """Archives of one run share {time}: the second with the same archive-to (or image-tag)
    must fail, naming it, and leave the first alone (RENAME_NOREPLACE at the commit)."""
    ovl = small_tree(make_overlay())
    out, layout = tmp_path / "out", tmp_path / "layout"
    archives = {
        "a-tar": {"archive_to": f"{out}/same-{{time}}.tar", "method": "tar"},
        "b-tar": {"archive_to": f"{out}/same-{{time}}.tar", "method": "tar",
                  "success": f"{out}/b.ok", "exclude": "/hello"},
        "c-copy": {"archive_to": f"{out}/dir-{{time}}", "method": "copy"},
        "d-copy": {"archive_to": f"{out}/dir-{{time}}", "method": "copy", "exclude": "/hello"},
        "e-image": image_args(layout, tag="rev-{time}"),
        "f-image": image_args(layout, tag="rev-{time}"),
    }  # fmt: skip
    result = hook(hook_bin, image_state(tmp_path, ovl, archives))
    assert result.returncode == 1, result.log
    for name in ("b-tar", "d-copy"):
        line = result.error_for(name)
        assert "exists already" in line and str(out) in line and "{time}" in line, line
    line = result.error_for("f-image")
    assert "names a revision" in line and "rev-" in line and str(layout) in line, line
    assert "Traceback" not in result.log
    written = {p.name for p in out.iterdir()}
    assert len(written) == 2 and not (out / "b.ok").exists(), written
    tar = next(out.glob("same-*.tar"))
    assert "./hello" in run(["bsdtar", "-tf", str(tar)]).stdout.split()  # a-tar's, not b-tar's
    assert (next(out.glob("dir-*")) / "hello").exists()  # c-copy's, not d-copy's
    index = check_layout(layout)
    assert len(index["manifests"]) == 1, index  # e-image's; f-image made none
    assert tagged(index, index["manifests"][0]["annotations"][REF_NAME]) == [
        written_manifest(result, "e-image")
    ]


# --- 5. names as long as the filesystem takes -------------------------------------------------


def long_name(length: int, suffix: str = "") -> str:
    return "n" * (length - len(suffix)) + suffix


def test_archive_to_and_success_names_of_255_bytes_are_written(hook_bin, make_overlay, tmp_path):
    """NAME_MAX is 255: every such name is valid, and the temporaries beside it must fit."""
    require_tools("bsdtar")
    ovl = small_tree(make_overlay())
    out = tmp_path / "out"
    out.mkdir()
    assert os.pathconf(out, "PC_NAME_MAX") == 255
    copy, tgz = out / long_name(255), out / long_name(255, ".tar.gz")
    layer = out / long_name(250, ".tar.gz")  # its .json companion: 255
    container = long_name(251)  # {id}.tar: 255, as a long container id makes it
    archives = {
        "copy": {"archive_to": str(copy), "method": "copy", "success": f"{out}/{long_name(255, '1')}"},
        "tgz": {"archive_to": str(tgz), "method": "tar.gz", "success": f"{out}/{long_name(255, '2')}"},
        "layer": {"archive_to": str(layer), "method": "oci-layer"},
        "byid": {"archive_to": f"{out}/{{id}}.tar", "method": "tar"},
    }  # fmt: skip
    result = hook(hook_bin, image_state(tmp_path, ovl, archives, container=container))
    assert result.returncode == 0, result.log
    assert (copy / "hello").read_text() == "hello \n" and (copy / "dir" / "link").is_symlink()
    for tar in (tgz, layer, out / f"{container}.tar"):
        assert "./hello" in run(["bsdtar", "-tf", str(tar)]).stdout.split(), tar
    descriptor = json.loads(Path(f"{layer}.json").read_text())
    assert descriptor["size"] == layer.stat().st_size
    assert (out / long_name(255, "1")).exists() and (out / long_name(255, "2")).exists()
    assert not [p for p in out.iterdir() if TMP_MARK in p.name]


def test_an_oci_layer_whose_json_cannot_exist_fails_before_writing(
    hook_bin, make_overlay, tmp_path
):
    ovl = small_tree(make_overlay())
    out = tmp_path / "out"
    out.mkdir()
    layer = out / long_name(251, ".tar.gz")  # <archive-to>.json would be 256 bytes
    archives = {"layer": {"archive_to": str(layer), "method": "oci-layer"}}
    result = hook(hook_bin, image_state(tmp_path, ovl, archives))
    assert result.returncode == 1, result.log
    line = result.error_for("layer")
    assert str(layer) in line and "too long for the .json file" in line and "250 bytes" in line
    assert "Traceback" not in result.log and list(out.iterdir()) == []


def test_a_long_names_temporary_left_by_a_kill_is_removed_by_the_next_run(
    hook_bin, make_overlay, tmp_path
):
    require_tools("strace")
    ovl = small_tree(make_overlay())
    out = tmp_path / "out"
    tgz = out / long_name(255, ".tar.gz")
    state = image_state(tmp_path, ovl, {"tgz": {"archive_to": str(tgz), "method": "tar.gz"}})
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync", "-e",
         "inject=fsync:signal=KILL:when=1", str(hook_bin)],
        input=state.encode(), capture_output=True, env={}, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode in (-9, 137), (proc.returncode, proc.stderr.decode())
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and TMP_MARK in left[0] and len(left[0]) <= 255, left
    after = hook(hook_bin, state)
    assert after.returncode == 0, after.log
    assert "removing a stale temporary" in after.log
    assert [p.name for p in out.iterdir()] == [tgz.name]
