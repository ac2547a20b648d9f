"""What a run of the installed hook loads: only what it uses.

Every container stop waits for the hook, so its start-up is part of every stop.
These tests are not timed (bench/bench.py measures): they run the installed
console script, as engines do (empty environment, piped state), and list the
modules loaded when it exits, so that a change that makes every run pay for a
module it does not use fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import archive_annotations, state_json, write_bundle

# Runs the console script as its own interpreter would, and writes the modules
# loaded (not the stand-ins for modules not yet used) when it exits: the hook
# ends with os._exit, which skips atexit, so that is where the list is taken.
DRIVER = """
import os, sys
script, report = sys.argv[1], sys.argv[2]
def write_report():
    stand_in = getattr(sys.modules.get("archive_overlay"), "DeferredModule", ())
    with open(report, "w") as f:
        for name, module in sorted(sys.modules.items()):
            if module is not None and not isinstance(module, stand_in):
                f.write(name + "\\t" + str(getattr(module, "__file__", None)) + "\\n")
real_exit = os._exit
def exit_and_report(status):
    write_report()
    real_exit(status)
os._exit = exit_and_report
sys.argv = [script]
with open(script) as f:
    code = compile(f.read(), script, "exec")
exec(code, {"__name__": "__main__"})
"""

# Modules a run must not load unless it uses them, and why a run does not.
NEVER = {
    "asyncio": "structlog's async log methods: the hook logs synchronously",
    "_asyncio": "the same",
    "logging": "structlog's bridge to stdlib logging",
    "structlog.stdlib": "the same",
    "structlog.threadlocal": "deprecated part of structlog",
    "textwrap": "for printing tracebacks: the hook logs one line",
    "tokenize": "for reading source files",
    "linecache": "the same",
    "copy": "for copying loggers",
    "secrets": "temporaries' names come from os.urandom",
}
NOT_WITHOUT_ARCHIVE = {
    "ctypes": "glibc calls, when an archive is committed",
    "isal": "tar.gz and oci-layer",
    "zstandard": "tar.zst and oci-layer+zstd",
    "hashlib": "oci-layer digests",
    "_hashlib": "the same",
    "shutil": "replacing a directory archive",
}


def interpreter(hook_bin: Path) -> str:
    """The interpreter the console script names on its #! line."""
    first = hook_bin.read_text().splitlines()[0]
    assert first.startswith("#!"), first
    return first[2:].split()[0]


