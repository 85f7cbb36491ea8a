"""Appearance (ResNet-101) and motion (3D ResNeXt-101) feature extraction of every video.

One file per job:
  settings.py   what an extraction is: settings, shards, result, the identity of its numbers
  networks.py   the two networks: architecture, input normalisation, output shape
  resnext3d.py  the 3D ResNeXt-101 architecture (Hara et al.)
  weights.py    finding, identifying, reading and strictly loading weights files
  decoding.py   videos decoded into network inputs by worker processes
  extractor.py  the loop: decode, batch, run the network, save chunks, contain failures
  parts.py      the parts folder of a run in progress (chunks, settings, video list)
  plan.py       which chunks a run makes under torchrun and --num-shards
  merge.py      checking parts folders and writing the output HDF5 and failure report
"""

from vqakd.extraction.extractor import PROCESS_GROUP_TIMEOUT, FeatureExtractor, make_extractor
from vqakd.extraction.merge import merge_into_output, merge_parts
from vqakd.extraction.networks import (IMAGENET_MEAN, KINETICS_MEAN, NETWORKS, NORMALIZATIONS, FeatureNetwork,
                                       ResNet101Features, ResNeXt101Features)
from vqakd.extraction.parts import chunk_name, chunk_partition
from vqakd.extraction.settings import (DEFAULT_CHUNK_VIDEOS, DEFAULT_FRAMES_PER_CLIP, DEFAULT_NUM_CLIPS,
                                       DEFAULT_RANDOM_SEED, FEATURE_DIM, PRECISIONS, ExtractionResult,
                                       ExtractionSettings, Shard, identity_digest)

__all__ = [
    "DEFAULT_CHUNK_VIDEOS", "DEFAULT_FRAMES_PER_CLIP", "DEFAULT_NUM_CLIPS", "DEFAULT_RANDOM_SEED",
    "FEATURE_DIM", "IMAGENET_MEAN", "KINETICS_MEAN", "NETWORKS", "NORMALIZATIONS", "PRECISIONS",
    "PROCESS_GROUP_TIMEOUT", "ExtractionResult", "ExtractionSettings", "FeatureExtractor", "FeatureNetwork",
    "ResNet101Features", "ResNeXt101Features", "Shard", "chunk_name", "chunk_partition", "identity_digest",
    "make_extractor", "merge_into_output", "merge_parts",
]
