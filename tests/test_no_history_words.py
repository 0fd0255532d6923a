"""Names, not history: no tracked file speaks of work sessions, issue numbers or "before-sNN" codec sets.

A reader of the code, the docs or a benchmark key cannot know what a numbered work session, a codec
set named after one, or an issue number's defaults were; what a thing IS belongs in its name (a
schema version, a named codec set, a plain description), and what changed when belongs in
CHANGELOG.md, the one file exempt. The examples each pattern catches are the parametrized cases below.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXEMPT = {"CHANGELOG.md", "tests/test_no_history_words.py"}

# each pattern names one way history leaks into a name (case-insensitive)
HISTORY = re.compile(
    r"\bsessions?[-_ ]?\d+"  # a numbered work session, with or without a separator, or a range of them
    r"|\b(?:this|that|last|next|previous|earlier|later|each|every)\s+sessions?\b"  # "this session's study"
    r"|\bsessions?\s+(?:ago|before|after|lent|whose\s+task)\b|\bproject'?s\s+sessions\b"
    r"|issue[-_ ]?#?\d+"  # an issue number, also inside a name or a constant
    r"|\b(?:before|pre|after|until|since)[-_]s\d+\b"  # a codec set named for the session it preceded
    r"|\bs\d{2}\b"  # a bare two-digit session tag
    r"|\buntil now\b|\bnew defaults?\b|\bold defaults?\b|\bprevious defaults?\b|\bdefaults? until\b",
    re.IGNORECASE,
)
# pytest's own vocabulary: a fixture's scope is the test session, not a work session
PYTEST_SESSION = re.compile(r"scope=[\"']session[\"']|\bsession-scoped\b|\btest session\b", re.IGNORECASE)


def history_words(line: str) -> list[str]:
    """The history words of one line, pytest's session scope left out."""
    return [m.group(0) for m in HISTORY.finditer(PYTEST_SESSION.sub("", line))]


@pytest.mark.parametrize("line, found", [
    ("the defaults until session 19", ["defaults until", "session 19"]),
    ("the defaults before this session's study", ["this session"]),
    ("lent to this project's sessions yet", ["project's sessions"]),
    ("with the session-20 defaults", ["session-20"]),
    ("for a session lent a GPU machine", ["session lent"]),
    ('"before-s19": {"fpn": "pca64s0.25+pco"}', ["before-s19"]),
    ("# issue 9 defaults (bench/codec_sets)", ["issue 9"]),
    ('"codec_set": "pre-issue-9"', ["issue-9"]),
    ("_PRE_ISSUE9_TRAIN_JSON = ...", ["ISSUE9"]),
    ("the codecs of s20", ["s20"]),
    ('@pytest.fixture(scope="session")', []),
    ("Session-scoped pytest fixtures, generated once per test session", []),
    ('session = ort.InferenceSession(str(path)); session.run(["boxes"])', []),
    ("Session fixture for the export tests", []),
    ("cpca64s0.25+lz4, topk24f0.015, sha256 2230eed8, float16, ClientSession", []),
])
def test_history_pattern(line, found):
    assert history_words(line) == found


def test_no_history_words_in_tracked_files():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    hits = []
    for name in files.decode().split("\0"):
        path = REPO / name
        if not name or name in EXEMPT or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # binary files (images, archives) carry no prose
            continue
        for n, line in enumerate(text.splitlines(), 1):
            words = history_words(line)
            if words:
                hits.append(f"{name}:{n}: {', '.join(words)}: {line.strip()[:100]}")
    assert not hits, (f"{len(hits)} lines speak of history instead of naming what a thing is "
                      "(say what it is; history goes to CHANGELOG.md):\n" + "\n".join(hits))
