"""DualVGR, the network that VQAKD uses for both its teacher (G = 4) and its student (G = 1).

The layout is that of docs/method.md#network (and of the original DualVGR code in every detail):

    question ──Embed─dropout─tanh──> words w ──BiLSTM (packed)──> word states (B, L, d)
                                        └────BiLSTM (packed)──> q           (B, d)
    appearance (B,N,F,Dv) ──dropout─tanh─BiLSTM over F──> a (B, N, d)
    motion     (B,N,Dv)   ──Linear──────────────────────> m (B, N, d)
    U reasoning units:  c = QueryAttention(word states, w);  p_a, p_m = QuestionGate(c, a / m)
                        G graph layers of four GAT (or GATv2) blocks (specific/common × appearance/motion)
                        a += ViewFusion(common_a, specific_a);  m += ViewFusion(common_m, specific_m)
    v = MFB(a, m) (B, N, d) ──ClipPooling──> v̄ ;  logits = AnswerHead(v̄, q)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.settings import ModelConfig

# Fixed constants of the original architecture (not tuned anywhere in DualVGR/VQAKD).
GAT_LEAKY_SLOPE = 0.01          # LeakyReLU slope of the graph-attention score
QUERY_ATTENTION_EPS = 1e-5      # added to the kept attention mass before renormalising


class LayerOutput(NamedTuple):
    """One graph layer's results, kept for the common and dependence losses (each (B, N, d))."""

    specific_appearance: Tensor  # a_{g+1}, output of the specific-appearance GAT
    common_appearance: Tensor    # output of the common-appearance GAT
    specific_motion: Tensor      # m_{g+1}
    common_motion: Tensor


class DualVGROutput(NamedTuple):
    logits: Tensor               # (B, |A|)
    visual: Tensor               # (B, N, d) MFB output: what the teacher hands to the student
    appearance: Tensor           # (B, N, d) appearance after the last unit, before the MFB
    motion: Tensor               # (B, N, d) motion after the last unit, before the MFB
    layers: tuple[LayerOutput, ...]   # U·G entries, layer (u, g) at index u·G + g


def autocast_off(tensor: Tensor):
    """Run in the parameters' own precision inside an autocast region (the LSTMs and the losses):
    oneDNN has no bf16 LSTM on many CPUs, and a bf16 hidden state over 16 frames drifts from the
    float32 original. The linear, graph and fusion layers keep running under autocast."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


class QuestionEncoder(nn.Module):
    """Word vectors, per-word BiLSTM states `word_states`, and the sentence vector `q`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.module_dim // 2
        self.embedding = nn.Embedding(config.question_vocab_size, config.word_dim)
        self.word_dropout = nn.Dropout(config.word_dropout)
        self.word_lstm = nn.LSTM(config.word_dim, hidden, batch_first=True, bidirectional=True)
        self.sentence_lstm = nn.LSTM(config.word_dim, hidden, batch_first=True, bidirectional=True)
        self.sentence_dropout = nn.Dropout(config.encoder_dropout)

    def forward(self, question: Tensor, question_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """question (B, L) long, question_len (B,) -> words (B, L, Dw), word_states (B, L, d), q (B, d)."""
        max_len = question.size(1)
        words = torch.tanh(self.word_dropout(self.embedding(question)))
        # pack_padded_sequence needs CPU int64 lengths: the forward pass's one host transfer.
        lengths = question_len.detach().to(device="cpu", dtype=torch.int64)
        if not bool(((lengths >= 1) & (lengths <= max_len)).all()):
            raise ValueError(f"question lengths must lie in [1, {max_len}], got {lengths.tolist()}")
        packed = pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False)
        with autocast_off(words):
            word_states_packed, _ = self.word_lstm(packed)
            # Packed too, so both directions start or end at the true last word: no padding leaks in.
            _, (final_hidden, _) = self.sentence_lstm(packed)
        # Zero-padded back to length L, as the original DynamicRNN did with F.pad.
        word_states, _ = pad_packed_sequence(word_states_packed, batch_first=True, total_length=max_len)
        sentence = torch.cat([final_hidden[0], final_hidden[1]], dim=-1)
        return words, word_states, self.sentence_dropout(sentence)


