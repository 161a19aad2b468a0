"""Moved to :mod:`warmstart.checkpoints.streaming` (#12); this alias keeps branches written against the
old path importing until they are merged. Delete it when nothing imports ``warmstart._tensorio``."""

from .checkpoints.streaming import ST_DTYPES, TORCH_TO_ST, PreadReader, ShardWriter, numel, shard_layout

__all__ = ["ST_DTYPES", "TORCH_TO_ST", "PreadReader", "ShardWriter", "numel", "shard_layout"]
