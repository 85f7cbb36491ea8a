"""The two feature networks: architecture, weights, input normalisation (here and only here) and the
shape of one video's features: ResNet-101 (ImageNet) gives (N clips, F frames, 2048) per video, the
3D ResNeXt-101 of Hara et al. (Kinetics) (N clips, 2048).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from vqakd.core.errors import UserError
from vqakd.data.features import APPEARANCE_DATASET, MOTION_DATASET
from vqakd.extraction.resnext3d import resnext101
from vqakd.extraction.settings import FEATURE_DIM, PRECISIONS, ExtractionSettings
from vqakd.extraction.video import check_frames_per_clip
from vqakd.extraction.weights import WeightsIdentity, load_weights

# ResNet-101: (RGB / 255 - mean) / std. "original" is the original work's constants (its third std
# is 0.224), "torchvision" the ones the ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
NORMALIZATIONS = {"original": (IMAGENET_MEAN, (0.229, 0.224, 0.224)),
                  "torchvision": (IMAGENET_MEAN, (0.229, 0.224, 0.225))}
# 3D ResNeXt-101: raw 0-255 RGB, as the original work fed it; optionally minus the mean RGB that
# Hara et al. trained the Kinetics models with (their `get_mean(1, "activitynet")`).
KINETICS_MEAN = (114.7748, 107.7354, 99.4750)


class FeatureNetwork:
    """One feature model: its description (class attributes), `architecture()` (the torch module
    with its classifier `fc`), `normalisation()` (how inputs are normalised, in words, stored with
    the features), `prepare` (uint8 inputs on the run's device → the network's float input) and
    `shape_for` (the feature array of one video); `instantiate` builds the network of a run."""

    model_name: ClassVar[str]
    kind: ClassVar[str]                  # the features it makes: "appearance" or "motion"
    feature_dataset: ClassVar[str]       # the HDF5 dataset name of the output
    default_image_size: ClassVar[tuple[int, int]]
    default_batch_size: ClassVar[int]
    per_frame: ClassVar[bool]            # inputs are single frames (True) or whole clips (False)
    weight_files: ClassVar[tuple[str, ...]]
    how_to_get_weights: ClassVar[str]
    weights_what: ClassVar[str]
    memory_format: ClassVar[torch.memory_format] = torch.contiguous_format

    def __init__(self, settings: ExtractionSettings, device: torch.device):
        self.settings = settings
        self.device = device

    def instantiate(self, weights: WeightsIdentity) -> nn.Module:
        """The network with the run's weights loaded strictly (or seeded random ones) and its classifier
        replaced by the identity, so that its output is the 2048-d feature; on the device, in eval mode."""
        if self.settings.random_weights:
            # Seeded so that a resumed run rebuilds exactly the same random network.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.settings.random_seed)
                network = self.architecture()
        else:
            network = self.architecture()
            load_weights(network, weights.path, self.weights_what)
        network.fc = nn.Identity()
        network = network.to(self.device).eval()
        if self.device.type == "cuda":
            network = network.to(memory_format=self.memory_format)
        return network

    @classmethod
    def shape_for(cls, num_clips: int, frames_per_clip: int) -> tuple[int, ...]:
        """One video's features: a vector per frame of each clip, or per clip."""
        return (num_clips, frames_per_clip, FEATURE_DIM) if cls.per_frame else (num_clips, FEATURE_DIM)


