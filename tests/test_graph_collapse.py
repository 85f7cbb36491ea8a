"""Graph-layer collapse: the node-spread diagnostic, GATv2 attention and the safe common loss."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model import DualVGR, LayerOutput, ModelConfig
from model.diagnostics import (COLLAPSE_THRESHOLD, NodeSpreadMeter, collapsed_layers,
                               layer_name, layer_warning, sample_spread, spread_columns)
from model.dualvgr import GRAPH_ATTENTIONS, GraphAttention
from model.losses import common_loss, hsic_loss
from model.original import original_to_ours, ours_to_original

from test_model import PAPER_STUDENT_PARAMS, PAPER_TEACHER_PARAMS, tiny_config  # noqa: E402  the paper's GAT sizes


def make_inputs(config, batch=3, frames=3, seed=0, same_clips=False):
    generator = torch.Generator().manual_seed(seed)
    clips = 1 if same_clips else config.num_nodes
    appearance = torch.randn(batch, clips, frames, config.vision_dim, generator=generator)
    motion = torch.randn(batch, clips, config.vision_dim, generator=generator)
    if same_clips:
        appearance = appearance.expand(-1, config.num_nodes, -1, -1).contiguous()
        motion = motion.expand(-1, config.num_nodes, -1).contiguous()
    lengths = torch.tensor([3, 5, 2, 4, 1, 5][:batch])
    question = torch.randint(2, config.question_vocab_size, (batch, 5), generator=generator)
    return appearance, motion, question, lengths


def ulp_noise(base: torch.Tensor, nodes: int, seed: int = 0) -> torch.Tensor:
    """(B, 1, d) -> (B, N, d): the same vector on every node, each value off by a few ulps."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.randint(-3, 4, (base.size(0), nodes, base.size(2)), generator=generator).to(base.dtype)
    return base.expand(-1, nodes, -1) * (1 + steps * torch.finfo(base.dtype).eps)


