"""``vl3live data check FILE...``: every problem of a dataset, per line, before a run finds it."""

from __future__ import annotations

from model.config import Config

from .render import SampleRenderer
from .samples import SampleError, read_samples


def check_dataset(files: list[str], config: Config, processor) -> tuple[int, list[str]]:
    """(good samples, error lines): parse, files, decodable video, times, turns, length."""
    renderer = SampleRenderer(processor, config.session, config.train)
    good, errors = 0, []
    for path in files:
        for item in read_samples(path):
            if isinstance(item, SampleError):
                errors.append(str(item))
                continue
            try:
                renderer.render(item)
                good += 1
            except SampleError as exc:
                errors.append(str(exc))
    return good, errors
