"""Shipped files hold no absolute path of a developer's machine (results, model cards, docs, code)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MACHINE_PATH = re.compile(r"(?<![\w.~$/-])/(work|home|Users|root|mnt)/[\w.-]+")


def shipped_files():
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the shipped file list is unknown")
    return [REPO / name for name in listed.splitlines()]


def test_no_absolute_machine_paths_in_shipped_files():
    found = []
    for path in shipped_files():
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096]:  # binary: weights, bags, figures
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not found, "absolute machine paths in shipped files:\n" + "\n".join(found)


def test_shipped_documents_are_bounded_and_repeat_no_paragraph():
    """An editing slip that pastes a section many times (or truncates the rest) shows here, not only in review."""
    problems = []
    for path in shipped_files():
        if path.suffix != ".md" or not path.is_file():
            continue
        name = path.relative_to(REPO)
        if path.stat().st_size > 300_000:
            problems.append(f"{name}: {path.stat().st_size} bytes")
            continue
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
        seen = set()
        for paragraph in paragraphs:
            if len(paragraph) >= 200 and paragraph in seen:
                problems.append(f"{name}: repeated paragraph {paragraph[:80]!r}")
            seen.add(paragraph)
    assert not problems, "\n".join(problems)
