"""What the plots say: seed labels that never overlap, titles wrapped rather than cut."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from amptrain.compare.plot import label_seeds  # noqa: E402
from amptrain.runs.plotting import pyplot, wrapped  # noqa: E402


def test_seed_labels_are_pushed_apart_and_point_at_their_seed():
    fig, ax = pyplot().subplots()
    points = [(0, 5.500), (1, 5.5004), (2, 5.5008), (3, 5.40), (4, 5.60)]  # three nearly equal
    ax.plot([1] * len(points), [v for _, v in points], "o")
    label_seeds(ax, points)
    low, high = ax.get_ylim()
    labels = sorted(ax.texts, key=lambda t: t.xyann[1])
    ys = [t.xyann[1] for t in labels]
    assert all(b - a >= 0.05 * (high - low) for a, b in zip(ys, ys[1:])), ys
    for text in labels:  # each label's leader line starts at its own seed's point
        seed = int(text.get_text().split()[1])
        assert text.xy == (1, dict(points)[seed])
    pyplot().close(fig)


def test_long_titles_are_wrapped_not_cut():
    verdict = "no significant difference in validation loss between " + "x" * 40 + " and y " * 30
    lines = wrapped(verdict, 120).splitlines()
    assert len(lines) > 1 and all(len(line) <= 120 for line in lines)
    assert " ".join(lines).split() == verdict.split()  # every word kept
