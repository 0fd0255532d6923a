"""Params files that cannot blow up or mislead: alias bombs, duplicated keys, YAML 1.2 exponent
floats, device spellings and devices this machine lacks, and the torch thread-count knob.

The loader is exercised in-process (cheap, and timed), then once through the real CLI, whose
stderr must be one line naming the file / field."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.params import MAX_EXPANDED_NODES, load_params
from stages.config import ConfigError
from stages.devices import apply_threads, auto_threads, resolve_device

ROOT = Path(__file__).resolve().parents[1]

# the classic "billion laughs": 9 levels of 10 aliases each = 10^9 leaves once expanded; the file is
# 600 bytes. It sits in an experiment nothing uses, where the hostile pass put it.
BOMB = "experiments:\n  unused:\n    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    {b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


def cli(module: str, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, (proc.returncode, err)
    assert err.startswith("error: ") and all(n in err for n in needles), (needles, err)
    return err


def test_alias_bomb_is_refused_in_milliseconds_naming_the_file(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_params(bomb)
    assert time.perf_counter() - start < 5.0
    msg = str(info.value)
    assert msg.startswith(f"{bomb}: ") and "alias" in msg and "experiments.unused." in msg, msg
    # the same bomb as a --set value, in YAML's flow style
    flow = "{" + ", ".join(line.strip() for line in BOMB.splitlines()[2:]) + "}"
    with pytest.raises(ConfigError, match=r"^--set experiments.x=.*alias"):
        load_params(ROOT / "params.yaml", ["experiments.x=" + flow])


def test_anchors_within_the_bound_still_load(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train: &t {steps: 7, lr: 0.5}\nteacher:\n  train: *t\n"
                 "experiments:\n  a: &e {losses: {mse: 1.0}}\n  b: *e\n")
    p = load_params(f)
    assert p.teacher.train.steps == 7 and p.train.lr == 0.5 and p.experiments["b"] == {"losses": {"mse": 1.0}}
    assert MAX_EXPANDED_NODES >= 10_000  # far above any real params file


@pytest.mark.parametrize("text, key, line", [
    ("train:\n  steps: 7\ncache:\n  path: c\ntrain:\n  lr: 0.5\n", "'train'", 5),
    ("train:\n  steps: 7\n  lr: 0.1\n  steps: 9\n", "'train.steps'", 4),
    ("experiments:\n  a: {losses: {mse: 1, mse: 2}}\n", "'experiments.a.losses.mse'", 2),
])
def test_a_key_given_twice_is_refused_naming_it(tmp_path, text, key, line):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}: line {line}: key {key} is given twice"), msg


def test_exponent_floats_are_numbers(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  weight_decay: 5E-5\ndistill:\n  losses: {cskd: 2e0}\n")
    p = load_params(f, ["train.lr=1e-3", "teacher.train.lr=+3.5e-4", "distill.ssim.sigma=15e-1"])
    assert (p.train.lr, p.teacher.train.lr, p.train.weight_decay) == (0.001, 0.00035, 5e-05)
    assert p.distill.losses == {"cskd": 2.0} and p.distill.ssim.sigma == 1.5
    with pytest.raises(ConfigError, match="train.steps: expected an integer, got 1000.0"):
        load_params(f, ["train.steps=1e3"])  # an exponent is a float: integer fields still want integers
    assert load_params(f, ["cache.path=e5"]).cache.path == "e5"  # not a number: stays a string


@pytest.mark.parametrize("override, field", [
    ("train.device=banana", "train.device"), ("teacher.train.device=gpu", "teacher.train.device"),
    ("cache.device=cuda:x", "cache.device"),
])
def test_device_spelling_is_checked_when_params_load(tmp_path, override, field):
    f = tmp_path / "p.yaml"
    f.write_text("{}\n")
    with pytest.raises(ConfigError, match=rf"^{f}: {field}: must be auto, cpu, cuda, cuda:N or mps"):
        load_params(f, [override])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_names_the_field():
    for spec in ("cuda", "cuda:7"):
        with pytest.raises(ConfigError, match=rf"^teacher.train.device: '{spec}', but torch sees no CUDA device"):
            resolve_device(spec, "teacher.train.device")
    assert resolve_device("auto").type == "cpu" and resolve_device("cpu").type == "cpu"


def test_thread_counts(monkeypatch):
    old = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert auto_threads() == (1, "OMP_NUM_THREADS=1")
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
        assert auto_threads()[0] == 1  # never 0
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert auto_threads()[0] == len(os.sched_getaffinity(0))
        assert apply_threads(1, "train.threads") == "torch CPU threads: 1 (train.threads=1)"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def test_hostile_params_through_the_cli(tmp_path):
    """One line each, naming the file or field, before any work: the bomb (a duplicated key takes
    the same path: a ConfigError from the loader), a device this machine lacks."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    one_line(cli("train_student", "--params", str(bomb)), str(bomb), "alias")
    if not torch.cuda.is_available():
        out = tmp_path / "m.json"
        one_line(cli("evaluate", "--set", "train.device=cuda:7", "--out", str(out)), "train.device", "'cuda:7'")
        assert not out.exists()
