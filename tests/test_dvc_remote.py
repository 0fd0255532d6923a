"""The demo DAG with the cache in a bucket (moto's S3 server on 127.0.0.1): dvc tracks a receipt.

`cache.path: s3://...` puts the cache in the bucket; stage 1 then writes the local receipt at
`cache.receipt` (dvc.yaml's `cache/teacher`): URL, manifest sha256, completed blocks. Real dvc must
rerun the students when the cache changed, and reuse the receipt (and the students) when it did not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from stores.receipt import RECEIPT_FORMAT
from tests.cache_fixtures import run_main
from tests.s3_server import s3_root, s3_server  # noqa: F401  (fixtures)
from tests.test_dvc_reuse import make_project, ran, set_param

pytest_plugins = ["tests.cache_fixtures"]
DVC = [sys.executable, "-m", "dvc"]


def run(cmd: list[str], cwd, env) -> str:
    """A command of the dvc project, its output; a loaded machine runs the whole demo DAG slowly."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def bucket_params(tiny_cache, url: str, receipt):
    from stages.config import ViewParams

    cache = replace(tiny_cache.cache, path=url, format="wds", views=[ViewParams(96, 128, False)],
                    targets=["fpn", "cls"], receipt=str(receipt))
    return replace(tiny_cache, cache=cache)


def test_cache_teacher_writes_a_deterministic_receipt_for_a_bucket(tiny_cache, tmp_path, s3_root):  # noqa: F811
    receipt = tmp_path / "cache" / "teacher"
    params = bucket_params(tiny_cache, s3_root, receipt)
    assert run_main(params, tmp_path) == ""
    first = receipt.read_bytes()
    data = json.loads(first)
    assert data["format"] == RECEIPT_FORMAT and data["url"] == s3_root
    assert data["blocks"]["wds"]["count"] == 2 and len(data["manifest_sha256"]) == 64
    assert run_main(params, tmp_path) == "" and receipt.read_bytes() == first, "a no-op rerun: the same receipt"

    other = bucket_params(tiny_cache, f"{s3_root}-other", receipt)  # another cache: another receipt
    assert run_main(other, tmp_path) == ""
    assert json.loads(receipt.read_text())["url"] == f"{s3_root}-other"


def test_a_receipt_path_holding_something_else_is_refused_before_teacher_work(tiny_cache, tmp_path, s3_root):  # noqa: F811
    from tests.s3_server import s3_fs

    folder = tmp_path / "cache" / "teacher"
    folder.mkdir(parents=True)  # a local cache left where the receipt goes
    msg = run_main(bucket_params(tiny_cache, s3_root, folder), tmp_path)
    assert str(folder) in msg and "is a folder" in msg and "cache.receipt" in msg and "\n" not in msg
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    msg = run_main(bucket_params(tiny_cache, s3_root, other), tmp_path)
    assert str(other) in msg and "not a kdcache receipt" in msg
    assert other.read_text() == '{"mine": 1}'
    assert not s3_fs().exists(f"{s3_root}/manifest.json"), "refused before anything was written"


@pytest.mark.slow  # the whole demo DAG three times over; the receipt itself: the two tests above
def test_dvc_dag_with_the_cache_in_a_bucket_reruns_exactly_what_changed(tmp_path, s3_root):  # noqa: F811
    work, env = make_project(tmp_path)
    set_param(work, "cache.path", s3_root)
    first = ran(run([*DVC, "repro"], work, env))
    assert {"cache_teacher", "inspect_cache", "train_student@baseline", "train_student@cskd"} <= first
    receipt = json.loads((work / "cache" / "teacher").read_text())
    assert receipt["url"] == s3_root and receipt["format"] == RECEIPT_FORMAT
    assert ran(run([*DVC, "repro"], work, env)) == set(), "nothing changed: nothing reruns"

    # stage 1 rerun on a complete cache: the same receipt, so no student reruns
    assert ran(run([*DVC, "repro", "-f", "-s", "cache_teacher"], work, env)) == {"cache_teacher"}
    assert ran(run([*DVC, "repro"], work, env)) == set()

    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline"], work, env)
    out = run([*DVC, "exp", "run", "-n", "cskd2", "-S", "experiments.cskd.losses.cskd=2.0"], work, env)
    students = {s for s in ran(out) if s.startswith("train_student@")}
    assert students == {"train_student@cskd"} and "cache_teacher" not in ran(out), (
        f"the experiment reuses the receipt and the cache: it ran {sorted(ran(out))}")

    set_param(work, "cache.path", f"{s3_root}-v2")  # another cache (another prefix): everything after it
    assert ran(run([*DVC, "repro"], work, env)) >= {"cache_teacher", "train_student@baseline", "train_student@cskd"}
    assert json.loads((work / "cache" / "teacher").read_text())["url"] == f"{s3_root}-v2"
