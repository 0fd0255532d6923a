"""Train the teacher detector (params `teacher.model`, `teacher.train`) on `data.train_*`.

Writes `teacher.checkpoint` (architecture + weights + params + step). Rerunning resumes from
`<checkpoint folder>/last.pt`; a finished run is not repeated. Under
`torchrun --nproc_per_node N -m pipeline.train_teacher` it trains one DistributedDataParallel model
(`teacher.train.batch_size` per process); rank 0 writes the checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.params import make_parser, params_from_args
from stages import distributed
from stages.config import to_dict
from stages.detector_training import train_detector


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("train_teacher", __doc__)
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain from scratch when the checkpoint folder holds a run of other params")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    t = params.teacher
    distributed.init_from_env(t.train.dist_timeout_s)
    main_rank = distributed.is_main()
    try:
        path = train_detector(t.model, t.train, params.data, Path(t.checkpoint), to_dict(params), overwrite=args.overwrite)
    finally:
        distributed.shutdown()
    if main_rank:
        print(f"teacher checkpoint: {path}")


if __name__ == "__main__":
    from pipeline.cli import run

    run(main, interrupted="the last checkpoint (last.pt next to teacher.checkpoint, every teacher.train.ckpt_every steps) is kept; rerun the same command to resume")