def attention_weights(block: GraphAttention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention (B, H, N, N) of input x (B, N, d), no dropout."""
    return torch.softmax(block.attention_scores(block.project(x), x), dim=-1)


def attention_row_spread(weights: torch.Tensor) -> torch.Tensor:
    """(B, H, N, N) attention -> (B, H): largest difference between any two query rows i.
    0 means every node attends with the same weights (static attention)."""
    return (weights.amax(dim=2) - weights.amin(dim=2)).amax(dim=-1)


def node_spread(layers) -> torch.Tensor:
    """(layers, 4): per graph layer and stream, the clip spread averaged over the batch."""
    return sample_spread(layers).mean(dim=1)


def collapsed_fraction(layers) -> torch.Tensor:
    """(layers,) fraction of the batch whose layer is collapsed, measured by a meter."""
    meter = NodeSpreadMeter()
    meter.update(layers)
    return meter.collapsed_fraction()


def layer_of(appearance, common_appearance, motion, common_motion):
    return LayerOutput(specific_appearance=appearance, common_appearance=common_appearance,
                       specific_motion=motion, common_motion=common_motion)


# ---------------------------------------------------------------------------------- diagnostic


def test_diagnostic_flags_a_collapsed_layer_and_not_a_diverse_one():
    torch.manual_seed(0)
    diverse = [torch.randn(5, 8, 48) for _ in range(4)]
    collapsed = [ulp_noise(torch.randn(5, 1, 48), 8, seed) for seed in range(4)]
    layers = [layer_of(*diverse), layer_of(*collapsed),
              layer_of(diverse[0], collapsed[1], diverse[2], diverse[3])]   # only common appearance
    spread = node_spread(layers)
    assert spread.shape == (3, 4)
    assert bool((spread[0] > 0.5).all())                          # randn: std ≈ 1, mean |x| ≈ 0.8
    assert bool((spread[1] < 1e-6).all()) and bool((spread[1] > 0).all())
    assert collapsed_layers(spread) == [1, 2]
    assert collapsed_fraction(layers).tolist() == [0.0, 1.0, 1.0]
    # one collapsed sample out of five: the batch mean stays high, the fraction shows it
    mixed = [torch.cat([c[:1], d[1:]]) for c, d in zip(collapsed, diverse)]
    assert collapsed_layers(node_spread([layer_of(*mixed)])) == []
    assert collapsed_fraction([layer_of(*mixed)]).tolist() == [pytest.approx(0.2)]
    assert [layer_warning(layer_name(row, 3)) for row in collapsed_layers(spread)] == [
        "graph layer 2: clip features identical across clips; the common loss there is rounding noise",
        "graph layer 3: clip features identical across clips; the common loss there is rounding noise",
    ]
    columns = spread_columns(spread)
    assert len(columns) == 12 and columns["node_spread_g2_common_motion"] < COLLAPSE_THRESHOLD
    assert columns["node_spread_g1_specific_appearance"] == pytest.approx(float(spread[0, 0]))


def test_spread_is_relative_and_batch_averaged_without_a_loop():
    torch.manual_seed(1)
    x = torch.randn(6, 8, 32)
    layer = layer_of(x, x, x, x)
    scaled = layer_of(*(1000 * x for _ in range(4)))
    torch.testing.assert_close(node_spread([layer]), node_spread([scaled]))
    per_sample = torch.stack([node_spread([layer_of(*(x[b:b + 1] for _ in range(4)))])[0]
                              for b in range(x.size(0))])
    torch.testing.assert_close(node_spread([layer])[0], per_sample.mean(dim=0))
    zero = torch.zeros(2, 8, 32)
    assert torch.equal(node_spread([layer_of(zero, zero, zero, zero)]), torch.zeros(1, 4))


def test_diagnostic_on_a_forward_pass_and_meter_over_batches():
    config = tiny_config(graph_layers=3)
    torch.manual_seed(0)
    model = DualVGR(config).eval()
    meter = NodeSpreadMeter()
    with torch.no_grad():
        same = model(*make_inputs(config, same_clips=True))
        diverse = model(*make_inputs(config, batch=4, seed=1))
        meter.update(same)
        meter.update(diverse)
    assert collapsed_layers(node_spread(same)) == [0, 1, 2]
    # different clips stay apart after the first layer (deeper GAT layers of an untrained
    # network may already collapse: that is the phenomenon this diagnostic reports)
    assert 0 not in collapsed_layers(node_spread(diverse))
    assert bool((node_spread(diverse)[0] > 1e-3).all())
    # the meter weights each batch by its size: (3·same + 4·diverse) / 7
    expected = (3 * node_spread(same) + 4 * node_spread(diverse)) / 7
    torch.testing.assert_close(meter.value(), expected)
    columns = meter.columns(config.graph_layers)
    assert sorted(columns) == sorted(
        [f"node_spread_g{g}_{stream}" for g in (1, 2, 3)
         for stream in ("specific_appearance", "common_appearance", "specific_motion", "common_motion")]
        + [f"node_collapsed_g{g}" for g in (1, 2, 3)])
    # every sample of the identical-clips batch is collapsed; the first layer of the diverse one is not
    assert collapsed_fraction(same).tolist() == [1.0, 1.0, 1.0]
    assert collapsed_fraction(diverse)[0] == 0.0
    expected_fraction = (3 * collapsed_fraction(same) + 4 * collapsed_fraction(diverse)) / 7
    torch.testing.assert_close(meter.collapsed_fraction(), expected_fraction)
    assert columns["node_collapsed_g1"] == pytest.approx(3 / 7)
    # several units: layers are named per unit
    assert "node_spread_u2_g1_common_motion" in spread_columns(torch.ones(6, 4), graph_layers=3)


# ---------------------------------------------------------------------------------- attention


def test_config_attention_defaults_to_gat_and_is_checked():
    config = tiny_config()
    assert config.attention == "gat" and dataclasses.asdict(config)["attention"] == "gat"
    with pytest.raises(ValueError, match="attention"):
        tiny_config(attention="gat3")


def test_default_model_is_the_gat_network_unchanged():
    torch.manual_seed(3)
    default = DualVGR(tiny_config()).eval()
    torch.manual_seed(3)
    explicit = DualVGR(tiny_config(attention="gat")).eval()
    names = {name for name, _ in default.named_parameters()}
    assert not any("target_proj" in name or name.endswith(".attn") for name in names)
    gat = default.units[0].layers[0].common_motion
    assert sorted(name for name, _ in gat.named_parameters()) == [
        "attn_bias", "attn_neighbor", "attn_self", "proj.bias", "proj.weight"]
    inputs = make_inputs(default.config)
    with torch.no_grad():
        assert torch.equal(default(*inputs).logits, explicit(*inputs).logits)


def one_branch_gat(kind: str) -> GraphAttention:
    torch.manual_seed(5)
    return GRAPH_ATTENTIONS[kind](tiny_config(module_dim=48, num_heads=4, attention=kind)).eval()


def test_gat_attention_is_static_and_gatv2_is_not():
    x = torch.randn(3, 6, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gat = one_branch_gat("gat").double()
    with torch.no_grad():
        gat.attn_bias.fill_(50.0)           # every raw score positive: LeakyReLU on one branch
        assert bool((gat.attention_scores(gat.project(x), x) > 0).all())
        weights = attention_weights(gat, x)
    assert weights.shape == (3, 4, 6, 6)
    # every query node i attends with the same weights
    torch.testing.assert_close(weights, weights[:, :, :1].expand_as(weights), atol=1e-12, rtol=0)
    assert not torch.allclose(weights[:, :, 0], torch.full_like(weights[:, :, 0], 1 / 6), atol=1e-3)

    gatv2 = one_branch_gat("gatv2").double()
    with torch.no_grad():
        weights_v2 = attention_weights(gatv2, x)
    assert bool((attention_row_spread(weights_v2) > 1e-3).all())
    assert attention_row_spread(weights).max() < 1e-12


def test_gatv2_score_equals_explicit_pairwise_formula():
    gatv2 = one_branch_gat("gatv2")
    with torch.no_grad():
        gatv2.proj.bias.normal_()
        gatv2.target_proj.bias.normal_()
        x = torch.randn(2, 5, 48)
        scores = gatv2.attention_scores(gatv2.project(x), x)
        heads, dh = gatv2.num_heads, gatv2.head_dim
        explicit = torch.empty(2, heads, 5, 5)
        for h in range(heads):
            rows = slice(h * dh, (h + 1) * dh)
            w_s, b_s = gatv2.target_proj.weight[rows], gatv2.target_proj.bias[rows]
            w_n, b_n = gatv2.proj.weight[rows], gatv2.proj.bias[rows]
            for i in range(5):
                for j in range(5):
                    inner = x[:, i] @ w_s.T + b_s + x[:, j] @ w_n.T + b_n
                    explicit[:, h, i, j] = F.leaky_relu(inner, 0.01) @ gatv2.attn[h]
    torch.testing.assert_close(scores, explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module_dim, heads", [(48, 4), (768, 4)])
def test_gatv2_parameter_count_matches_the_documented_formula(module_dim, heads):
    d = module_dim
    with torch.device("meta"):
        gat = GRAPH_ATTENTIONS["gat"](tiny_config(module_dim=d, num_heads=heads))
        gatv2 = GRAPH_ATTENTIONS["gatv2"](tiny_config(module_dim=d, num_heads=heads, attention="gatv2"))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(gat) == d * d + 3 * d + heads
    assert count(gatv2) == 2 * d * d + 3 * d


def test_gatv2_paper_size_model_counts():
    # 4 GAT blocks per graph layer: gatv2 adds (2d² + 3d) − (d² + 3d + H) = d² − H per block
    extra = 768 * 768 - 4
    with torch.device("meta"):
        for layers, gat_total in ((4, PAPER_TEACHER_PARAMS), (1, PAPER_STUDENT_PARAMS)):
            config = ModelConfig(question_vocab_size=4000, answer_vocab_size=1002, num_nodes=8,
                                 graph_layers=layers, attention="gatv2")
            total = sum(p.numel() for p in DualVGR(config).parameters())
            assert total == gat_total + 4 * layers * extra
    assert PAPER_TEACHER_PARAMS + 16 * extra == 39_731_820


def test_original_checkpoints_are_gat_only():
    gat_config = tiny_config()
    torch.manual_seed(0)
    state = DualVGR(gat_config).state_dict()
    original = ours_to_original(state, gat_config)
    v2_config = tiny_config(attention="gatv2")
    with pytest.raises(ValueError, match="attention='gatv2'"):
        original_to_ours(original, v2_config)
    with pytest.raises(ValueError, match="attention='gatv2'"):
        ours_to_original(DualVGR(v2_config).state_dict(), v2_config)


# ---------------------------------------------------------------------------------- safe common loss


def test_safe_common_loss_equals_original_on_diverse_features():
    torch.manual_seed(4)
    x = torch.randn(5, 8, 48) * 3 + 1
    y = torch.randn(5, 8, 48) + 0.5 * x
    torch.testing.assert_close(common_loss(x, y, mode="safe"), common_loss(x, y), atol=1e-6, rtol=1e-6)
    assert common_loss(x, y) > 1e-2
    with pytest.raises(ValueError, match="mode"):
        common_loss(x, y, mode="clever")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safe_common_loss_is_zero_with_zero_gradient_on_collapsed_features(dtype):
    torch.manual_seed(6)
    x = ulp_noise(torch.randn(4, 1, 48).to(dtype), 8, seed=1).requires_grad_()
    y = ulp_noise(torch.randn(4, 1, 48).to(dtype), 8, seed=2).requires_grad_()
    assert common_loss(x, y) > 1e-2                 # the original normalises the rounding noise
    loss = common_loss(x, y, mode="safe")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(y.grad, torch.zeros_like(y))
    assert torch.isfinite(loss)


def test_safe_common_loss_keeps_the_samples_that_differ():
    torch.manual_seed(7)
    diverse_x, diverse_y = torch.randn(1, 8, 48), torch.randn(1, 8, 48)
    x = torch.cat([ulp_noise(torch.randn(1, 1, 48), 8), diverse_x])
    y = torch.cat([ulp_noise(torch.randn(1, 1, 48), 8, 3), diverse_y])
    # the collapsed sample adds nothing; the mean is still over all B·N·N pairs
    torch.testing.assert_close(common_loss(x, y, mode="safe"), common_loss(diverse_x, diverse_y) / 2)
    # one collapsed side is enough to drop the sample: its gram matrix says nothing
    half = torch.cat([diverse_x, diverse_x])
    torch.testing.assert_close(common_loss(half, y, mode="safe"), common_loss(diverse_x, diverse_y) / 2)


# ---------------------------------------------------------------------------------- gradients

SOFTMAX_SHIFT_INVARIANT = ("query_attention.score.bias", "clip_pooling.score.bias")


@pytest.mark.parametrize("attention, mode", [("gatv2", "original"), ("gat", "safe"), ("gatv2", "safe")])
@pytest.mark.parametrize("graph_layers", [4, 1])
def test_every_parameter_gets_a_gradient(attention, mode, graph_layers):
    config = tiny_config(graph_layers=graph_layers, attention=attention)
    torch.manual_seed(8)
    model = DualVGR(config).train()
    output = model(*make_inputs(config, batch=4))
    labels = torch.tensor([1, 0, 5, 10])
    common = torch.stack([common_loss(layer.common_appearance, layer.common_motion, mode=mode)
                          for layer in output.layers]).mean()
    dependence = torch.stack([hsic_loss(layer.specific_appearance, layer.common_appearance)
                              + hsic_loss(layer.specific_motion, layer.common_motion)
                              for layer in output.layers]).mean()
    (F.cross_entropy(output.logits, labels) + 100.0 * common + 1e-6 * dependence).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        if not name.endswith(SOFTMAX_SHIFT_INVARIANT):
            assert param.grad.abs().sum() > 0, name
