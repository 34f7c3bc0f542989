"""Run directories under hostile conditions (issue 13): output paths that cannot work, names that are
not folder names, re-runs and resume of failed, changed, damaged and busy run directories, file
modes, arch.json as data rather than code, and Ctrl-C during start-up. Every failure is one line
with a documented exit code (2 input, 4 environment, 130 interrupted) and no traceback."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, cli, tiny_recipe

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def short_recipe(**overrides) -> dict:
    """train -> prune -> finetune: the smallest recipe with a teacher, a structural change and a
    stage after it."""
    r = tiny_recipe(**overrides)
    r["stages"] = [
        {"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
        {"kind": "prune", "importance": "l2", "ratio": 0.5, "scope": "global"},
        {"kind": "finetune", "epochs": 1},
    ]
    return r


def run_cli(*args: str, cwd: Path | None = None, umask: int | None = None, timeout: int = 600):
    """The CLI in this process (conftest.cli), or in a real one when the run needs its own umask."""
    if umask is None:
        return cli(*args, cwd=cwd, timeout=timeout)

    def pre():
        os.umask(umask)

    return subprocess.run([sys.executable, "-m", "compress", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=pre)


def one_line_error(res, code: int, *named: str) -> None:
    """Exit ``code``, no traceback, one error line naming each of ``named``."""
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for n in named:
        assert n in errors[0], (n, errors[0])


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def done_markers(run: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted(run.glob("stages/*/DONE"))}


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A completed train -> prune -> finetune run, written under umask 027; tests work on copies."""
    d = tmp_path_factory.mktemp("done")
    recipe = write_yaml(d / "recipe.yaml", short_recipe())
    out = d / "run"
    res = run_cli("run", str(recipe), "--out", str(out), "--quiet", umask=0o027)
    assert res.returncode == 0, res.stderr
    return recipe, out


@pytest.fixture
def copy_of(done_run, tmp_path):
    def _copy() -> Path:
        dst = tmp_path / "run"
        shutil.copytree(done_run[1], dst)
        return dst

    return _copy


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a real tmpfs (read-only, or tiny to fill up); skipped where mounting is not allowed."""
    mounted: list[Path] = []

    def _mount(name: str, options: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root to mount a tmpfs")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(d)
        return d

    yield _mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# 1. Output directories that cannot work: one line, documented exit code, nothing marked DONE

def test_os_error_classes_map_to_documented_exit_codes():
    from compress.errors import EnvironmentFailure, InputError
    from compress.io import os_failure

    environment = [errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT]
    for code in environment:
        e = os_failure(OSError(code, os.strerror(code), "/runs/x/summary.json"))
        assert isinstance(e, EnvironmentFailure) and "/runs/x/summary.json" in str(e)
    for code in (errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG):
        e = os_failure(OSError(code, os.strerror(code), "/runs/x"), field="--out")
        assert isinstance(e, InputError) and str(e).startswith("--out: ") and "/runs/x" in str(e)
    assert os_failure(OSError(errno.ENOENT, "No such file", "/x")) is None  # not ours to explain: a bug


@pytest.mark.parametrize("case", ["out_is_file", "parent_is_file", "out_name_too_long", "run_name_too_long"])
def test_output_path_that_cannot_be_a_folder_is_input_error(case, tmp_path):
    recipe = short_recipe()
    a_file = tmp_path / "afile"
    a_file.write_text("mine\n")
    args: list[str] = []
    if case == "out_is_file":
        args, named = ["--out", str(a_file)], ("--out", str(a_file))
    elif case == "parent_is_file":
        args, named = ["--out", str(a_file / "run")], ("--out", str(a_file))
    elif case == "out_name_too_long":
        args, named = ["--out", str(tmp_path / ("x" * 300) / "run")], ("--out", "bytes")
    else:
        recipe["name"] = "y" * 300
        named = ("name",)
    res = run_cli("run", str(write_yaml(tmp_path / "r.yaml", recipe)), *args, "--quiet", cwd=tmp_path)
    one_line_error(res, 2, *named)
    assert a_file.read_text() == "mine\n"


def test_read_only_output_is_environment_failure(tmpfs, tmp_path):
    ro = tmpfs("ro", "ro,size=1m")
    res = run_cli("run", str(write_yaml(tmp_path / "r.yaml", short_recipe())), "--out", str(ro / "run"), "--quiet")
    one_line_error(res, 4, str(ro / "run"), "read-only")


def test_disk_full_is_environment_failure_and_nothing_is_marked_done(tmpfs, tmp_path):
    full = tmpfs("full", "size=64k")  # recipe.yaml fits; the first checkpoint (~170 kB) does not
    out = full / "run"
    res = run_cli("run", str(write_yaml(tmp_path / "r.yaml", short_recipe())), "--out", str(out), "--quiet")
    one_line_error(res, 4, str(out / "stages" / "00-train"), "no space left")
    assert (out / "recipe.yaml").is_file()
    assert not list(out.rglob("DONE")) and not (out / "summary.json").exists()
    assert not [p for p in out.rglob(".*") if p.name != ".lock"], "temporary files left behind"


DROP_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def test_permission_denied_is_environment_failure(tmp_path):
    """Root ignores permission bits, so the run gives up the capabilities that let it (setpriv)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    probe = subprocess.run([*DROP_DAC, "touch", str(locked / "probe")], capture_output=True) \
        if shutil.which("setpriv") else None
    if os.geteuid() == 0 and (probe is None or probe.returncode == 0):
        pytest.skip("cannot drop root's permission override here (setpriv)")
    wrap = DROP_DAC if os.geteuid() == 0 else []
    recipe = write_yaml(tmp_path / "r.yaml", short_recipe())
    res = subprocess.run([*wrap, sys.executable, "-m", "compress", "run", str(recipe), "--out", str(locked / "run"),
                          "--quiet"], env=ENV, capture_output=True, text=True, timeout=600)
    one_line_error(res, 4, str(locked / "run"), "permission denied")