def loaded_by_run(hook_bin: Path, stdin: str, tmp_path: Path) -> dict[str, str]:
    report = tmp_path / "modules.txt"
    report.unlink(missing_ok=True)
    proc = subprocess.run(
        [interpreter(hook_bin), "-c", DRIVER, str(hook_bin), str(report)],
        input=stdin.encode(), capture_output=True, env={}, cwd="/", timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"level=error" not in proc.stderr and b"Traceback" not in proc.stderr
    lines = report.read_text().splitlines()
    return dict(line.split("\t") for line in lines)


def loaded(modules: dict[str, str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def loaded_by_the_interpreter(hook_bin: Path) -> set[str]:
    """What the interpreter loads before running any code of ours (Python 3.13 loads
    linecache at start-up, even with -S): no run can avoid those."""
    proc = subprocess.run(
        [interpreter(hook_bin), "-c", "import sys; print(*sys.modules, sep='\\n')"],
        capture_output=True, text=True, env={}, cwd="/", timeout=60, check=True,
    )  # fmt: skip
    return set(proc.stdout.split())


def paid_for(modules: dict[str, str], unused: dict[str, str], hook_bin: Path) -> list[str]:
    """The modules of `unused` a run loaded that the interpreter alone does not load."""
    ours = {name: file for name, file in modules.items()
            if name not in loaded_by_the_interpreter(hook_bin)}  # fmt: skip
    return [name for name in unused if loaded(ours, name)]


def small_upperdir(tmp_path: Path) -> Path:
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "greeting").write_text("hello\n")
    return upper


def archive_state(tmp_path: Path, upper: Path, method: str, archive_to: Path) -> str:
    mount = {
        "destination": "/data",
        "type": "overlay",
        "source": "overlay",
        "options": [f"lowerdir={tmp_path}", f"upperdir={upper}", f"workdir={tmp_path}/work"],
    }
    annotations = archive_annotations(
        "d", mount_point="/data", archive_to=str(archive_to), method=method
    )
    return state_json(write_bundle(tmp_path / f"bundle-{method}", [mount], annotations))


def test_a_run_with_nothing_to_archive_loads_only_what_it_uses(hook_bin, tmp_path):
    bundle = write_bundle(tmp_path / "bundle", [], {})
    modules = loaded_by_run(hook_bin, state_json(bundle), tmp_path)
    assert loaded(modules, "click") and loaded(modules, "structlog")  # the report is real
    paid = paid_for(modules, {**NEVER, **NOT_WITHOUT_ARCHIVE}, hook_bin)
    assert paid == [], "a run with nothing to archive loaded " + ", ".join(
        f"{name} ({NEVER.get(name) or NOT_WITHOUT_ARCHIVE[name]})" for name in paid
    )


def test_a_tar_gz_run_loads_its_compressor_and_nothing_else_unused(hook_bin, tmp_path):
    archive_to = tmp_path / "out.tar.gz"
    state = archive_state(tmp_path, small_upperdir(tmp_path), "tar.gz", archive_to)
    modules = loaded_by_run(hook_bin, state, tmp_path)
    assert archive_to.is_file()
    assert loaded(modules, "isal") and loaded(modules, "ctypes")
    unused = {**NEVER, **NOT_WITHOUT_ARCHIVE}
    for used in ("ctypes", "isal"):
        del unused[used]
    assert paid_for(modules, unused, hook_bin) == []


def test_a_module_put_off_is_loaded_when_a_run_uses_it(hook_bin, tmp_path):
    """oci-layer needs hashlib: the stand-in becomes the real module and the digests are right."""
    archive_to = tmp_path / "layer.tar.gz"
    state = archive_state(tmp_path, small_upperdir(tmp_path), "oci-layer", archive_to)
    modules = loaded_by_run(hook_bin, state, tmp_path)
    assert loaded(modules, "hashlib") and not loaded(modules, "asyncio")
    descriptor = json.loads(Path(f"{archive_to}.json").read_text())
    import hashlib

    assert descriptor["digest"] == "sha256:" + hashlib.sha256(archive_to.read_bytes()).hexdigest()


def test_modules_put_off_work_for_a_program_that_imports_the_hook(hook_bin):
    """Importing archive_overlay as a library leaves asyncio, logging, structlog and the
    garbage collector as they would be without it."""
    code = (
        "import archive_overlay, asyncio, logging, structlog, structlog.stdlib, shutil\n"
        "assert asyncio.run(asyncio.sleep(0, 'ok')) == 'ok'\n"
        "logging.getLogger('x').addHandler(logging.NullHandler())\n"
        "assert structlog.stdlib.get_logger() is not None\n"
        "assert callable(shutil.rmtree) and type(asyncio).__name__ == 'module'\n"
        "import gc\n"  # the collector is back, and nothing of the importer's is frozen
        "assert gc.isenabled() and gc.get_freeze_count() == 0\n"
    )
    proc = subprocess.run(
        [interpreter(hook_bin), "-c", code], capture_output=True, env={}, cwd="/", check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()


def test_every_module_a_run_loads_from_the_venv_is_compiled(hook_bin, tmp_path):
    """Installing compiles the bytecode: no run compiles a module (a rootless user could not
    even save the result).  The venv is read-only for the whole session (conftest's
    hook_bin), so no earlier run as root can have written what the install left out."""
    venv = Path(interpreter(hook_bin)).parent.parent
    assert not os.access(venv / "lib", os.W_OK), f"{venv} is writable: a run could save .pyc"
    bundle = write_bundle(tmp_path / "bundle", [], {})
    modules = loaded_by_run(hook_bin, state_json(bundle), tmp_path)
    from importlib.util import cache_from_source

    checked, stale = 0, []
    for name, file in modules.items():
        if not file.endswith(".py") or not file.startswith(str(venv)):
            continue
        checked += 1
        pyc = Path(cache_from_source(file))
        if not pyc.exists() or not pyc_is_current(pyc, Path(file)):
            stale.append(name)
    assert checked > 20 and "archive_overlay" in modules
    assert stale == []


def pyc_is_current(pyc: Path, source: Path) -> bool:
    """The header of a timestamp .pyc names the source's mtime and size (PEP 552)."""
    header = pyc.read_bytes()[:16]
    flags = int.from_bytes(header[4:8], "little")
    if flags:  # hash-based: checked against the source by other means
        return True
    st = os.stat(source)
    mtime, size = int.from_bytes(header[8:12], "little"), int.from_bytes(header[12:16], "little")
    return mtime == int(st.st_mtime) & 0xFFFFFFFF and size == st.st_size & 0xFFFFFFFF
