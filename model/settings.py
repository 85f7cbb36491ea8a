"""`ModelConfig` (everything needed to rebuild a DualVGR, stored in every checkpoint) and its checks,
shared by the model and the config file's `model:` section."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

ATTENTION_KINDS = ("gat", "gatv2")   # ModelConfig.attention; see GraphAttention


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; `dataclasses.asdict(cfg)` goes into checkpoints."""

    question_vocab_size: int
    answer_vocab_size: int
    vision_dim: int = 2048
    module_dim: int = 768
    word_dim: int = 300
    num_nodes: int = 8              # clips per video N (graph nodes)
    graph_layers: int = 4           # G: teacher 4, student 1
    unit_layers: int = 1            # U: reasoning units, each with its own parameters
    num_heads: int = 4              # GAT heads, each module_dim // num_heads wide
    fusion_dim: int = 256           # MFB pooled size; its projections are fusion_dim * fusion_factor wide
    fusion_factor: int = 2
    word_dropout: float = 0.15      # on the word embeddings, before tanh
    frame_dropout: float = 0.15     # on the per-frame appearance features, before tanh
    encoder_dropout: float = 0.18   # on the sentence vector q and the clip vectors a
    graph_dropout: float = 0.15     # GAT input, attention weights and output
    head_dropout: float = 0.15      # clip pooling input and both classifier dropouts
    # "gat": the original (static) graph attention; "gatv2": weights that depend on the query clip.
    attention: str = "gat"

    def __post_init__(self) -> None:
        problems = model_config_problems(self, "ModelConfig.")
        if problems:
            raise ValueError(problems[0])


# Every integer of ModelConfig is a positive size or count, every float a dropout rate.
POSITIVE_INT_FIELDS = tuple(field.name for field in fields(ModelConfig) if field.type == "int")
DROPOUT_FIELDS = tuple(field.name for field in fields(ModelConfig) if field.type == "float")


def model_config_problems(settings: Any, prefix: str) -> list[str]:
    """What is wrong with ModelConfig values (`<prefix><field> ...`, fixed order); `settings` may be
    anything with some of its fields as attributes (fields it lacks are not checked)."""
    problems = []
    for name in POSITIVE_INT_FIELDS:
        number = getattr(settings, name, None)
        if number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, int):
            problems.append(f"{prefix}{name} must be an integer, got {number!r}")
        elif number < 1:
            problems.append(f"{prefix}{name} must be > 0, got {number}")
    for name in DROPOUT_FIELDS:
        rate = getattr(settings, name, None)
        if rate is None:
            continue
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            problems.append(f"{prefix}{name} must be in [0, 1), got {rate!r}")
    module_dim, num_heads = getattr(settings, "module_dim", None), getattr(settings, "num_heads", None)
    if isinstance(module_dim, int) and isinstance(num_heads, int) and module_dim > 0 and num_heads > 0:
        if module_dim % 2:
            problems.append(f"{prefix}module_dim must be even (two LSTM directions), got {module_dim}")
        elif module_dim % num_heads:
            problems.append(f"{prefix}module_dim ({module_dim}) must be divisible by {prefix}num_heads ({num_heads})")
    attention = getattr(settings, "attention", None)
    if attention is not None and attention not in ATTENTION_KINDS:
        problems.append(f"{prefix}attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
    return problems
