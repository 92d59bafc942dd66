"""The Transfiner refinement against an official-style reference, and its invariances."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from tests.model.support import (
    CHANNELS,
    SCALES,
    build_refiner,
    make_inputs,
    run,
    tiny_transfiner_config,
)
from transfiner.model.modeling.poolers import assign_fpn_levels
from transfiner.model.modeling.refiner import (
    LEVEL_SIZES,
    PointQuadtree,
    SequenceEncoder,
    TransfinerRefiner,
    linear_relu,
    plan_chunks,
    propagate,
    sine_position_table,
    tokens_per_box,
    write_nodes,
)


def official_pos_embed(height: int, width: int, channels: int) -> torch.Tensor:
    """The official ``pos_embed`` (DETR sine, normalised cumsum), written out from its formula."""
    ones = torch.ones(1, height, width)
    y_embed = ones.cumsum(1) / (height + 1e-6) * 2 * math.pi
    x_embed = ones.cumsum(2) / (width + 1e-6) * 2 * math.pi
    half = channels // 2
    dim_t = 10000 ** (2 * (torch.arange(half, dtype=torch.float32) // 2) / half)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3)[0]  # [H, W, C]


class OfficialEncoderLayer(nn.Module):
    """The official post-norm layer on ``nn.MultiheadAttention`` (sequence-first)."""

    def __init__(self, d_model: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=0.0)
        self.linear1 = nn.Linear(d_model, ffn)
        self.linear2 = nn.Linear(ffn, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, value=src)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


def official_refine(refiner: TransfinerRefiner, features, boxes, batch_index, context, coarse, incoherence, thresholds):
    """Mask Transfiner inference as the official code does it: one box at a time, thresholded
    node sets (``nonzero``), dense RoIAligns at 28/56/112 and variable-length sequences."""
    cfg_layers = refiner.sequence_encoder.layers
    official_layers = []
    for layer in cfg_layers:
        d_model = layer.linear1.in_features
        off = OfficialEncoderLayer(d_model, layer.self_attn.num_heads, layer.linear1.out_features)
        off.load_state_dict(layer.state_dict())  # the official parameter names load as they are
        official_layers.append(off.eval())
    d_model = refiner.node_encoder.fuse.out_features
    box_levels = assign_fpn_levels(boxes)
    outputs = []
    for r in range(len(boxes)):
        roi = torch.cat((batch_index[r : r + 1, None].float(), boxes[r : r + 1]), dim=1)
        dense, probs, masks, pos = [], [], [], []
        inc = incoherence[r][None, None]
        for shift, (size, threshold) in enumerate(zip(LEVEL_SIZES, thresholds), start=1):
            level = max(int(box_levels[r]) - shift, 0)
            dense.append(roi_align(features[level], roi, size, SCALES[level], 0, aligned=True)[0])
            inc_l = F.interpolate(inc, size=(size, size))[0, 0]  # nearest, as official
            masks.append(inc_l >= threshold)
            p = (
                coarse[r][None, None]
                if size == 28
                else F.interpolate(coarse[r][None, None], (size, size), mode="bilinear")
            )
            probs.append(p[0, 0])
            pos.append(official_pos_embed(size, size, d_model))
        ctx_probs = F.interpolate(coarse[r][None, None], (14, 14), mode="bilinear")[0, 0]
        feats = [torch.cat((context[r].flatten(1).T, ctx_probs.reshape(-1, 1)), dim=1)]
        positions = [official_pos_embed(14, 14, d_model).reshape(-1, d_model)]
        for d, p, m, ps in zip(dense, probs, masks, pos):
            sel = torch.nonzero(m, as_tuple=True)
            feats.append(torch.cat((d.permute(1, 2, 0)[sel], p[sel][:, None]), dim=1))
            positions.append(ps[sel])
        tokens = refiner.node_encoder.fuse(torch.cat(feats))[:, None]  # [L, 1, d]
        position = torch.cat(positions)[:, None]
        for layer in official_layers:
            tokens = layer(tokens, position)
        decoded = refiner.pixel_decoder(tokens[:, 0])  # [L]
        counts = [196] + [int(m.sum()) for m in masks]
        _, out28, out56, out112 = decoded.split(counts)
        grid = coarse[r].clone()
        grid[masks[0]] = out28
        grid = F.interpolate(grid[None, None], (56, 56), mode="bilinear", align_corners=True)[0, 0]
        grid[masks[1]] = out56
        grid = F.interpolate(grid[None, None], (112, 112), mode="bilinear", align_corners=True)[0, 0]
        grid[masks[2]] = out112
        outputs.append(grid)
    return torch.stack(outputs)


def needed_cells(incoherence: torch.Tensor, thresholds) -> tuple[int, int, int]:
    """The smallest k per level that covers every above-threshold cell of every box."""
    return tuple(max(1, int((incoherence.flatten(1) >= t).sum(1).max())) for t in thresholds)


def test_sine_table_matches_official_pos_embed():
    for size in (14, 28, 56, 112):
        table = sine_position_table(size, 256)
        official = official_pos_embed(size, size, 256).reshape(size * size, 256)
        torch.testing.assert_close(table, official, rtol=0, atol=1e-6)


@pytest.mark.parametrize("thresholds", [(0.05, 0.3, 0.6), (1e-6, 0.125, 0.8)])
def test_batched_refiner_equals_official_per_box_reference(thresholds):
    """With k covering every above-threshold cell, top-k + threshold mask is exactly the
    official threshold selection (the next test shows such a k equals k = 784)."""
    inputs = make_inputs(seed=1, count=6)
    refiner = build_refiner(thresholds, needed_cells(inputs[5], thresholds))
    ours = run(refiner, *inputs)
    with torch.no_grad():
        reference = official_refine(refiner, *inputs, thresholds)
    assert ours.shape == (6, 112, 112)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=2e-5)
    # The refinement really changed the masks (the comparison is not between two copies of coarse).
    plain = F.interpolate(inputs[4][:, None], (112, 112), mode="bilinear")[:, 0]
    assert (ours - plain).abs().max() > 0.05


def test_bounded_selection_equals_threshold_selection_when_k_is_large_enough():
    """A small k that still covers every above-threshold cell gives the same masks as k = 784."""
    thresholds = (0.05, 0.3, 0.6)
    inputs = make_inputs(seed=2, count=2)
    needed = needed_cells(inputs[5], thresholds)
    assert needed[1] < 784 and needed[2] < 784
    full = run(build_refiner(thresholds, (784, 784, 784)), *inputs)
    bounded = run(build_refiner(thresholds, (784, needed[1], needed[2])), *inputs)
    torch.testing.assert_close(bounded, full, rtol=1e-4, atol=2e-5)
    # One cell fewer than needed at the 112 level changes some box: the bound is real.
    too_small = run(build_refiner(thresholds, (784, needed[1], needed[2] - 1)), *inputs)
    assert (too_small - full).abs().max() > 1e-4


def test_quadtree_selects_top_k_cells_above_threshold_and_their_children():
    g = torch.Generator().manual_seed(3)
    incoherence = torch.rand(4, 28, 28, generator=g)
    tree = PointQuadtree(thresholds=(0.0, 0.5, 0.9), max_cells=(784, 100, 20))
    levels = tree(incoherence)
    assert [lv.nodes.shape[1] for lv in levels] == [784, 400, 320]
    for lv, t, k in zip(levels[1:], (0.5, 0.9), (100, 20)):
        c = lv.size // 28
        for r in range(4):
            scores = incoherence[r].flatten()
            expected = set(scores.topk(k).indices.tolist())
            assert set(lv.cells[r].tolist()) == expected
            valid_cells = {int(cell) for cell in lv.cells[r] if scores[cell] >= t}
            # Every valid node is a child of a valid cell and vice versa (c*c children each).
            nodes = lv.nodes[r][lv.valid[r]]
            parents = {(int(n) // lv.size // c) * 28 + (int(n) % lv.size) // c for n in nodes}
            assert parents == valid_cells
            assert len(nodes) == len(valid_cells) * c * c == len(set(nodes.tolist()))


def test_quadtree_nodes_equal_nearest_upsampled_threshold_maps():
    """The official code thresholds nearest-upsampled copies of the 28x28 map."""
    g = torch.Generator().manual_seed(4)
    incoherence = torch.rand(3, 28, 28, generator=g)
    levels = PointQuadtree((0.2, 0.4, 0.7), (784, 784, 784))(incoherence)
    for lv, t in zip(levels, (0.2, 0.4, 0.7)):
        upsampled = F.interpolate(incoherence[:, None], size=(lv.size, lv.size))[:, 0] >= t
        for r in range(3):
            ours = set(lv.nodes[r][lv.valid[r]].tolist())
            official = set(torch.nonzero(upsampled[r].flatten()).flatten().tolist())
            assert ours == official


def test_refining_together_equals_refining_alone():
    refiner = build_refiner((1e-6, 0.125, 0.8), (784, 196, 64))
    features, boxes, batch_index, context, coarse, incoherence = make_inputs(seed=5, count=7)
    together = run(refiner, features, boxes, batch_index, context, coarse, incoherence)
    for r in range(7):
        s = slice(r, r + 1)
        alone = run(refiner, features, boxes[s], batch_index[s], context[s], coarse[s], incoherence[s])
        torch.testing.assert_close(alone[0], together[r], rtol=1e-4, atol=2e-5)


def test_padding_never_changes_outputs():
    """Padded slots hold arbitrary values; changing them, or adding more of them, changes nothing."""
    torch.manual_seed(6)
    encoder = SequenceEncoder(tiny_transfiner_config()).eval()
    tokens = torch.randn(3, 50, 16)
    pos = torch.randn(3, 50, 16)
    padding = torch.rand(3, 50) < 0.4
    padding[:, :5] = False
    with torch.no_grad():
        out = encoder(tokens, pos, padding)
        garbage = torch.where(padding[..., None], torch.randn(3, 50, 16) * 100, tokens)
        out_garbage = encoder(garbage, pos, padding)
        longer = encoder(
            torch.cat((tokens, torch.randn(3, 30, 16)), 1),
            torch.cat((pos, torch.randn(3, 30, 16)), 1),
            torch.cat((padding, torch.ones(3, 30, dtype=torch.bool)), 1),
        )
    keep = ~padding
    torch.testing.assert_close(out_garbage[keep], out[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(longer[:, :50][keep], out[keep], rtol=1e-5, atol=1e-5)

    # End to end: a larger k only adds padding when the threshold already limits the nodes.
    inputs = make_inputs(seed=7, count=4)
    tight = run(build_refiner((1e-6, 0.9, 0.97), (784, 100, 60)), *inputs)
    loose = run(build_refiner((1e-6, 0.9, 0.97), (784, 300, 200)), *inputs)
    needed = needed_cells(inputs[5], (1e-6, 0.9, 0.97))
    assert needed[1] <= 100 and needed[2] <= 60
    torch.testing.assert_close(tight, loose, rtol=1e-4, atol=2e-5)


def test_write_nodes_only_touches_valid_nodes():
    g = torch.Generator().manual_seed(8)
    levels = PointQuadtree((0.3, 0.5, 0.8), (784, 50, 10))(torch.rand(2, 28, 28, generator=g))
    for lv in levels:
        grid = torch.rand(2, lv.size * lv.size, generator=g)
        values = torch.full(lv.nodes.shape, 7.0)
        written = write_nodes(grid, lv, values)
        changed = written != grid
        expected = torch.zeros_like(changed)
        expected.scatter_(1, lv.nodes, lv.valid)
        assert torch.equal(changed, expected)
        assert torch.all(written[changed] == 7.0)


def test_propagation_without_corrections_is_the_upsampling_chain():
    g = torch.Generator().manual_seed(9)
    coarse = torch.rand(3, 28, 28, generator=g)
    levels = PointQuadtree((0.3, 0.5, 0.8), (784, 60, 20))(torch.rand(3, 28, 28, generator=g))
    # "Refined" values equal to what is already there: propagation must be plain upsampling.
    grid28 = coarse.flatten(1)
    grid56 = F.interpolate(coarse[:, None], (56, 56), mode="bilinear", align_corners=True)
    grid112 = F.interpolate(grid56, (112, 112), mode="bilinear", align_corners=True)
    refined = [
        grid28.gather(1, levels[0].nodes),
        grid56.flatten(1).gather(1, levels[1].nodes),
        grid112.flatten(1).gather(1, levels[2].nodes),
    ]
    torch.testing.assert_close(propagate(coarse, levels, refined), grid112[:, 0])
    # A correction at one 112-level node changes exactly that pixel.
    refined[2] = refined[2].clone()
    r, j = torch.nonzero(levels[2].valid)[0].tolist()
    refined[2][r, j] = 5.0
    out = propagate(coarse, levels, refined)
    diff = (out != grid112[:, 0]).nonzero().tolist()
    node = int(levels[2].nodes[r, j])
    assert diff == [[r, node // 112, node % 112]]


def test_zero_boxes():
    refiner = build_refiner((1e-6, 0.125, 0.8), (784, 196, 64))
    features, *_ = make_inputs(seed=10, count=1)
    empty = torch.zeros(0, 4)
    out = run(
        refiner,
        features,
        empty,
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, CHANNELS, 14, 14),
        torch.zeros(0, 28, 28),
        torch.zeros(0, 28, 28),
    )
    assert out.shape == (0, 112, 112)


# ----------------------------------------------------------------------------- nodes, not caps


def saturating_incoherence(seed: int, count: int) -> torch.Tensor:
    """[count, 28, 28] maps like a checkpoint whose incoherence saturates: every cell above the
    56-level threshold, and a blob of cells above the 112-level one whose size varies per box
    (the official code then refines 4,000-6,000 tokens a box)."""
    g = torch.Generator().manual_seed(seed)
    incoherence = 0.2 + 0.5 * torch.rand(count, 28, 28, generator=g)  # above 0.125, below 0.8
    for r in range(count):
        side = 2 + 3 * r
        top, left = torch.randint(0, 28 - side, (2,), generator=g).tolist()
        incoherence[r, top : top + side, left : left + side] = 0.9
    return incoherence


def test_covering_caps_equal_official_selection_when_incoherence_saturates():
    """Caps of 784 everywhere (what convert-official stores) give the official masks where the
    default caps (784, 196, 64) would drop most 56- and 112-level nodes."""
    thresholds = (1e-6, 0.125, 0.8)
    features, boxes, batch_index, context, coarse, _ = make_inputs(seed=11, count=3)
    incoherence = saturating_incoherence(seed=11, count=3)
    inputs = (features, boxes, batch_index, context, coarse, incoherence)
    assert needed_cells(incoherence, thresholds)[1] == 784  # the default cap of 196 binds
    covering = build_refiner(thresholds, (784, 784, 784))
    ours = run(covering, *inputs)
    with torch.no_grad():
        reference = official_refine(covering, *inputs, thresholds)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=2e-5)
    capped = run(build_refiner(thresholds, (784, 196, 64)), *inputs)
    assert (capped - reference).abs().max() > 0.05


def test_trimming_changes_no_output():
    """Chunks trimmed to their real node counts equal one pass padded to the caps, and the
    trimmed chunks really are shorter than the caps."""
    refiner = build_refiner((1e-6, 0.3, 0.8), (784, 784, 784))
    features, boxes, batch_index, context, coarse, _ = make_inputs(seed=12, count=6)
    incoherence = saturating_incoherence(seed=12, count=6) * torch.linspace(0.4, 1.2, 6)[:, None, None]
    inputs = (features, boxes, batch_index, context, coarse, incoherence.clamp(max=1))
    refiner.tokens_per_chunk = 12_000  # several chunks of different lengths
    trimmed = run(refiner, *inputs)
    with torch.no_grad():
        padded = refiner.refine_chunk(
            features, boxes, batch_index, assign_fpn_levels(boxes), context, coarse, refiner.quadtree(inputs[5])
        )
    torch.testing.assert_close(trimmed, padded, rtol=1e-4, atol=2e-5)

    chunks = refiner.chunks(inputs[5])
    assert len(chunks) > 1
    assert sorted(torch.cat([index for index, _ in chunks]).tolist()) == list(range(6))
    for index, levels in chunks:
        assert len(index) * (196 + sum(level.nodes.shape[1] for level in levels)) <= 12_000 or len(index) == 1
        for level in levels:
            # Every valid node survived trimming, and at least one box fills the kept slots.
            full = refiner.quadtree(inputs[5])[LEVEL_SIZES.index(level.size)]
            assert torch.equal(level.valid.sum(1), full.valid[index].sum(1))
            assert level.cells.shape[1] == int(level.cell_valid.sum(1).max())
            assert level.cells.shape[1] < 784 or level.size == 28


def test_chunk_plan_respects_the_token_budget():
    g = torch.Generator().manual_seed(13)
    counts = torch.randint(0, 785, (50, 3), generator=g).tolist()
    counts[7] = [784, 784, 784]  # 16,660 tokens: two would exceed the budget, so alone in its chunk
    plan = plan_chunks(counts, token_budget=30_000, max_boxes=8)
    assert sorted(r for members, _ in plan for r in members) == list(range(50))
    for members, slots in plan:
        assert slots == tuple(max(counts[r][level] for r in members) for level in range(3))
        assert len(members) <= 8
        assert len(members) == 1 or len(members) * tokens_per_box(slots) <= 30_000
    assert ([7], (784, 784, 784)) in plan
    assert plan_chunks([], 1000, 8) == []
    # Longest box first, so boxes of similar length share a chunk.
    visited = [tokens_per_box(counts[r]) for members, _ in plan for r in members]
    assert visited == sorted(visited, reverse=True)


def test_chunk_plan_evens_out_a_small_last_chunk():
    # 100 boxes of 4,116 tokens at a 90-box budget: as few passes as filling each one (2), but
    # 50 + 50 instead of 90 + 10.
    counts = [[196, 196, 196]] * 100
    budget = 90 * tokens_per_box(counts[0])
    plan = plan_chunks(counts, token_budget=budget, max_boxes=128)
    assert sorted(len(members) for members, _ in plan) == [50, 50]
    assert sorted(r for members, _ in plan for r in members) == list(range(100))
    # Mixed lengths: never more chunks than filling each to the limits, none under half the largest.
    g = torch.Generator().manual_seed(5)
    for n in (17, 100, 129, 300):
        counts = torch.randint(60, 300, (n, 3), generator=g).tolist()
        plan = plan_chunks(counts, token_budget=120_000, max_boxes=64)
        filled, members = 0, []
        for r in sorted(range(n), key=lambda r: -tokens_per_box(counts[r])):
            grown = [max(counts[m][level] for m in members + [r]) for level in range(3)]
            if members and (len(members) == 64 or (len(members) + 1) * tokens_per_box(grown) > 120_000):
                filled, members = filled + 1, []
            members.append(r)
        assert len(plan) == filled + 1
        sizes = [len(m) for m, _ in plan]
        assert 2 * min(sizes) >= max(sizes)
        for chunk, slots in plan:
            assert len(chunk) == 1 or len(chunk) * tokens_per_box(slots) <= 120_000


def test_fused_feed_forward_activation_equals_relu_of_linear():
    """The matmul-epilogue ReLU (inference) gives relu(linear(x)) exactly, in fp32 and under
    bf16 autocast, for empty inputs too; with gradients on, it falls back and still trains."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 96)
    for shape in ((3, 50, 32), (0, 7, 32), (2, 0, 32)):
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(linear_relu(linear, x), F.relu(linear(x)))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fused, plain = linear_relu(linear, x), F.relu(linear(x))
            assert fused.dtype == plain.dtype == torch.bfloat16
            assert torch.equal(fused, plain)
    x = torch.randn(2, 5, 32, requires_grad=True)
    linear_relu(linear, x).sum().backward()
    assert x.grad is not None and linear.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_feed_forward_activation_on_cuda():
    """cuBLASLt's bias+ReLU epilogue against the separate operators, in fp32 and bf16."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 2048).cuda()
    x = torch.randn(4, 1000, 256, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(linear_relu(linear, x), F.relu(linear(x)), rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused, plain = linear_relu(linear, x), F.relu(linear(x))
        assert fused.dtype == plain.dtype == torch.bfloat16
        torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=2e-2)
        assert (fused >= 0).all()


def test_packed_sequences_give_the_padded_encoders_outputs():
    """The encoder on packed real tokens equals it on padded sequences with a key mask, at
    every real token (padding outputs are zeros); and a whole refiner gives the same masks, so
    also against the official per-box reference (the test above)."""
    torch.manual_seed(9)
    encoder = SequenceEncoder(tiny_transfiner_config()).eval()
    tokens, pos = torch.randn(4, 60, 16), torch.randn(4, 60, 16)
    padding = torch.rand(4, 60) < 0.5
    padding[:, :5] = False  # context tokens are never padding
    padding[2, 5:] = True  # a sequence of context tokens only
    with torch.no_grad():
        padded = encoder(tokens, pos, padding)
        encoder.packed = True
        packed = encoder(tokens, pos, padding)
    keep = ~padding
    torch.testing.assert_close(packed[keep], padded[keep], rtol=1e-5, atol=1e-5)
    assert (packed[padding] == 0).all()

    thresholds = (0.05, 0.3, 0.6)
    inputs = make_inputs(seed=1, count=6)
    refiner = build_refiner(thresholds, needed_cells(inputs[5], thresholds))
    reference = run(refiner, *inputs)
    refiner.sequence_encoder.packed = True
    torch.testing.assert_close(run(refiner, *inputs), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_attention_on_cuda_matches_the_masked_kernel():
    """FlashAttention's variable-length kernel (bf16) against SDPA with the key mask."""
    torch.manual_seed(0)
    encoder = (
        SequenceEncoder(dataclasses.replace(tiny_transfiner_config(), d_model=256, num_heads=4, dim_feedforward=512))
        .eval()
        .cuda()
    )
    tokens, pos = torch.randn(8, 700, 256, device="cuda"), torch.randn(8, 700, 256, device="cuda")
    padding = torch.rand(8, 700, device="cuda") < 0.3
    padding[:, :196] = False
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        padded = encoder(tokens, pos, padding).float()
        encoder.packed = True
        packed = encoder(tokens, pos, padding).float()
    keep = ~padding
    torch.testing.assert_close(packed[keep], padded[keep], rtol=0.05, atol=0.05)
