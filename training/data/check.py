"""``vl3live data check FILE...``: every problem of a dataset, per line, before a run finds it."""

from __future__ import annotations

from collections import Counter

from model.config import SessionConfig
from training.config import TrainConfig

from .render import SampleRenderer
from .samples import SampleError, read_samples


def check_dataset(files: list[str], session: SessionConfig, train: TrainConfig, processor) -> tuple[Counter, list[str]]:
    """(good samples by token layout, error lines): parse, files, decodable video, times, turns, length."""
    renderer = SampleRenderer(processor, session, train)
    good: Counter = Counter()
    errors = []
    for path in files:
        for item in read_samples(path):
            if isinstance(item, SampleError):
                errors.append(str(item))
                continue
            try:
                renderer.render(item)
                good[renderer.layout_of(item)] += 1
            except SampleError as exc:
                errors.append(str(exc))
    return good, errors
