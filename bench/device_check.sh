#!/usr/bin/env bash
# The GPU checks of this project as one short run on a GPU machine without network access.
# Here (once): make device-wheels          (.whl/: the packages that machine lacks, for its Python 3.12)
# There:       device tool `run`, carry [".whl"], command "bash bench/device_check.sh", timeout_s ~540
#   1. the CUDA-only tests: device decode equals the numpy reference (tests/test_device_codecs.py,
#      test_feature_codecs.py), the cache basis on CUDA (test_cache_basis.py), and the offline step on
#      CUDA (tests/test_cuda_training.py: equal to the CPU step in fp32 and within 5 % under bf16
#      autocast, amp training steps and a weights_only checkpoint, pinned and exact copies);
#   2. python -m bench.realscale --device cuda on the COCO shape at 800x1344 (runs/ does not travel,
#      so only the checkpoint-free row): realscale-cuda.json + SUMMARY.md.
# Everything lands in $OUT (the device tool brings it back): gpu.txt, cuda_tests.log, realscale.log and
# the JSON; copy realscale-cuda.json into bench/results/ and commit it.
set -uo pipefail
OUT=${OUT:-/tmp/kdcache-device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "device_check: installing .whl/ failed (run 'make device-wheels' here and carry .whl)"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
  torchvision.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/gpu.txt"
python3 -m pytest -rs -k cuda tests/test_cuda_training.py tests/test_device_codecs.py tests/test_feature_codecs.py \
  tests/test_cache_basis.py 2>&1 | tee "$OUT/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout "${REALSCALE_S:-420}" python3 -m bench.realscale --device cuda --teachers coco --images 2 --student-steps 12 \
  --rounds 3 --step-rounds 3 --out "$OUT" 2>&1 | tee "$OUT/realscale.log"
bench_rc=${PIPESTATUS[0]}
echo "device_check: cuda tests rc=$tests_rc, realscale rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
