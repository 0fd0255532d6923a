"""Stage 2: train a student against the cached teacher targets (or a live teacher).

`--experiment NAME` picks an entry of `experiments` in params.yaml (its keys override the
`distill` section: losses {name: weight}, teacher offline|online, source zarr|wds); without it
the `distill` section is used as is. Loss names: mse, cosine, cskd, ssim, crosskd, rm, pfi; no
losses = the no-KD baseline. Writes <student.out_dir>/<NAME>/: model.pt, last.pt (resume),
train_log.csv (per-step losses, for dvc plots) and metrics.json (COCO AP on data.val_*).

Offline runs never run the teacher: they read `cache.path` and refuse a cache whose manifest
does not match these params (teacher, dataset, views, targets, codecs).
Several processes: `torchrun --nproc_per_node N -m pipeline.train_student ...` (nccl on GPUs,
gloo on CPU) trains one DistributedDataParallel model; `train.batch_size` is per process, so the
global batch is N x train.batch_size. Rank 0 alone writes checkpoints, the log and metrics.json.
The run folder: <out>/run.json records the params and the content consumed (teacher sha256, cache
fingerprint, training-set digest); a rerun with other params or content is refused, naming what
differs. One run at a time per folder: <out>/run.lease (stages.run_lease) refuses a second one.
CPU threads: `train.threads` (0 = the CPUs this process may use / local processes, or
OMP_NUM_THREADS when set); the count used is printed first.
See README "More than one machine".
"""

from __future__ import annotations

from pathlib import Path

from pipeline.params import make_parser, params_from_args
from stages import distributed
from stages.cache.plan import resolve_train_teacher
from stages.devices import apply_threads
from stages.distill.run import train_student


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("train_student", __doc__)
    parser.add_argument("--experiment", default="", help="name of an entry in params.yaml `experiments`")
    parser.add_argument("--out", help="output folder (default: <student.out_dir>/<experiment or 'default'>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain from scratch when the output folder holds a student run of other params or "
                        "content (never a teacher's run, never results without a run.json)")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    out = Path(args.out or Path(params.student.out_dir) / (args.experiment or "default"))
    threads = apply_threads(params.train.threads)
    distributed.init_from_env(params.train.dist_timeout_s)
    if distributed.is_main():
        print(threads, flush=True)
    try:
        resolved = resolve_train_teacher(params)  # read once; the cache check / the online teacher use it
        metrics = train_student(params, args.experiment or None, out, overwrite=args.overwrite, resolved=resolved)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        distributed.shutdown()
    if not metrics:  # torchrun ranks > 0: rank 0 reports
        return
    print(f"{args.experiment or 'default'}: AP={metrics['AP']:.2f} AP50={metrics['AP50']:.2f} -> {out}/metrics.json")


if __name__ == "__main__":
    from pipeline.cli import run

    run(main, interrupted="the last checkpoint (last.pt in the run folder, every train.ckpt_every steps) is kept; rerun the same command to resume")
