"""Appearance (ResNet-101) and motion (3D ResNeXt-101) feature extraction of every video
(the modules are described in docs/architecture.md)."""

from vqakd.extraction.extractor import PROCESS_GROUP_TIMEOUT, make_extractor
from vqakd.extraction.merge import merge_into_output
from vqakd.extraction.networks import KINETICS_MEAN, NETWORKS, NORMALIZATIONS
from vqakd.extraction.settings import (DEFAULT_CHUNK_VIDEOS, DEFAULT_FRAMES_PER_CLIP, DEFAULT_NUM_CLIPS,
                                       DEFAULT_RANDOM_SEED, ExtractionSettings, Shard)

__all__ = [
    "DEFAULT_CHUNK_VIDEOS", "DEFAULT_FRAMES_PER_CLIP", "DEFAULT_NUM_CLIPS", "DEFAULT_RANDOM_SEED",
    "KINETICS_MEAN", "NETWORKS", "NORMALIZATIONS", "PROCESS_GROUP_TIMEOUT", "ExtractionSettings", "Shard",
    "make_extractor", "merge_into_output",
]
