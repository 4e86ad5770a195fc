"""The frame every source produces and the pts sampler (defined in ``model.video``, shared with training)."""

from model.video import FpsSampler, Frame

__all__ = ["FpsSampler", "Frame"]
