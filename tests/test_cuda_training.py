"""Stage 2 on a CUDA device: the offline step with device decode, bf16 autocast and pinned copies.

Skipped without CUDA (CI has none); `bench/device_check.sh` runs these on the GPU machine. The CPU
suite checks the same step bit for bit against the live teacher (tests/test_distill.py); here the
CUDA step must agree with the CPU step of the same weights and records, in fp32 and under autocast.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from stages.cache.run import run_cache
from stages.config import Params
from stages.detector_training import train_detector
from stages.distill.device_decode import to_device
from stages.distill.run import build_run
from stages.training import load_checkpoint, train_loop
from stores.compact import CompactArray
from tests.cache_fixtures import tiny_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/device_check.sh)")
LOSSES = {"mse": 1.0, "cosine": 1.0, "cskd": 1.0, "ssim": 2.0, "crosskd": 1.0, "rm": 4.0, "pfi": 1.5}


@pytest.fixture(scope="module")
def cached(tiny_coco, tmp_path_factory) -> Params:
    """A tiny teacher trained two steps and a cache of it with the default (lossy, device-decoded) codecs."""
    root = tmp_path_factory.mktemp("cuda")
    checkpoint = root / "teacher" / "model.pt"
    params = tiny_params(tiny_coco, checkpoint, root)
    train_detector(params.teacher.model, params.teacher.train, params.data, checkpoint, {}, progress=False)
    run_cache(params, progress=False)
    return replace(params, distill=replace(params.distill, teacher="offline", losses=dict(LOSSES)))


def on(params: Params, device: str, amp: bool = False) -> Params:
    return replace(params, train=replace(params.train, device=device, amp=amp))


@pytest.fixture
def no_tf32():
    """cuDNN convolutions default to TF32 (10-bit mantissa): the fp32 comparison needs true fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cuda_offline_step_matches_the_cpu_step_in_fp32_and_under_bf16_autocast(cached, no_tf32):
    cpu, gpu = build_run(on(cached, "cpu"), None), build_run(on(cached, "cuda"), None)
    gpu.student.load_state_dict(cpu.student.state_dict())
    gpu.kd.load_state_dict(cpu.kd.state_dict())
    b_cpu, b_gpu = next(cpu.make_batches(0)), next(gpu.make_batches(0))
    assert b_cpu["image_ids"] == b_gpu["image_ids"]
    l_cpu = cpu.step_loss(b_cpu)
    l_gpu = gpu.step_loss(b_gpu)  # records decoded on the GPU (the CPU run decodes them with torch on the CPU)
    assert {n.split("/")[0] for n in l_gpu} >= set(LOSSES)
    for name in l_cpu:
        torch.testing.assert_close(l_gpu[name].float().cpu(), l_cpu[name].float(), rtol=2e-3, atol=1e-4, msg=name)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        l_amp = gpu.step_loss(b_gpu)
    for name in l_cpu:
        value, ref = float(l_amp[name].float()), float(l_cpu[name])
        assert np.isfinite(value), name
        assert abs(value - ref) <= 0.05 * abs(ref) + 1e-3, f"{name}: bf16 {value} vs fp32 {ref}"


def test_cuda_training_with_amp_takes_finite_steps_and_saves_a_loadable_checkpoint(cached, tmp_path):
    params = on(cached, "cuda", amp=True)
    run = build_run(params, None)
    before = {k: v.detach().clone() for k, v in run.student.state_dict().items()}
    metrics = train_loop(modules={"model": run.student, "kd": run.kd}, step_loss=run.step_loss,
                         make_batches=run.make_batches, cfg=params.train, out_dir=tmp_path, checkpoint_meta={},
                         device=run.device, progress=False)
    assert all(np.isfinite(v) for v in metrics.values())
    state = load_checkpoint(tmp_path / "last.pt")  # weights_only
    assert state["step"] == params.train.steps
    moved = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.equal(v.cpu(), before[k].cpu())]
    assert moved, "the amp steps changed no weight"


def test_cuda_copies_are_pinned_and_exact():
    dev = torch.device("cuda")
    parts = {"q": torch.arange(-100, 100, dtype=torch.int8), "scale": torch.rand(3)}
    pinned = CompactArray("int8c", (200,), "float32", parts).pin_memory()
    assert all(p.is_pinned() for p in pinned.parts.values())
    readonly = np.frombuffer(np.arange(10, dtype=np.float32).tobytes(), np.float32)  # as unpack hands parts on
    out = to_device(readonly, dev)
    torch.cuda.synchronize()
    assert out.device.type == "cuda" and torch.equal(out.cpu(), torch.arange(10, dtype=torch.float32))