# ---------------------------------------------------------------------------------------------
# 2. A run name must be a plain folder name

@pytest.mark.parametrize("name", ["..", ".", "...", "-rf", "a/b", "../up", "CON", "nul.txt", "x" * 256])
def test_run_name_that_is_not_a_plain_folder_name_is_refused(name):
    from compress.errors import InputError
    from compress.recipe import validate_data

    with pytest.raises(InputError) as exc:
        validate_data(short_recipe(name=name))
    assert exc.value.field == "name"


def test_dotdot_name_does_not_write_into_the_current_directory(tmp_path):
    work = tmp_path / "project"
    (work / "runs").mkdir(parents=True)
    (work / "recipe.yaml").write_text("my own recipe\n")
    (work / "summary.json").write_text("{}\n")
    recipe = write_yaml(tmp_path / "r.yaml", short_recipe(name=".."))
    res = run_cli("run", str(recipe), "--quiet", cwd=work)
    one_line_error(res, 2, "name")
    assert (work / "recipe.yaml").read_text() == "my own recipe\n" and (work / "summary.json").read_text() == "{}\n"
    assert sorted(p.name for p in work.iterdir()) == ["recipe.yaml", "runs", "summary.json"]


# ---------------------------------------------------------------------------------------------
# 3. Re-runs and resume

@pytest.mark.parametrize("resume", [False, True], ids=["plain", "resume"])
def test_run_that_failed_before_any_stage_reruns_in_place(resume, tmp_path):
    out = tmp_path / "run"
    # an input error the pre-run checks cannot see: the first stage fails after the run directory exists
    bad = short_recipe()
    bad["stages"] = [{"kind": "prune", "ratio": 0.999999, "scope": "uniform"}]
    res = run_cli("run", str(write_yaml(tmp_path / "bad.yaml", bad)), "--out", str(out), "--quiet")
    one_line_error(res, 2, "stages[0].ratio")
    assert (out / "recipe.yaml").is_file() and not list((out / "stages").rglob("DONE"))  # no stage completed
    fixed = short_recipe()
    fixed["stages"] = fixed["stages"][:1]
    res = run_cli("run", str(write_yaml(tmp_path / "fixed.yaml", fixed)), "--out", str(out), "--quiet",
                  *(["--resume"] if resume else []))
    assert res.returncode == 0, res.stderr
    assert "stages[0]" in res.stderr  # the note says what changed since the failed attempt
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["kind"] == "train"
    assert (out / "stages" / "00-train" / "DONE").exists() and (out / "summary.json").is_file()


def test_resume_into_a_folder_that_is_not_a_run_directory_is_refused(tmp_path):
    out = tmp_path / "notes"
    (out / "stages" / "00-train").mkdir(parents=True)
    (out / "stages" / "00-train" / "mine.txt").write_text("keep\n")
    (out / "todo.md").write_text("keep\n")
    res = run_cli("run", str(write_yaml(tmp_path / "r.yaml", short_recipe())), "--out", str(out), "--resume",
                  "--quiet")
    one_line_error(res, 2, "--resume", "recipe.yaml")
    assert (out / "stages" / "00-train" / "mine.txt").read_text() == "keep\n"
    assert sorted(p.name for p in out.iterdir()) == ["stages", "todo.md"]