class AppearanceEncoder(nn.Module):
    """Each clip's F frame features through a BiLSTM; both final states concatenated."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.frame_dropout = nn.Dropout(config.frame_dropout)
        self.lstm = nn.LSTM(config.vision_dim, config.module_dim // 2, batch_first=True, bidirectional=True)
        self.output_dropout = nn.Dropout(config.encoder_dropout)

    def forward(self, appearance: Tensor) -> Tensor:
        """appearance (B, N, F, Dv) -> (B, N, d)."""
        batch, clips, frames, dim = appearance.shape
        frames_in = torch.tanh(self.frame_dropout(appearance)).reshape(batch * clips, frames, dim)
        with autocast_off(frames_in):
            _, (final_hidden, _) = self.lstm(frames_in.to(self.lstm.weight_ih_l0.dtype))
        clip_vectors = torch.cat([final_hidden[0], final_hidden[1]], dim=-1)
        return self.output_dropout(clip_vectors.view(batch, clips, -1))


class QueryAttention(nn.Module):
    """Attend over the question's words: c = Σ_l s_l · w_l (attended word vectors, not LSTM states)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.feat_enhance = nn.Linear(config.module_dim, config.module_dim)
        self.score = nn.Linear(config.module_dim, 1)

    def forward(self, words: Tensor, word_states: Tensor, word_mask: Tensor) -> Tensor:
        """words (B, L, Dw), word_states (B, L, d), word_mask (B, L) bool -> c (B, Dw)."""
        scores = self.score(F.normalize(self.feat_enhance(word_states), p=2, dim=-1)).squeeze(-1)
        # As in the original: softmax over all L positions, zero the padded ones, renormalise by (sum + 1e-5).
        weights = torch.softmax(scores, dim=1) * word_mask.to(scores.dtype)
        weights = weights / (weights.sum(dim=1, keepdim=True) + QUERY_ATTENTION_EPS)
        return torch.bmm(weights.unsqueeze(1).to(words.dtype), words).squeeze(1)


