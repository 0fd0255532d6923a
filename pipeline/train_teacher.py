"""Train the teacher detector (params `teacher.model`, `teacher.train`) on `data.train_*`.

Writes `teacher.checkpoint` (architecture + weights + params + step). Rerunning resumes from
`<checkpoint folder>/last.pt`; a finished run is not repeated. Under
`torchrun --nproc_per_node N -m pipeline.train_teacher` it trains one DistributedDataParallel model
(`teacher.train.batch_size` per process); rank 0 writes the checkpoints. The checkpoint folder's
run.json records the params and the training set's digest (a rerun after a relabel is refused);
run.lease keeps a second run out of it while one trains (stages.run_lease).

CPU threads: `teacher.train.threads` (0 = the CPUs this process may use / local processes, or
OMP_NUM_THREADS when set); the count used is printed first.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.params import make_parser, params_from_args
from stages import distributed
from stages.config import to_dict
from stages.detector_training import train_detector
from stages.devices import apply_threads, resolve_device
from stages.run_lease import run_lease
from stages.run_record import check_kind, check_out_folder


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("train_teacher", __doc__)
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain from scratch when the checkpoint folder holds a teacher run of other params or "
                        "data (never a student's run)")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    t = params.teacher
    resolve_device(t.train.device, "teacher.train.device")  # this machine has it: before any work
    threads = apply_threads(t.train.threads, "teacher.train.threads")
    distributed.init_from_env(t.train.dist_timeout_s)
    main_rank = distributed.is_main()
    if main_rank:
        print(threads, flush=True)
    folder = Path(t.checkpoint).parent
    try:
        check_out_folder(folder, params.data, params.cache.path, "teacher.checkpoint's folder")
        check_kind(folder, "teacher", overwrite=args.overwrite)  # a student's folder: refused before any work
        with run_lease(folder, "teacher", enabled=main_rank):  # one writer per run folder (stages.run_lease)
            path = train_detector(t.model, t.train, params.data, Path(t.checkpoint), to_dict(params),
                                  overwrite=args.overwrite)
    finally:
        distributed.shutdown()
    if main_rank:
        print(f"teacher checkpoint: {path}")


if __name__ == "__main__":
    from pipeline.cli import run

    run(main, interrupted="the last checkpoint (last.pt next to teacher.checkpoint, every teacher.train.ckpt_every steps) is kept; rerun the same command to resume")
