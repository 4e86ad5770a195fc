"""The training dataset and its collator.

Samples that cannot be parsed are counted when the dataset is built; samples that fail later
(a missing or corrupt file, too long) are rendered as ``None`` in the worker and dropped by the
collator, which reports how many it dropped with the batch (so counts survive worker processes).
With ``train.skip_bad_samples: false`` the first bad sample stops training with its file and line.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from model.config import SessionConfig
from model.frames import FACTOR
from training.config import TrainConfig

from .render import IGNORE, Rendered, SampleRenderer
from .samples import Sample, SampleError, read_samples

log = logging.getLogger(__name__)


class StreamDataset(Dataset):
    """Training samples rendered to token ids, visual inputs and labels (bad ones skipped and counted)."""

    def __init__(self, processor, session: SessionConfig, train: TrainConfig, files: list[str] | None = None):
        self.renderer = SampleRenderer(processor, session, train)
        self.skip = train.skip_bad_samples
        self.seed = train.seed
        self.samples: list[Sample] = []
        self.parse_errors: list[str] = []
        for path in files if files is not None else train.data:
            for item in read_samples(path):
                if isinstance(item, SampleError):
                    if not self.skip:
                        raise item
                    log.warning("skipping %s", item)
                    self.parse_errors.append(str(item))
                else:
                    self.samples.append(item)
        if not self.samples:
            raise ValueError(f"no usable samples in {files if files is not None else train.data} "
                             f"({len(self.parse_errors)} bad)")

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self, bucket: int = 32) -> list[int]:
        """Each sample's length in tokens, estimated without rendering it (for ``train.group_by_length``):
        its text at about four characters a token, plus its frames' visual tokens where their number is
        known from the sample (its images; a clip's start and end times at ``train.fps``), rounded up to
        ``bucket`` tokens: samples that differ by a word (one question and another) stay mixed in a batch."""
        per_frame = self.renderer.session.frame_pixels // (FACTOR * FACTOR)
        fps, most = self.renderer.train.fps, self.renderer.train.max_frames
        out = []
        for s in self.samples:
            frames = len(s.images)
            if s.video is not None and s.end is not None:
                frames += min(most, max(1, int((s.end - s.start) * fps)))
            tokens = sum(len(m.content) for m in s.messages) // 4 + frames * per_frame
            out.append(-(-tokens // bucket) * bucket)
        return out

    def __getitem__(self, i: int) -> Rendered | SampleError:
        try:
            return self.renderer.render(self.samples[i], seed=self.seed * 1_000_003 + i)
        except SampleError as exc:
            if not self.skip:
                raise
            log.warning("skipping %s", exc)
            return exc


class Collator:
    """Pads a batch of rendered samples and joins their visual inputs."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[Rendered | SampleError]) -> dict:
        good = [x for x in items if isinstance(x, Rendered)]
        batch: dict = {"skipped": torch.tensor(len(items) - len(good))}
        if not good:
            return batch
        width = max(len(x.input_ids) for x in good)
        ids = torch.full((len(good), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(good), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(good), width), dtype=torch.long)
        for row, x in enumerate(good):
            n = len(x.input_ids)
            ids[row, :n] = torch.tensor(x.input_ids)
            labels[row, :n] = torch.tensor(x.labels)
            mask[row, :n] = 1
        batch.update(input_ids=ids, labels=labels, attention_mask=mask,
                     tokens_kept=torch.tensor(sum(x.tokens_kept for x in good)),
                     tokens_total=torch.tensor(sum(x.tokens_total for x in good)))
        frames = [(pv, g, k) for x in good for pv, g, k in zip(x.pixel_values, x.grids, x.keeps)]
        if frames:
            batch.update(pixel_values=torch.cat([pv for pv, _, _ in frames]),
                         grid_thw=torch.tensor([g for _, g, _ in frames]),
                         keep=torch.cat([k for _, _, k in frames]))
        return batch