class QuestionGate(nn.Module):
    """Question gating of the clips: one gate per clip, p = sigmoid(x · Linear(c)) -> (B, N, 1)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.query_proj = nn.Linear(config.word_dim, config.module_dim)

    def forward(self, query: Tensor, visual: Tensor) -> Tensor:
        projected = self.query_proj(query).unsqueeze(2)                 # (B, d, 1)
        return torch.sigmoid(torch.bmm(visual, projected.to(visual.dtype)))


def _xavier_uniform_(tensor: Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    tensor.uniform_(-bound, bound)


class GraphAttention(nn.Module):
    """Multi-head graph attention over the complete graph of clips (self-loops included); the
    subclasses `GAT` and `GATv2` make the scores e (B, H, N, N), e[b,h,i,j] for j -> i, in
    `attention_scores(heads, x)`. `proj.weight` stacks the per-head W (dh × d), head h at rows
    [h·dh, (h+1)·dh); node j sends W h_j + b, scaled by its question gate."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.module_dim // config.num_heads
        self.dropout = config.graph_dropout
        self.proj = nn.Linear(config.module_dim, self.num_heads * self.head_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform with the fans of the original per-head modules: each stacked Linear as
        Linear(d -> dh), each (H, dh) score vector as its Linear(`score_fan_in` -> 1); zero biases."""
        for linear in self.children():
            _xavier_uniform_(linear.weight, linear.in_features, self.head_dim)
            linear.bias.zero_()
        for param in self.parameters(recurse=False):
            if param.dim() == 2:
                _xavier_uniform_(param, self.score_fan_in, 1)
            else:
                param.zero_()

    def project(self, x: Tensor, linear: nn.Linear | None = None) -> Tensor:
        """(B, N, d) -> per-head node features (B, H, N, dh), through `proj` or another stacked `linear`."""
        projected = (self.proj if linear is None else linear)(x)
        return projected.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        """x (B, N, d), gate (B, N, 1) -> (B, N, d)."""
        x = F.dropout(x, self.dropout, self.training)
        heads = self.project(x)
        attention = torch.softmax(self.attention_scores(heads, x), dim=-1)
        attention = F.dropout(attention, self.dropout, self.training)
        # Node j's gate scales its message; the scores come from the ungated features, as in the original.
        messages = heads * gate.unsqueeze(1).to(heads.dtype)
        out = F.elu(torch.matmul(attention, messages)).transpose(1, 2).flatten(2)     # heads side by side
        return F.dropout(out, self.dropout, self.training)


class GAT(GraphAttention):
    """The original block: e_ij = LeakyReLU(a1·W h_i + a2·W h_j + b), each head's a = [a1 ‖ a2]
    stored as `attn_self` (a1, on the updated node i) and `attn_neighbor` (a2, on the sender j).
    On a complete graph this attention is static: the softmax over j cancels the a1 term."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.score_fan_in = 2 * self.head_dim      # a is Linear(2·dh -> 1) per head
        self.attn_self = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.attn_neighbor = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.attn_bias = nn.Parameter(torch.empty(self.num_heads))
        self.reset_parameters()

    def attention_scores(self, heads: Tensor, x: Tensor) -> Tensor:
        to_self = torch.einsum("bhnd,hd->bhn", heads, self.attn_self.to(heads.dtype))
        to_neighbor = torch.einsum("bhnd,hd->bhn", heads, self.attn_neighbor.to(heads.dtype))
        raw = to_self.unsqueeze(-1) + to_neighbor.unsqueeze(-2) + self.attn_bias.to(heads.dtype).view(1, -1, 1, 1)
        return F.leaky_relu(raw, GAT_LEAKY_SLOPE)


class GATv2(GraphAttention):
    """Brody, Alon & Yahav (ICLR 2022): e_ij = a_h · LeakyReLU(W_s h_i + b_s + W h_j + b), with
    `target_proj` (W_s, b_s) for the updated node; no score bias (it would cancel in the softmax)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.score_fan_in = self.head_dim          # a is Linear(dh -> 1) per head
        self.target_proj = nn.Linear(config.module_dim, self.num_heads * self.head_dim)
        self.attn = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.reset_parameters()

    def attention_scores(self, heads: Tensor, x: Tensor) -> Tensor:
        targets = self.project(x, self.target_proj)
        pairs = F.leaky_relu(targets.unsqueeze(3) + heads.unsqueeze(2), GAT_LEAKY_SLOPE)   # (B,H,N,N,dh)
        return torch.einsum("bhijd,hd->bhij", pairs, self.attn.to(pairs.dtype))


GRAPH_ATTENTIONS = {"gat": GAT, "gatv2": GATv2}     # model.attention -> the block


class GraphLayer(nn.Module):
    """The four independent GAT blocks of one graph layer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        attention = GRAPH_ATTENTIONS[config.attention]
        self.specific_appearance = attention(config)
        self.common_appearance = attention(config)
        self.specific_motion = attention(config)
        self.common_motion = attention(config)

    def forward(self, appearance: Tensor, motion: Tensor, gate_appearance: Tensor,
                gate_motion: Tensor) -> LayerOutput:
        return LayerOutput(self.specific_appearance(appearance, gate_appearance),
                           self.common_appearance(appearance, gate_appearance),
                           self.specific_motion(motion, gate_motion),
                           self.common_motion(motion, gate_motion))


class ViewFusion(nn.Module):
    """Attention over the two views (common, specific): β = softmax_views(w·tanh(W x + b))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.project = nn.Linear(config.module_dim, config.module_dim)
        self.score = nn.Linear(config.module_dim, 1, bias=False)

    def forward(self, common: Tensor, specific: Tensor) -> Tensor:
        views = torch.stack([common, specific], dim=1)                  # (B, 2, N, d)
        weights = torch.softmax(self.score(torch.tanh(self.project(views))), dim=1)
        return (weights * views).sum(dim=1)


class ReasoningUnit(nn.Module):
    """Question attention and gating, G graph layers, view fusion and the residual update."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.query_attention = QueryAttention(config)
        self.appearance_gate = QuestionGate(config)
        self.motion_gate = QuestionGate(config)
        self.layers = nn.ModuleList(GraphLayer(config) for _ in range(config.graph_layers))
        self.appearance_view_fusion = ViewFusion(config)
        self.motion_view_fusion = ViewFusion(config)

    def forward(self, appearance: Tensor, motion: Tensor, words: Tensor, word_states: Tensor,
                word_mask: Tensor) -> tuple[Tensor, Tensor, list[LayerOutput]]:
        query = self.query_attention(words, word_states, word_mask)
        # Gates come from the unit's input features and are reused by all G layers.
        gate_appearance = self.appearance_gate(query, appearance)
        gate_motion = self.motion_gate(query, motion)
        outputs: list[LayerOutput] = []
        specific_appearance, specific_motion = appearance, motion
        for layer in self.layers:
            result = layer(specific_appearance, specific_motion, gate_appearance, gate_motion)
            outputs.append(result)
            specific_appearance, specific_motion = result.specific_appearance, result.specific_motion
        last = outputs[-1]
        appearance = appearance + self.appearance_view_fusion(last.common_appearance, last.specific_appearance)
        motion = motion + self.motion_view_fusion(last.common_motion, last.specific_motion)
        return appearance, motion, outputs


class MFBFusion(nn.Module):
    """Multimodal factorised bilinear pooling of appearance and motion, per clip."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.factor = config.fusion_factor
        wide = config.fusion_dim * config.fusion_factor
        self.appearance_proj = nn.Linear(config.module_dim, wide)
        self.motion_proj = nn.Linear(config.module_dim, wide)
        self.out_proj = nn.Linear(config.fusion_dim, config.module_dim)

    def forward(self, appearance: Tensor, motion: Tensor) -> Tensor:
        joint = F.elu(self.appearance_proj(appearance)) * F.elu(self.motion_proj(motion))
        # Sum-pool adjacent channels: pooled[k] = joint[factor·k] + ... + joint[factor·k + factor-1].
        pooled = joint.unflatten(-1, (-1, self.factor)).sum(dim=-1)
        return F.elu(self.out_proj(pooled))


class ClipPooling(nn.Module):
    """Self-attention pooling over the N clips."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.head_dropout)
        self.proj = nn.Linear(config.module_dim, config.module_dim, bias=False)
        self.score = nn.Linear(config.module_dim, 1)

    def forward(self, visual: Tensor) -> Tensor:
        visual = self.dropout(visual)
        weights = torch.softmax(self.score(F.elu(self.proj(visual))), dim=1)   # (B, N, 1)
        return (weights * visual).sum(dim=1)


class AnswerHead(nn.Module):
    """[v̄ ; Linear(q)] -> dropout -> Linear -> ELU -> BatchNorm -> dropout -> Linear -> logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.module_dim
        self.question_proj = nn.Linear(d, d)
        self.input_dropout = nn.Dropout(config.head_dropout)
        self.hidden = nn.Linear(2 * d, d)
        self.norm = nn.BatchNorm1d(d)
        self.hidden_dropout = nn.Dropout(config.head_dropout)
        self.classifier = nn.Linear(d, config.answer_vocab_size)

    def forward(self, pooled_visual: Tensor, question: Tensor) -> Tensor:
        joint = torch.cat([pooled_visual, self.question_proj(question).to(pooled_visual.dtype)], dim=-1)
        hidden = self.norm(F.elu(self.hidden(self.input_dropout(joint))))
        return self.classifier(self.hidden_dropout(hidden))


class DualVGR(nn.Module):
    """The full network. `forward` returns a `DualVGROutput`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.question_encoder = QuestionEncoder(config)
        self.appearance_encoder = AppearanceEncoder(config)
        self.motion_encoder = nn.Linear(config.vision_dim, config.module_dim)
        self.units = nn.ModuleList(ReasoningUnit(config) for _ in range(config.unit_layers))
        self.visual_fusion = MFBFusion(config)
        self.clip_pooling = ClipPooling(config)
        self.answer_head = AnswerHead(config)
        # The original initialisation: Xavier-uniform weights, zero biases, embedding U(-1, 1); then the
        # graph-attention blocks re-apply the per-head fans of their stacked projections.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.LSTM)):
                for name, param in module.named_parameters():
                    if name.startswith("weight"):
                        nn.init.xavier_uniform_(param)
                    else:
                        nn.init.zeros_(param)
        for module in self.modules():
            if isinstance(module, GraphAttention):
                module.reset_parameters()
        nn.init.uniform_(self.question_encoder.embedding.weight, -1.0, 1.0)

    def load_glove(self, matrix) -> None:
        """Overwrite the word embedding with a (|Q|, word_dim) GloVe matrix (stays trainable)."""
        weight = self.question_encoder.embedding.weight
        values = torch.as_tensor(matrix)
        if tuple(values.shape) != tuple(weight.shape):
            raise ValueError(f"GloVe matrix has shape {tuple(values.shape)} but the model's question vocabulary "
                            f"needs {tuple(weight.shape)} (|Q| x word_dim); were the GloVe matrix and the "
                            "vocabulary made by the same preprocessing run?")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("GloVe matrix contains NaN or infinite values")
        with torch.no_grad():
            weight.copy_(values.to(device=weight.device, dtype=weight.dtype))

    def forward(self, appearance: Tensor, motion: Tensor, question: Tensor, question_len: Tensor) -> DualVGROutput:
        """appearance (B, N, F, Dv), motion (B, N, Dv), question (B, L) int, question_len (B,) int."""
        self._check_inputs(appearance, motion, question, question_len)
        weight = self.motion_encoder.weight
        device = weight.device
        appearance, motion = appearance.to(weight), motion.to(weight)     # the parameters' device and dtype
        question = question.to(device=device, dtype=torch.long)

        words, word_states, sentence = self.question_encoder(question, question_len)
        positions = torch.arange(question.size(1), device=device)
        word_mask = positions.unsqueeze(0) < question_len.to(device, non_blocking=True).unsqueeze(1)

        appearance_feat = self.appearance_encoder(appearance)
        motion_feat = self.motion_encoder(motion)
        layers: list[LayerOutput] = []
        for unit in self.units:
            appearance_feat, motion_feat, unit_layers = unit(appearance_feat, motion_feat, words, word_states,
                                                             word_mask)
            layers.extend(unit_layers)

        visual = self.visual_fusion(appearance_feat, motion_feat)
        logits = self.answer_head(self.clip_pooling(visual), sentence)
        return DualVGROutput(logits=logits, visual=visual, appearance=appearance_feat, motion=motion_feat,
                             layers=tuple(layers))

    def _check_inputs(self, appearance: Tensor, motion: Tensor, question: Tensor, question_len: Tensor) -> None:
        nodes, dim = self.config.num_nodes, self.config.vision_dim
        batch = question.size(0) if question.dim() == 2 else -1
        expected = (("appearance", appearance, (batch, nodes, None, dim), f"B x {nodes} x F x {dim}"),
                    ("motion", motion, (batch, nodes, dim), f"B x {nodes} x {dim}"),
                    ("question", question, (None, None), "B x L"),
                    ("question_len", question_len, (batch,), "B"))
        problems = [f"{name} {tuple(tensor.shape)} (want {want})" for name, tensor, shape, want in expected
                    if tensor.dim() != len(shape)
                    or any(size is not None and size != got for size, got in zip(shape, tensor.shape))]
        if problems:
            raise ValueError("DualVGR input shapes do not match the model config: " + "; ".join(problems))
