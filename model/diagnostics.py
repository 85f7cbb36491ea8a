"""Is graph reasoning still telling the clips apart?

A graph layer can collapse: every clip leaves it with the same vector, and the common loss then
normalises rounding noise. `sample_spread` measures, per graph layer and stream, how far the N clip
vectors are apart relative to their size; `is_collapsed` is the rule, `layer_warning` the warning.
Everything works on the detached `layers` of an ordinary forward pass.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from model.dualvgr import DualVGROutput, LayerOutput

# The four GAT outputs of a layer, in LayerOutput order (and the metrics.csv column names).
STREAMS = LayerOutput._fields
# The streams the common loss compares: if either is collapsed, that layer's common loss is noise.
COMMON_STREAMS = ("common_appearance", "common_motion")
# Below this relative spread the clip vectors differ only by float32 rounding (the demo teacher's
# collapsed layers measure <= 2.3e-8; layers that really tell clips apart are at 1e-3 and above).
COLLAPSE_THRESHOLD = 1e-6


def relative_spread(nodes: Tensor) -> Tensor:
    """(B, N, d) -> (B,): population std over the N clips (mean over d) / mean |value|; 0 if all zero."""
    values = nodes.detach().float()
    spread = values.std(dim=1, correction=0).mean(dim=-1)
    size = values.abs().mean(dim=(1, 2))
    return spread / size.clamp_min(torch.finfo(values.dtype).tiny)


def sample_spread(output: DualVGROutput | Sequence[LayerOutput]) -> Tensor:
    """The clip spread -> (layers, B, 4) float32; rows follow `output.layers`, columns `STREAMS`."""
    layers = output.layers if isinstance(output, DualVGROutput) else tuple(output)
    if not layers:
        raise ValueError("node_spread needs the per-layer outputs of a DualVGR forward pass")
    return torch.stack([torch.stack([relative_spread(stream) for stream in layer], dim=-1) for layer in layers])


def is_collapsed(spread: Tensor) -> Tensor:
    """(..., 4) spread -> (...) bool: the common appearance or motion clips differ only by rounding."""
    return (spread[..., [STREAMS.index(name) for name in COMMON_STREAMS]] < COLLAPSE_THRESHOLD).any(dim=-1)


class NodeSpreadMeter:
    """Accumulates `sample_spread` over the batches of a split: `update(output)` per batch, then `columns()`."""

    def __init__(self) -> None:
        # (layers, 5): the spread of each stream summed over samples, then the count of collapsed samples.
        self.sums: Tensor | None = None
        self.samples = 0

    def update(self, output: DualVGROutput | Sequence[LayerOutput]) -> None:
        per_sample = sample_spread(output)                                           # (layers, B, 4)
        sums = torch.cat([per_sample, is_collapsed(per_sample).unsqueeze(-1)], dim=-1).sum(dim=1)
        self.sums = sums if self.sums is None else self.sums + sums
        self.samples += per_sample.size(1)

    def all_reduce(self, reduce_sum: Callable[[Tensor], Any], layers: int, device: torch.device) -> None:
        """Sum the counts of every process with `reduce_sum` (an in-place all-reduce); a process that
        saw no batch takes part with zeros of `layers` rows."""
        sums = torch.zeros(layers, len(STREAMS) + 1, device=device) if self.sums is None else self.sums
        sums, samples = sums.double(), torch.tensor(self.samples, dtype=torch.long, device=device)
        reduce_sum(sums)
        reduce_sum(samples)
        self.sums, self.samples = sums.float(), int(samples)

    def value(self) -> Tensor:
        """(layers, 4) mean spread over every sample seen."""
        return self.sums[:, :-1] / self.samples

    def collapsed_fraction(self) -> Tensor:
        """(layers,) fraction of the samples seen whose layer `is_collapsed` (the mean spread hides them)."""
        return self.sums[:, -1] / self.samples

    def collapsed_names(self, graph_layers: int | None = None) -> list[str]:
        """The layers whose mean spread over every sample seen `is_collapsed` ("g1", "u2_g1", ...)."""
        spread = self.value()
        return [layer_name(row, spread.size(0), graph_layers) for row in collapsed_layers(spread)]

    def columns(self, graph_layers: int | None = None) -> dict[str, float]:
        """node_spread_<layer>_<stream> for every layer and stream, then node_collapsed_<layer>."""
        fractions = self.collapsed_fraction().tolist()
        collapsed = {f"node_collapsed_{layer_name(row, len(fractions), graph_layers)}": value
                     for row, value in enumerate(fractions)}
        return spread_columns(self.value(), graph_layers) | collapsed


def layer_name(row: int, rows: int, graph_layers: int | None = None) -> str:
    """Name of row `row` (0-based): "g2" (1-based), or "u2_g1" with `graph_layers` and several units."""
    if graph_layers is None or rows <= graph_layers:
        return f"g{row + 1}"
    return f"u{row // graph_layers + 1}_g{row % graph_layers + 1}"


def spread_columns(spread: Tensor, graph_layers: int | None = None) -> dict[str, float]:
    """(layers, 4) -> {"node_spread_g1_common_appearance": ..., ...}, layers named by `layer_name`."""
    values = spread.tolist()
    return {f"node_spread_{layer_name(row, len(values), graph_layers)}_{stream}": value
            for row, streams in enumerate(values) for stream, value in zip(STREAMS, streams)}


def collapsed_layers(spread: Tensor) -> list[int]:
    """Rows (0-based) of a (layers, 4) spread that `is_collapsed`."""
    return torch.nonzero(is_collapsed(spread)).flatten().tolist()


def layer_warning(name: str) -> str:
    """The one-line warning for the collapsed layer named `name` ("g2", "u1_g2", see `layer_name`)."""
    label = name[1:] if name.startswith("g") else name
    return f"graph layer {label}: clip features identical across clips; the common loss there is rounding noise"