def test_resume_keeps_unchanged_stages_and_reruns_from_the_first_changed(done_run, copy_of, tmp_path):
    out = copy_of()
    before = done_markers(out)
    r = short_recipe()
    r["stages"][2]["epochs"] = 2
    res = run_cli("run", str(write_yaml(tmp_path / "r.yaml", r)), "--out", str(out), "--resume", "--quiet")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "stages[2].epochs (1 -> 2)" in res.stderr and "stage 2 (finetune)" in res.stderr
    after = done_markers(out)
    assert after["00-train"] == before["00-train"] and after["01-prune"] == before["01-prune"]
    assert after["02-finetune"] != before["02-finetune"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][2]["epochs"] == 2

    # gates only: the stages are kept and the completed run is judged again
    r["gates"] = {"max_accuracy_drop": 100.0}
    res = run_cli("run", str(write_yaml(tmp_path / "r.yaml", r)), "--out", str(out), "--resume", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "gates.max_accuracy_drop" in res.stderr
    assert done_markers(out) == after
    assert "accuracy_drop" in json.loads((out / "summary.json").read_text())["gates"]["checked"]

    # a top-level block every stage depends on: nothing can be kept, so resume refuses and names it
    r["seed"] = 1
    res = run_cli("run", str(write_yaml(tmp_path / "r.yaml", r)), "--out", str(out), "--resume", "--quiet")
    one_line_error(res, 2, "--resume", "seed (0 -> 1)")
    assert done_markers(out) == after


def test_plain_run_into_a_finished_run_names_the_first_differing_field(done_run, tmp_path):
    _, out = done_run
    before = done_markers(out)
    r = short_recipe()
    r["stages"][1]["ratio"] = 0.25
    res = run_cli("run", str(write_yaml(tmp_path / "r.yaml", r)), "--out", str(out), "--quiet")
    one_line_error(res, 2, "--out", "--resume", "stages[1].ratio (0.5 -> 0.25)")
    assert done_markers(out) == before


DAMAGE = {
    "corrupt_result": ("01-prune/result.json", lambda p: p.write_text('{"stage": ')),
    "missing_result": ("01-prune/result.json", lambda p: p.unlink()),
    "corrupt_arch": ("01-prune/arch.json", lambda p: p.write_text("{nope")),
    "truncated_weights": ("01-prune/model.safetensors", lambda p: os.truncate(p, p.stat().st_size // 2)),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_load_of_a_damaged_run_directory_names_the_file(case, copy_of):
    import compress
    from compress.errors import InputError

    out = copy_of()
    rel, damage = DAMAGE[case]
    target = out / "stages" / rel
    damage(target)
    with pytest.raises(InputError) as exc:
        compress.load(out, "01-prune")
    assert str(target) in str(exc.value)
    assert compress.load(out) is not None  # the intact final stage still loads


def test_load_of_a_damaged_final_stage_via_cli_is_exit_2(copy_of, tmp_path):
    out = copy_of()
    (out / "stages" / "02-finetune" / "result.json").write_text("not json")
    res = run_cli("analyze", "interpolate", str(out), str(out), "--recipe", str(write_yaml(tmp_path / "r.yaml",
                  short_recipe())), "--out", str(tmp_path / "interp"), "--points", "2")
    one_line_error(res, 2, str(out / "stages" / "02-finetune" / "result.json"))


@pytest.mark.parametrize("case", ["corrupt_result", "truncated_weights"])
def test_resume_of_a_damaged_run_directory_reruns_from_the_damaged_stage(case, copy_of, tmp_path):
    out = copy_of()
    before = done_markers(out)
    rel, damage = DAMAGE[case]
    damage(out / "stages" / rel)
    res = run_cli("run", str(write_yaml(tmp_path / "r.yaml", short_recipe())), "--out", str(out), "--resume", "--quiet")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert str(out / "stages" / rel) in res.stderr and "stage 1 (prune)" in res.stderr
    after = done_markers(out)
    assert after["00-train"] == before["00-train"]
    assert after["01-prune"] != before["01-prune"] and after["02-finetune"] != before["02-finetune"]
    json.loads((out / "stages" / "01-prune" / "result.json").read_text())


def test_second_run_into_a_busy_directory_is_refused_and_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "run"
    r = short_recipe()
    r["stages"][0]["epochs"] = 5000  # far longer than the checks below (it is killed after them)
    recipe = write_yaml(tmp_path / "r.yaml", r)
    first = subprocess.Popen([sys.executable, "-m", "compress", "run", str(recipe), "--out", str(out), "--quiet"],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "recipe.yaml").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read().decode()
        for resume in ([], ["--resume"]):
            res = run_cli("run", str(recipe), "--out", str(out), "--quiet", *resume)
            assert first.poll() is None, "the run to finish first ended before the check"
            one_line_error(res, 2, str(out / ".lock"), "in use")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not list(out.rglob("DONE"))
    # the kernel dropped the lock with the killed process: a re-run in place goes ahead
    r["stages"][0]["epochs"] = 1
    res = run_cli("run", str(write_yaml(tmp_path / "r.yaml", r)), "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------
# 4. Files respect the umask (no 0600 temporaries renamed into place)

def test_run_files_respect_the_umask(done_run):
    _, out = done_run  # written under umask 027
    files = [out / n for n in ("summary.json", "report.md", "recipe.yaml")]
    files += [p for p in (out / "stages").rglob("*") if p.is_file()] + [p for p in (out / "dense").iterdir()]
    assert len(files) > 10
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o640}, modes


def test_atomic_writers_respect_the_umask(tmp_path):
    from compress.io import atomic_write_bytes, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_write_bytes(tmp_path / "b.bin", b"\0")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o644}


# ---------------------------------------------------------------------------------------------
# 5. A run directory is data, not code

def _tamper(folder: Path, marker: Path) -> None:
    arch = json.loads((folder / "arch.json").read_text())
    arch["factory"] = "os:system"
    arch["kwargs"] = {"command": f"touch {marker}"}
    (folder / "arch.json").write_text(json.dumps(arch))


def test_tampered_arch_json_is_never_called(copy_of, tmp_path):
    import compress
    from compress.errors import InputError

    out = copy_of()
    marker = tmp_path / "PWNED"
    for stage in ("01-prune", "02-finetune"):
        _tamper(out / "stages" / stage, marker)
    _tamper(out / "dense", marker)

    for which in ("final", "dense", "01-prune"):
        with pytest.raises(InputError, match="arch.json.*os:system.*trust_code") as exc:
            compress.load(out, which)
        assert "arch.json" in exc.value.field
    from compress.model_io import load_portable

    with pytest.raises(InputError, match="not a model-zoo factory"):
        load_portable(out / "stages" / "02-finetune")

    recipe = write_yaml(tmp_path / "r.yaml", short_recipe())
    res = run_cli("analyze", "interpolate", str(out), str(out / "dense"), "--recipe", str(recipe),
                  "--out", str(tmp_path / "interp"), "--points", "2")
    one_line_error(res, 2, "arch.json", "--trust-code")
    res = run_cli("run", str(recipe), "--out", str(out), "--resume", "--quiet")
    one_line_error(res, 2, "arch.json", "os:system")
    assert not marker.exists()


def test_user_factories_load_when_allowed(tmp_path, monkeypatch):
    import torch

    from compress.errors import InputError
    from compress.model_io import load_portable, save_portable
    from compress.zoo import small_cnn

    pkg = tmp_path / "mymodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("from compress.zoo import small_cnn\n\ndef net(**kw):\n    return small_cnn(**kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    m = small_cnn(width=8).eval()
    save_portable(m, tmp_path / "ckpt", "mymodels.nets:net", {"width": 8}, [1, 8, 8])
    with pytest.raises(InputError, match="allow=\\['mymodels'\\]"):
        load_portable(tmp_path / "ckpt")
    assert "mymodels.nets" not in sys.modules  # refused before importing anything
    x = torch.randn(2, 1, 8, 8)
    for kw in ({"allow": ["mymodels"]}, {"allow": ["mymodels.nets:net"]}, {"trust_code": True}):
        assert torch.equal(load_portable(tmp_path / "ckpt", **kw)(x), m(x))
    with pytest.raises(InputError):
        load_portable(tmp_path / "ckpt", allow=["mymod"])  # a prefix is a whole module name


# ---------------------------------------------------------------------------------------------
# 6. Ctrl-C at any moment, including while torch is importing

def _interrupt(args: list[str], when) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "compress", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        when(proc)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _torch_loading(proc) -> None:
    """Wait until the process has mapped libtorch: it is in the middle of ``import torch``."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                return
        except OSError:
            pass
        time.sleep(0.005)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_ctrl_c_during_startup_exits_130_with_one_line(tmp_path):
    preloaded = subprocess.run([sys.executable, "-c", "import sys; print('torch' in sys.modules)"],
                               capture_output=True, text=True).stdout.strip() == "True"
    if preloaded:  # a site-packages .pth hook imports torch before any compress code can handle a signal
        pytest.skip("this interpreter imports torch while starting (a site .pth hook): Ctrl-C lands before compress")
    recipe = write_yaml(tmp_path / "r.yaml", short_recipe())
    args = ["run", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]
    cases = [_torch_loading] + [(lambda d: (lambda p: time.sleep(d)))(d) for d in (0.15, 0.4, 1.0, 2.5)]
    codes = []
    for when in cases:
        res = _interrupt(args, when)
        assert "Traceback" not in res.stderr, res.stderr
        codes.append(res.returncode)
        if res.returncode == 130:
            assert res.stderr.strip().splitlines()[-1] == "error: interrupted", res.stderr
        else:  # only a run that already ended (exit 0), or a signal before Python set up its handler
            assert res.returncode in (0, -signal.SIGINT), res.stderr
    assert codes[0] == 130 and codes.count(130) >= 3, codes
