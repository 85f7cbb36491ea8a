"""Checkpoints written by the original DualVGR / VQAKD code (docs/method.md#original-checkpoint-layout).

`original_to_ours` and `ours_to_original` translate between that state-dict layout and ours,
strictly (a missing or extra key or a wrong shape raises an OriginalCheckpointError naming it).
The only structural difference is the graph-attention block: the original keeps one module per
head (`attention_{h}.W`: Linear(d → dh), `attention_{h}.a`: Linear(2·dh → 1)); ours stacks the W
into one Linear(d → H·dh) and splits a into `attn_self` (first dh) and `attn_neighbor` (last dh).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from model.dualvgr import DualVGR
from model.settings import ModelConfig


class OriginalCheckpointError(ValueError):
    """An original checkpoint that cannot be converted; the message names the file and the key."""


_LSTM_PARAMS = tuple(f"{kind}_{part}_l0{suffix}" for suffix in ("", "_reverse")
                     for kind, part in (("weight", "ih"), ("weight", "hh"), ("bias", "ih"), ("bias", "hh")))
_BATCHNORM_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# Our GAT role name -> the original ModuleList holding it.
_GAT_ROLES = (
    ("specific_appearance", "appearance_GCN"),
    ("common_appearance", "acGCN"),
    ("specific_motion", "motion_GCN"),
    ("common_motion", "mcGCN"),
)

# Each original head's entries: head h's piece of our stacked tensor ("scores": attn_self ‖ attn_neighbor).
_HEAD_ENTRIES = (("proj.weight", "W.weight"), ("proj.bias", "W.bias"), ("scores", "a.weight"), ("attn_bias", "a.bias"))

_FUSION_IN_KEY = "visual_input_unit.visualfusion.linear0.weight"

# (our module, original module, its entries) copied unchanged; "{u}" repeats per reasoning unit.
_WEIGHT_BIAS = ("weight", "bias")
_RENAMED_MODULES = (
    ("question_encoder.embedding", "linguistic_input_unit.encoder_embed", ("weight",)),
    ("question_encoder.word_lstm", "linguistic_input_unit.concatRNN.rnn", _LSTM_PARAMS),
    ("question_encoder.sentence_lstm", "linguistic_input_unit.encoder", _LSTM_PARAMS),
    ("appearance_encoder.lstm", "visual_appearance_input_unit.encoder", _LSTM_PARAMS),
    ("motion_encoder", "visual_motion_input_unit", _WEIGHT_BIAS),
    ("units.{u}.query_attention.feat_enhance", "visual_input_unit.queryAttn.{u}.feat_enhance", _WEIGHT_BIAS),
    ("units.{u}.query_attention.score", "visual_input_unit.queryAttn.{u}.fc", _WEIGHT_BIAS),
    ("units.{u}.appearance_gate.query_proj", "visual_input_unit.queryPunish_appear.{u}.query_weight", _WEIGHT_BIAS),
    ("units.{u}.motion_gate.query_proj", "visual_input_unit.queryPunish_motion.{u}.query_weight", _WEIGHT_BIAS),
    ("units.{u}.appearance_view_fusion.project", "visual_input_unit.attention_appearance.{u}.project.0",
     _WEIGHT_BIAS),
    ("units.{u}.appearance_view_fusion.score", "visual_input_unit.attention_appearance.{u}.project.2", ("weight",)),
    ("units.{u}.motion_view_fusion.project", "visual_input_unit.attention_motion.{u}.project.0", _WEIGHT_BIAS),
    ("units.{u}.motion_view_fusion.score", "visual_input_unit.attention_motion.{u}.project.2", ("weight",)),
    ("visual_fusion.appearance_proj", "visual_input_unit.visualfusion.linear0", _WEIGHT_BIAS),
    ("visual_fusion.motion_proj", "visual_input_unit.visualfusion.linear1", _WEIGHT_BIAS),
    ("visual_fusion.out_proj", "visual_input_unit.visualfusion.linear_out", _WEIGHT_BIAS),
    ("clip_pooling.proj", "feature_aggregation.v_proj", ("weight",)),
    ("clip_pooling.score", "feature_aggregation.attn", _WEIGHT_BIAS),
    ("answer_head.question_proj", "output_unit.question_proj", _WEIGHT_BIAS),
    ("answer_head.hidden", "output_unit.classifier.1", _WEIGHT_BIAS),
    ("answer_head.norm", "output_unit.classifier.3", _BATCHNORM_ENTRIES),
    ("answer_head.classifier", "output_unit.classifier.5", _WEIGHT_BIAS),
)


def _renamed_keys(config: ModelConfig) -> list[tuple[str, str]]:
    """(our key, original key) for every entry that is copied unchanged (all but the GATs)."""
    return [(f"{ours.format(u=u)}.{name}", f"{original.format(u=u)}.{name}")
            for ours, original, names in _RENAMED_MODULES
            for u in (range(config.unit_layers) if "{u}" in ours else (0,))
            for name in names]


def _gat_modules(config: ModelConfig) -> list[tuple[str, str]]:
    """(our GAT module prefix, original punishGAT prefix); layer (u, g) is original index u·G + g."""
    return [(f"units.{u}.layers.{g}.{role}", f"visual_input_unit.{original_list}.{u * config.graph_layers + g}")
            for u in range(config.unit_layers) for g in range(config.graph_layers)
            for role, original_list in _GAT_ROLES]


def _require_convertible(config: ModelConfig, what: str, verb: str) -> None:
    """The original code only has GAT attention (a GATv2 network has no original layout), and runs graph
    layer (u, g) with module index u + g (units share graph layers), which has no per-unit form (index
    u·G + g): converting that either way would change what the weights compute."""
    if config.attention != "gat":
        raise ValueError(f"original DualVGR checkpoints only hold GAT attention; a model with "
                         f"attention={config.attention!r} cannot be converted to or from one")
    if config.unit_layers > 1 and config.graph_layers > 1:
        raise OriginalCheckpointError(
            f"{what} with unit_layers={config.unit_layers} and graph_layers={config.graph_layers} cannot be "
            f"{verb} the original layout: the original code shares graph layers between units (module index u+g)")


def _meta_state(config: ModelConfig) -> dict[str, Tensor]:
    """Our state dict for `config` as meta tensors: shapes and dtypes, without allocating any weights."""
    with torch.device("meta"):
        return DualVGR(config).state_dict()


def _check_keys(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str) -> None:
    """`state` has exactly the keys of `expected`, each a tensor of the same shape."""
    for problem, keys in (("missing", [key for key in expected if key not in state]),
                          ("unexpected", [key for key in state if key not in expected])):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise OriginalCheckpointError(f"{what}: {problem} key {keys[0]!r}{more}")
    for key, reference in expected.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise OriginalCheckpointError(f"{what}: key {key!r} holds a {type(value).__name__}, not a tensor")
        if value.shape != reference.shape:
            raise OriginalCheckpointError(
                f"{what}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}")


def ours_to_original(state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> the original DualVGR key layout (strict; GAT attention only)."""
    _require_convertible(config, "a model", "exported to")
    _check_keys(state, _meta_state(config), "DualVGR state dict")
    return _export(state, config)


