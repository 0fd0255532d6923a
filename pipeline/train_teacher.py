"""Train the teacher detector (params `teacher.model`, `teacher.train`) on `data.train_*`.

Writes `teacher.checkpoint` (architecture + weights + params + step). Rerunning resumes from
`<checkpoint folder>/last.pt`; a finished run is not repeated.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.params import make_parser, params_from_args
from stages.config import to_dict
from stages.detector_training import train_detector


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("train_teacher", __doc__)
    args = parser.parse_args(argv)
    params = params_from_args(args)
    t = params.teacher
    path = train_detector(t.model, t.train, params.data, Path(t.checkpoint), to_dict(params))
    print(f"teacher checkpoint: {path}")


if __name__ == "__main__":
    main()