class ResNet101Features(FeatureNetwork):
    """torchvision ResNet-101 without its fc: one 2048-d vector per frame → (N, F, 2048) per video."""

    model_name = "resnet101"
    kind = "appearance"
    feature_dataset = APPEARANCE_DATASET
    default_image_size = (224, 224)
    default_batch_size = 128
    per_frame = True
    weight_files = ("resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth")   # torchvision's current, older name
    how_to_get_weights = ("download https://download.pytorch.org/models/resnet101-63fe2227.pth (torchvision "
                          "ResNet-101 IMAGENET1K_V1) and pass it with --weights, or use --random-weights "
                          "for a test run")
    weights_what = "ResNet-101 weights"
    memory_format = torch.channels_last

    def __init__(self, settings: ExtractionSettings, device: torch.device):
        super().__init__(settings, device)
        mean, std = NORMALIZATIONS[settings.normalization]
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    @staticmethod
    def architecture() -> nn.Module:
        import torchvision
        return torchvision.models.resnet101(weights=None)

    def normalisation(self) -> str:
        mean, std = NORMALIZATIONS[self.settings.normalization]
        return f"{self.settings.normalization}: (RGB / 255 - mean {mean}) / std {std}"

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        # (B, H, W, 3) uint8 → (B, 3, H, W); the permuted view is already channels-last in memory.
        images = batch.permute(0, 3, 1, 2).float().div_(255.0)
        return images.sub_(self.mean).div_(self.std)


class ResNeXt101Features(FeatureNetwork):
    """3D ResNeXt-101 (Kinetics): one 2048-d vector per clip → (N, 2048) per video."""

    model_name = "resnext101"
    kind = "motion"
    feature_dataset = MOTION_DATASET
    default_image_size = (112, 112)
    default_batch_size = 16
    per_frame = False
    weight_files = ("resnext-101-kinetics.pth",)
    how_to_get_weights = ("download resnext-101-kinetics.pth from the pretrained-model links of "
                          "https://github.com/kenshohara/3D-ResNets-PyTorch (releases / README) and pass "
                          "it with --weights, or use --random-weights for a test run")
    weights_what = "3D ResNeXt-101 weights"
    memory_format = torch.channels_last_3d

    def __init__(self, settings: ExtractionSettings, device: torch.device):
        super().__init__(settings, device)
        self.mean = torch.tensor(KINETICS_MEAN, device=device).view(1, 3, 1, 1, 1)

    architecture = staticmethod(resnext101)

    def normalisation(self) -> str:
        return "0-255 RGB minus Kinetics mean" if self.settings.kinetics_mean else "raw 0-255 RGB"

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        # (B, F, H, W, 3) uint8 → (B, 3, F, H, W), raw 0–255 values as the original work fed them.
        clips = batch.permute(0, 4, 1, 2, 3).float()
        if self.settings.kinetics_mean:
            clips = clips.sub_(self.mean)
        return clips


NETWORKS: dict[str, type[FeatureNetwork]] = {network.model_name: network
                                              for network in (ResNet101Features, ResNeXt101Features)}
MODEL_OF_KIND = {network.kind: name for name, network in NETWORKS.items()}    # "appearance" -> "resnet101"
FEATURE_KINDS = tuple(MODEL_OF_KIND)


def check_settings(settings: ExtractionSettings, device: torch.device, batch_size: int,
                   num_workers: int) -> None:
    """One line naming the flag when a setting cannot be used (for any model, then for this one)."""
    s = settings
    for name in ("num_clips", "frames_per_clip", "image_height", "image_width", "chunk_videos"):
        if getattr(s, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if problem := check_frames_per_clip(s.frames_per_clip):
        raise UserError(f"--frames-per-clip: {problem}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"--num-workers must be 0 or more, got {num_workers}")
    if s.precision not in PRECISIONS:
        raise UserError(f"unknown precision {s.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if s.precision != "fp32" and device.type != "cuda":
        raise UserError(f"--{s.precision} needs a CUDA device (device is {device}); "
                        "on CPU features are computed in fp32")
    if s.random_weights and s.weights:
        raise UserError("--weights and --random-weights exclude each other")
    if s.normalization not in NORMALIZATIONS:
        raise UserError(f"unknown normalization {s.normalization!r}; "
                        f"choose one of {', '.join(NORMALIZATIONS)}")
    if s.kinetics_mean and s.model != ResNeXt101Features.model_name:
        raise UserError("--kinetics-mean applies to the resnext101 motion model only")
    if s.normalization != "original" and s.model != ResNet101Features.model_name:
        raise UserError("--normalization applies to the resnet101 appearance model only")