def _export(state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    result = {original: state[key].detach().clone() for key, original in _renamed_keys(config)}
    for our_prefix, original in _gat_modules(config):
        stacked = {name: state[f"{our_prefix}.{name}"].detach() for name in ("proj.weight", "proj.bias", "attn_bias")}
        stacked["scores"] = torch.cat([state[f"{our_prefix}.attn_self"],
                                       state[f"{our_prefix}.attn_neighbor"]], dim=1).detach()   # row h: [a1 ‖ a2]
        for h in range(config.num_heads):
            for name, entry in _HEAD_ENTRIES:
                result[f"{original}.attention_{h}.{entry}"] = stacked[name].chunk(config.num_heads)[h].clone()
    return result


def original_to_ours(state: Mapping[str, Tensor], config: ModelConfig,
                     source: str = "original DualVGR state dict") -> dict[str, Tensor]:
    """An original DualVGR state dict -> ours (strict); `source` starts every error message."""
    _require_convertible(config, f"{source}: a checkpoint", "converted from")
    ours = _meta_state(config)
    _check_keys(state, _export(ours, config), source)
    result = {key: state[original].detach().clone() for key, original in _renamed_keys(config)}
    for our_prefix, original in _gat_modules(config):
        stacked = {name: torch.cat([state[f"{original}.attention_{h}.{entry}"] for h in range(config.num_heads)])
                   for name, entry in _HEAD_ENTRIES}
        scores = stacked.pop("scores")                                                  # row h: [a1 ‖ a2]
        stacked["attn_self"], stacked["attn_neighbor"] = (part.clone() for part in scores.chunk(2, dim=1))
        result.update({f"{our_prefix}.{name}": value for name, value in stacked.items()})
    # In our model's key order, each tensor in the dtype our model declares (float32 even if saved as float16).
    return {key: result[key].to(reference.dtype) for key, reference in ours.items()}


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    """How many modules the keys matching `pattern` number (its group: the 0-based index; one must match)."""
    regex = re.compile(pattern)
    return 1 + max(int(match.group(1)) for key in state if isinstance(key, str) and (match := regex.match(key)))


def _shape_of(state: Mapping[str, Tensor], key: str, what: str) -> tuple[int, int]:
    value = state.get(key)
    if value is None:
        raise OriginalCheckpointError(f"{what}: missing key {key!r}")
    if not isinstance(value, Tensor) or value.dim() != 2:
        raise OriginalCheckpointError(
            f"{what}: key {key!r} should be a 2-d tensor, "
            f"got {tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")
    return tuple(value.shape)


def _kwarg_int(kwargs: Mapping, name: str, derived: int | None, what: str) -> int:
    """An integer from model_kwargs, cross-checked against what the weights say."""
    value = kwargs.get(name, derived)
    if value is None:
        raise OriginalCheckpointError(f"{what}: model_kwargs has no {name!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise OriginalCheckpointError(f"{what}: model_kwargs[{name!r}] = {value!r} is not an integer")
    if derived is not None and value != derived:
        raise OriginalCheckpointError(
            f"{what}: model_kwargs[{name!r}] = {value} but the weights imply {derived}")
    return value


def config_from_original(state: Mapping[str, Tensor], model_kwargs: Mapping, what: str,
                         claimed: dict | None = None) -> ModelConfig:
    """Our ModelConfig from an original state dict and its `model_kwargs`. The weights decide the graph
    layers (VQAKD's `train_kd_2.py` saves its student with the teacher's 4); a contradicting claim is
    recorded in `claimed`."""
    question_vocab, word_dim = _shape_of(state, "linguistic_input_unit.encoder_embed.weight", what)
    answer_vocab, module_dim = _shape_of(state, "output_unit.classifier.5.weight", what)
    _, vision_dim = _shape_of(state, "visual_motion_input_unit.weight", what)
    _, fusion_dim = _shape_of(state, "visual_input_unit.visualfusion.linear_out.weight", what)
    fusion_wide, _ = _shape_of(state, _FUSION_IN_KEY, what)
    # The first unit and graph-attention head must exist; how many there are, the keys say.
    _shape_of(state, "visual_input_unit.queryAttn.0.fc.weight", what)
    _shape_of(state, "visual_input_unit.appearance_GCN.0.attention_0.W.weight", what)
    unit_layers = _count(state, r"visual_input_unit\.queryAttn\.(\d+)\.")
    graph_modules = _count(state, r"visual_input_unit\.appearance_GCN\.(\d+)\.")
    heads = _count(state, r"visual_input_unit\.appearance_GCN\.0\.attention_(\d+)\.")
    if graph_modules % unit_layers:
        raise OriginalCheckpointError(
            f"{what}: {graph_modules} graph-attention modules per role do not divide into {unit_layers} units")
    graph_layers = graph_modules // unit_layers
    if fusion_wide % fusion_dim:
        raise OriginalCheckpointError(
            f"{what}: key {_FUSION_IN_KEY!r} has {fusion_wide} rows, not a multiple of "
            f"the pooled size {fusion_dim}")

    graph_module = model_kwargs.get("graph_module", "GAT")
    if graph_module != "GAT":
        raise OriginalCheckpointError(
            f"{what}: model_kwargs['graph_module'] = {graph_module!r}; only 'GAT' models exist")
    # DualVGR's train.py never stored `unit_layers`: the counts come from the weights, cross-checked here.
    unit_layers = _kwarg_int(model_kwargs, "unit_layers", unit_layers, what)
    claim = _kwarg_int(model_kwargs, "graph_layers", None, what) if "graph_layers" in model_kwargs else graph_layers
    if claim != graph_layers and claimed is not None:
        claimed["graph_layers"] = claim
    return ModelConfig(
        question_vocab_size=question_vocab,
        answer_vocab_size=answer_vocab,
        vision_dim=_kwarg_int(model_kwargs, "vision_dim", vision_dim, what),
        module_dim=_kwarg_int(model_kwargs, "module_dim", module_dim, what),
        word_dim=_kwarg_int(model_kwargs, "word_dim", word_dim, what),
        num_nodes=_kwarg_int(model_kwargs, "num_of_nodes", None, what),
        graph_layers=graph_layers,
        unit_layers=unit_layers,
        num_heads=heads,
        fusion_dim=fusion_dim,
        fusion_factor=fusion_wide // fusion_dim,
    )


def convert_original_checkpoint(checkpoint: Mapping, path: str,
                                claimed: dict | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A loaded original DualVGR/VQAKD checkpoint dict -> (our config, our state dict). `path` starts
    every error message; `claimed` collects model_kwargs values the weights contradict."""
    if "state_dict" not in checkpoint:
        raise OriginalCheckpointError(f"{path}: not an original DualVGR checkpoint (no 'state_dict' entry)")
    state = checkpoint["state_dict"]
    if not isinstance(state, Mapping):
        raise OriginalCheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a mapping")
    model_kwargs = checkpoint.get("model_kwargs")
    if not isinstance(model_kwargs, Mapping):
        raise OriginalCheckpointError(
            f"{path}: checkpoint has no 'model_kwargs' dict (vision_dim, module_dim, word_dim, "
            "num_of_nodes, graph_layers)")
    # A model trained under nn.DataParallel was saved with every key prefixed by 'module.'.
    if state and all(isinstance(key, str) and key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    what = f"{path}: original DualVGR state dict"
    config = config_from_original(state, model_kwargs, what, claimed)
    return config, original_to_ours(state, config, source=what)
