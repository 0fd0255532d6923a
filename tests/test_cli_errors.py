"""One line, everywhere: every `python -m pipeline.*` entry point runs under pipeline.cli's error
boundary. Real subprocesses on real (damaged) files: exit status != 0, stderr is ONE line naming
the file / field, never a traceback; --debug / KDCACHE_DEBUG=1 give the traceback; Ctrl-C says
what was kept."""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import cli
from tests.cache_fixtures import VIEWS, copy_cache, subprocess_env, tiny_params, write_params

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache

ROOT = Path(__file__).resolve().parents[1]


def run_cli(module: str, params_file: Path | None, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"pipeline.{module}"]
    if params_file is not None:
        cmd += ["--params", str(params_file)]
    return subprocess.run(cmd + list(args), cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode != 0, f"exit 0; stderr: {err}"
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def run_in_process(module: str, params_file: Path, *args: str) -> str:
    """The same entry point and boundary in-process (cheaper than a subprocess on a loaded
    machine): the one-line message it exits with."""
    main = importlib.import_module(f"pipeline.{module}").main
    argv = ["--params", str(params_file), *args]
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: main(argv), argv=argv)
    text = str(stop.value.code)
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    return text


def _student(params, tmp_path: Path, **distill):
    return replace(params, distill=replace(params.distill, **distill),
                   student=replace(params.student, out_dir=str(tmp_path / "students")))


class EvilPickle:
    """Unpickling this would create a file: a checkpoint must never be able to run code."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malformed_coco_is_one_line_in_every_entry_point(tiny_cache, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [1, 2')
    params = replace(tiny_cache, data=replace(tiny_cache.data, train_ann=str(bad), val_ann=str(bad)),
                     cache=replace(tiny_cache.cache, path=str(tmp_path / "cache")))
    params = _student(params, tmp_path, teacher="online")
    path = write_params(params, tmp_path / "p.yaml")
    assert_one_line(run_cli("train_teacher", path), str(bad), "not valid JSON")
    for module, args in [("evaluate", ["--out", str(tmp_path / "m.json")]), ("train_student", []),
                         ("cache_teacher", [])]:
        assert str(bad) in run_in_process(module, path, *args)
    # the same error with KDCACHE_DEBUG=1 (or --debug): the full traceback, for a bug report
    proc = run_cli("evaluate", path, "--out", str(tmp_path / "m.json"), env={**subprocess_env(), cli.DEBUG_ENV: "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CocoDataError" in proc.stderr


def test_damaged_store_is_one_line(tiny_cache, tmp_path):
    params = _student(copy_cache(tiny_cache, tmp_path), tmp_path, losses={"mse": 1.0})
    (Path(params.cache.path) / "manifest.json").write_text("{ not json")
    path = write_params(params, tmp_path / "p.yaml")
    assert_one_line(run_cli("train_student", path), "manifest.json")
    assert "manifest.json" in run_in_process("inspect_cache", path, "--verify")


def test_pickle_as_checkpoint_is_one_line_and_never_runs(tiny_cache, tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "PWNED"
    evil.write_bytes(pickle.dumps({"model": EvilPickle(marker)}))
    params = replace(tiny_cache, teacher=replace(tiny_cache.teacher, checkpoint=str(evil)),
                     cache=replace(tiny_cache.cache, path=str(tmp_path / "cache")))
    path = write_params(params, tmp_path / "p.yaml")
    assert_one_line(run_cli("evaluate", path, "--out", str(tmp_path / "m.json")), str(evil))
    assert str(evil) in run_in_process("cache_teacher", path)
    assert not marker.exists(), "the pickle ran"


def test_crosskd_without_head_and_wds_on_zarr_only_are_one_line(tiny_cache, tmp_path):
    params = copy_cache(tiny_cache, tmp_path)
    cache = Path(params.cache.path)
    (cache / "static" / "head.npz").unlink()
    shutil.rmtree(cache / "wds")
    crosskd = write_params(_student(params, tmp_path, losses={"crosskd": 1.0}), tmp_path / "crosskd.yaml")
    assert_one_line(run_cli("train_student", crosskd), "head", str(cache))
    wds = write_params(_student(params, tmp_path, losses={"mse": 1.0}, source="wds"), tmp_path / "wds.yaml")
    assert "webdataset" in run_in_process("train_student", wds)
    assert not (tmp_path / "students" / "default" / "model.pt").exists()


def test_bad_params_are_one_line_naming_the_field(tiny_cache, tmp_path):
    path = write_params(replace(tiny_cache, cache=replace(tiny_cache.cache, path=str(tmp_path / "cache"))),
                        tmp_path / "p.yaml")
    assert_one_line(run_cli("train_student", path, "--set", "train.steps=-1"), "train.steps", ">= 1")
    assert "cache.views" in run_in_process("cache_teacher", path, "--set", "cache.views=[]")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "students").exists()


def test_ctrl_c_is_one_line_saying_what_was_kept(tiny_coco, tiny_teacher, tmp_path):
    # a cache of many small blocks of 8 views each, so the run is still computing when it is
    # interrupted (with 2 views the whole cache took ~1 s after the first block on a fast store path)
    view = type(VIEWS[0])
    views = [view(s, s * 3 // 2, f) for s in (96, 112, 128, 144) for f in (False, True)]
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path, block_size=1, format="zarr", views=views)
    path = write_params(params, tmp_path / "p.yaml")
    # the child gets Ctrl-C's default disposition: a test run launched in the background (`cmd &` in a
    # script) has SIGINT ignored, and an ignored SIGINT is inherited across exec
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cache_teacher", "--params", str(path)], cwd=ROOT,
                            env=subprocess_env(), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    done = Path(params.cache.path) / "zarr" / "done"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (done.exists() and any(done.iterdir())):
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "finished blocks" in last and "rerun" in last, last
    assert any(done.iterdir()), "the finished blocks are kept"


def test_ctrl_c_of_a_dask_run_in_a_terminal_prints_no_dask_noise(tiny_coco, tiny_teacher, tmp_path):
    """A terminal's Ctrl-C reaches every process of its group: the main process AND the dask
    worker processes. stderr holds the progress bar and the one 'interrupted' line, nothing from
    the cluster's shutdown (cancelled tasks, killed workers, tracebacks of interrupted workers)."""
    view = type(VIEWS[0])
    views = [view(s, s * 3 // 2, f) for s in (96, 112, 128, 144) for f in (False, True)]
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path, block_size=1, format="zarr", views=views)
    path = write_params(params, tmp_path / "p.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cache_teacher", "--params", str(path), "--workers", "2"],
                            cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True,  # its own process group, as a terminal's foreground job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    done = Path(params.cache.path) / "zarr" / "done"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not (done.exists() and any(done.iterdir())):
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, (proc.returncode, err)
    lines = [part.strip() for line in err.splitlines() for part in line.split("\r")]
    other = [line for line in lines if line and not line.startswith("cache blocks")]
    assert len(other) == 1 and other[0].startswith("interrupted: ") and "finished blocks" in other[0], err[-4000:]


@pytest.mark.parametrize("exc, needle", [
    (lambda: FileNotFoundError(2, "No such file or directory", "x/y.json"), "x/y.json"),
    (lambda: KeyError("image 7 is not in the plan"), "image 7 is not in the plan"),
    (lambda: RuntimeError("boom\nsecond line"), "internal error (RuntimeError: boom second line)"),
    (lambda: KeyError("padded_size"), "internal error (KeyError: padded_size)"),
])
def test_boundary_turns_each_exception_into_one_line(exc, needle, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def main():
        raise exc()

    with pytest.raises(SystemExit) as stop:
        cli.run(main, argv=[])
    text = str(stop.value.code)
    assert text.startswith("error: ") and "\n" not in text and needle in text, text
    with pytest.raises(type(exc())):
        cli.run(main, argv=["--debug"])


def test_an_entry_points_own_exit_message_stays_one_line(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def main():
        raise SystemExit("error: first\nsecond")

    with pytest.raises(SystemExit) as stop:
        cli.run(main, argv=[])
    assert stop.value.code == "error: first second"


def test_every_entry_point_uses_the_boundary():
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        text = path.read_text()
        if 'if __name__ == "__main__":' in text:
            tail = text.split('if __name__ == "__main__":', 1)[1]
            assert "run(main" in tail, f"{path.name} does not run under pipeline.cli.run"


if os.name != "posix":  # pragma: no cover
    pytest.skip("signals", allow_module_level=True)
