"""The Transfiner refinement: point quadtree, node encoder, sequence encoder, pixel decoder, propagation.

- Every detection of every image is refined, in chunks of boxes sized by a token budget
  (``tokens_per_chunk``) so that memory does not grow with the detection count. Each box becomes one
  padded token sequence (196 context tokens + the selected nodes of the three quadtree levels),
  boxes are stacked along the batch dimension, and a key-padding mask hides the unselected slots, so
  the result of a box never depends on the other boxes or on how much padding it got.
- Nodes are cells of three fixed grids inside the box: 28x28, 56x56 and 112x112. Because the
  official code thresholds *nearest-upsampled* copies of the single 28x28 incoherence map, the nodes
  of the 56 (112) level are exactly the 2x2 (4x4) children of chosen 28-cells. Selection is
  therefore done once, on the 28x28 map: per level a fixed-size top-k of cells (``max_cells``),
  combined with that level's threshold as a validity mask. When ``max_cells`` is at least the number
  of cells above the threshold (always with 784, the default for official weights), the selected
  node set is exactly the official one.
- Compute follows the nodes, not the caps: in eager mode the boxes are sorted by their real token
  count, grouped into chunks that fit the budget, and each chunk's levels are trimmed to the largest
  real cell count of the chunk (``trim_level``), so a box with 300 nodes does not pay for the caps.
  A traced graph (TorchScript, ONNX) has static shapes: one chunk, padded to the caps,
  ``L = 196 + k28 + 4 k56 + 16 k112`` tokens per box (16,660 with covering caps). Attention runs
  through ``scaled_dot_product_attention`` whose fused kernels keep O(L) memory per head (no L x L
  attention matrix), so a chunk's memory is linear in its tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transfiner.model.config import TransfinerConfig
from transfiner.model.modeling.poolers import multilevel_roi_align

# Side of the node grid at each quadtree level, and of the context grid.
LEVEL_SIZES = (28, 56, 112)
CONTEXT_SIZE = 14


def sine_position_table(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's sine embedding of every cell of a ``grid x grid`` box grid -> [grid * grid, dim].

    As the official ``pos_embed``: positions are the 1-based row/column normalised by the grid
    size, so a position is relative to its RoI; the first half encodes y, the second x, with
    sin/cos interleaved.
    """
    half = dim // 2
    coords = torch.arange(1, grid + 1, dtype=torch.float32) / (grid + 1e-6) * (2 * math.pi)
    dim_t = temperature ** (2 * (torch.arange(half, dtype=torch.float32) // 2) / half)
    angles = coords[:, None] / dim_t  # [grid, half]
    embed = torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)
    pos_y = embed[:, None, :].expand(grid, grid, half)
    pos_x = embed[None, :, :].expand(grid, grid, half)
    return torch.cat((pos_y, pos_x), dim=2).reshape(grid * grid, dim)


@dataclass
class QuadtreeLevel:
    """The nodes of one quadtree level for every box.

    cells: [R, k] indices of the chosen 28-grid cells (row * 28 + col); cell_valid: [R, k] bool,
    the cells above this level's threshold; nodes: [R, k * c * c] indices into this level's
    ``S x S`` grid (c = S / 28), the children of ``cells`` in (cell, child row, child col) order;
    valid: [R, k * c * c] bool, ``cell_valid`` repeated for each child.
    """

    size: int
    cells: torch.Tensor
    cell_valid: torch.Tensor
    nodes: torch.Tensor
    valid: torch.Tensor


def child_offsets(size: int) -> torch.Tensor:
    """[28 * 28, c * c]: the ``size``-grid indices of the children of every 28-cell."""
    c = size // LEVEL_SIZES[0]
    cell = torch.arange(LEVEL_SIZES[0] ** 2)
    row, col = cell // LEVEL_SIZES[0], cell % LEVEL_SIZES[0]
    sub = torch.arange(c)
    rows = row[:, None, None] * c + sub[None, :, None]
    cols = col[:, None, None] * c + sub[None, None, :]
    return (rows * size + cols).reshape(-1, c * c)


class PointQuadtree(nn.Module):
    """Chooses the nodes of the three quadtree levels from the 28x28 incoherence map."""

    def __init__(self, thresholds: tuple[float, float, float], max_cells: tuple[int, int, int]):
        super().__init__()
        cells = LEVEL_SIZES[0] ** 2
        if any(not 0 < k <= cells for k in max_cells):
            raise ValueError(f"max_cells must be in 1..{cells}, got {max_cells}")
        self.thresholds = thresholds
        self.max_cells = max_cells
        for size in LEVEL_SIZES[1:]:
            self.register_buffer(f"children_{size}", child_offsets(size), persistent=False)

    def forward(self, incoherence: torch.Tensor, random_order: bool = False) -> list[QuadtreeLevel]:
        """incoherence [R, 28, 28] probabilities -> one ``QuadtreeLevel`` per level.

        At inference the k most incoherent cells are taken. With ``random_order`` (training, as
        the official random node sampling) k random cells among those above the threshold are.
        """
        scores = incoherence.flatten(1)  # [R, 784]
        levels = []
        for size, threshold, k in zip(LEVEL_SIZES, self.thresholds, self.max_cells):
            above = scores >= threshold
            if k == scores.shape[1]:
                # Every cell is a candidate: keep raster order, no sort needed.
                cells = torch.arange(k, device=scores.device).expand(scores.shape[0], k)
            elif random_order:
                cells = (torch.rand_like(scores) + above.to(scores.dtype)).topk(k, dim=1).indices
            else:
                cells = scores.topk(k, dim=1).indices
            levels.append(self.level(size, cells, above.gather(1, cells)))
        return levels

    def level(self, size: int, cells: torch.Tensor, cell_valid: torch.Tensor) -> QuadtreeLevel:
        """The ``QuadtreeLevel`` of grid ``size`` whose nodes are the children of ``cells`` [R, k]."""
        c = size // LEVEL_SIZES[0]
        if c == 1:
            return QuadtreeLevel(size, cells, cell_valid, cells, cell_valid)
        children = getattr(self, f"children_{size}")  # [784, c*c]
        nodes = children[cells].flatten(1)  # [R, k*c*c]
        valid = cell_valid[:, :, None].expand(-1, -1, c * c).flatten(1)
        return QuadtreeLevel(size, cells, cell_valid, nodes, valid)

    def trim_level(self, level: QuadtreeLevel, boxes: torch.Tensor, slots: int) -> QuadtreeLevel:
        """``level`` for the boxes ``boxes`` [n] (indices), with ``slots`` cells per box.

        Valid cells move to the front (stable, so they keep their order) and the rest is cut off:
        with ``slots`` at least every one of these boxes' valid cell count, no valid node is lost,
        and only padding, which never changes an output, is dropped.
        """
        cell_valid = level.cell_valid[boxes]  # [n, k]
        order = torch.sort((~cell_valid).to(torch.uint8), dim=1, stable=True).indices[:, :slots]
        return self.level(level.size, level.cells[boxes].gather(1, order), cell_valid.gather(1, order))


def tokens_per_box(cells: tuple[int, ...] | list[int]) -> int:
    """Sequence length of a box with ``cells`` 28-cells per level: context + every level's nodes."""
    return CONTEXT_SIZE**2 + sum(k * (size // LEVEL_SIZES[0]) ** 2 for k, size in zip(cells, LEVEL_SIZES))


def plan_chunks(
    cell_counts: list[list[int]], token_budget: int, max_boxes: int
) -> list[tuple[list[int], tuple[int, ...]]]:
    """Groups boxes into chunks: -> [(box indices, cells per level to keep)].

    - ``cell_counts[r]`` is box r's count of valid cells per level. Boxes go longest first, so boxes
      of similar length share a chunk and little padding is computed; a chunk grows while (its
      boxes) x (its padded length, every level at the chunk's largest count) stays within
      ``token_budget`` and it holds at most ``max_boxes``. A box longer than the budget gets a chunk
      of its own.
    - As few chunks as that, evened out: when the last would hold less than half as many boxes as
      the largest (100 boxes at a 90-box budget: 90 + 10), the box cap is lowered to the smallest
      that still needs no more chunks (50 + 50). A pass of a few boxes fills a GPU poorly: each of
      its boxes costs more (docs/gpu-performance.md: the token sweep).
    """
    order = sorted(range(len(cell_counts)), key=lambda r: -tokens_per_box(cell_counts[r]))
    chunks = _next_fit(cell_counts, order, token_budget, max_boxes)
    sizes = [len(members) for members, _ in chunks]
    if len(chunks) < 2 or 2 * sizes[-1] >= max(sizes):
        return chunks
    # Fewest chunks is monotone in the cap (next-fit is optimal for contiguous chunks of one
    # order), so the smallest cap that keeps their number is found by bisection.
    low, high = -(-len(order) // len(chunks)), max(sizes)
    while low < high:
        middle = (low + high) // 2
        if len(_next_fit(cell_counts, order, token_budget, middle)) <= len(chunks):
            high = middle
        else:
            low = middle + 1
    return _next_fit(cell_counts, order, token_budget, low)


def _next_fit(
    cell_counts: list[list[int]], order: list[int], token_budget: int, max_boxes: int
) -> list[tuple[list[int], tuple[int, ...]]]:
    """``plan_chunks`` before evening out: each chunk as large as the limits allow, in ``order``."""
    chunks: list[tuple[list[int], tuple[int, ...]]] = []
    members: list[int] = []
    slots: tuple[int, ...] = ()
    for r in order:
        grown = tuple(max(a, b) for a, b in zip(slots, cell_counts[r])) if members else tuple(cell_counts[r])
        if members and (len(members) >= max_boxes or (len(members) + 1) * tokens_per_box(grown) > token_budget):
            chunks.append((members, slots))
            members, grown = [], tuple(cell_counts[r])
        members.append(r)
        slots = grown
    if members:
        chunks.append((members, slots))
    return chunks


class NodeEncoder(nn.Module):
    """Fuses a node's RoI feature and its coarse mask probability into one token.

    Official name ``encoder.conv_fuse`` (a 1x1 conv, i.e. per-token linear). The positional
    encoding is added inside every attention layer (to queries and keys), as the official code.
    """

    def __init__(self, in_channels: int, d_model: int) -> None:
        super().__init__()
        self.fuse = nn.Linear(in_channels + 1, d_model)

    def forward(self, features: torch.Tensor, coarse_probs: torch.Tensor) -> torch.Tensor:
        """features [R, L, C], coarse_probs [R, L] -> tokens [R, L, d_model]."""
        return self.fuse(torch.cat((features, coarse_probs[..., None].to(features.dtype)), dim=2))


class MultiheadSelfAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameters, on fused SDPA kernels.

    Positions are added to queries and keys only. ``padding_mask`` [R, L] is True for slots to
    ignore; every sequence has unmasked context tokens, so no row is fully masked.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor | PackedSequences) -> torch.Tensor:
        """x, pos [R, L, d] with padding_mask [R, L]; or packed tokens [T, d] with their
        ``PackedSequences``."""
        d_model = x.shape[-1]
        w_qk, w_v = self.in_proj_weight.split((2 * d_model, d_model))
        b_qk, b_v = self.in_proj_bias.split((2 * d_model, d_model))
        q, k = F.linear(x + pos, w_qk, b_qk).chunk(2, dim=-1)
        v = F.linear(x, w_v, b_v)
        if isinstance(padding_mask, PackedSequences):
            heads = (x.shape[0], self.num_heads, d_model // self.num_heads)
            out = packed_attention(q.reshape(heads), k.reshape(heads), v.reshape(heads), padding_mask)
            return self.out_proj(out.reshape(x.shape))
        batch, length, _ = x.shape
        heads = (batch, length, self.num_heads, d_model // self.num_heads)
        q, k, v = (t.reshape(heads).transpose(1, 2) for t in (q, k, v))  # [R, h, L, d/h]
        if torch.onnx.is_in_onnx_export():
            out = exportable_attention(q, k, v, padding_mask)
        else:
            # With a boolean mask SDPA picks cuDNN's fused kernel on Hopper GPUs in bf16 (measured
            # as fast as FlashAttention with the mask folded into the head dimension), and its
            # fused CPU kernel here.
            keep = ~padding_mask[:, None, None, :]  # [R, 1, 1, L] True = attend
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
            )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, d_model))


@dataclass
class PackedSequences:
    """The real (unpadded) tokens of R padded sequences [R, L], one sequence after another."""

    index: torch.Tensor  # [T] positions of the real tokens in the flattened [R * L]
    starts: torch.Tensor  # [R + 1] int32: where each sequence starts in [T], then T
    longest: int  # a bound on the longest sequence (L)

    @classmethod
    def from_padding(cls, padding_mask: torch.Tensor) -> PackedSequences:
        """padding_mask [R, L], True = padding."""
        real = ~padding_mask
        starts = F.pad(real.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        return cls(torch.nonzero(real.flatten()).squeeze(1), starts, padding_mask.shape[1])


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sequences: PackedSequences) -> torch.Tensor:
    """Attention within each packed sequence: q, k, v [T, h, d] -> [T, h, d].

    On CUDA in half precision, FlashAttention's variable-length kernel: no mask and no padded
    queries or keys. Elsewhere (the CPU, float32) one SDPA call per sequence, a reference."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, sequences.starts, sequences.starts, sequences.longest, sequences.longest)
    bounds = sequences.starts.tolist()
    out = [
        F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(out) if out else torch.empty_like(q)


# Queries per attention block in exported graphs (see ``exportable_attention``). ONNX Runtime's
# peak memory follows the block's score tensor [R, h, block, L] until other tensors dominate; 64
# is where that happens for the default model (README, "Benchmarks": scripts/bench_onnx_memory.py).
EXPORT_QUERY_BLOCK = 64


def exportable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Attention as two MatMuls and a Softmax, for ONNX graphs.

    - q, k, v [R, h, L, d]; padding_mask [R, L] True = ignore that key.
    - Why: ONNX (opset 17) has no fused attention, and the exporter's SDPA translation adds NaN
      guards over the whole [R, h, L, L] score tensor.
    - The key-padding mask rides inside the first MatMul: queries get an extra component 1 and keys
      an extra component 0 (attend) or -1e9 (ignore), so no pass over the score tensor is spent on
      masking (every sequence has unmasked context tokens, so no row is all masked).
    - Queries go in blocks of ``EXPORT_QUERY_BLOCK``, so the largest live tensor is [R, h, block, L]
      instead of [R, h, L, L]; L is static (fixed top-k), so the blocks are unrolled at export time.
    """
    heads = q.shape[1]
    bias = torch.zeros_like(padding_mask, dtype=q.dtype).masked_fill(padding_mask, -1e9)  # [R, L]
    bias = bias[:, None, :, None].expand(-1, heads, -1, 1)  # [R, h, L, 1]
    queries = torch.cat((q * (q.shape[-1] ** -0.5), torch.ones_like(q[..., :1])), dim=3)  # [R, h, L, d+1]
    keys = torch.cat((k, bias), dim=3).transpose(2, 3)  # [R, h, d+1, L]
    blocks = []
    for start in range(0, queries.shape[2], EXPORT_QUERY_BLOCK):
        scores = queries[:, :, start : start + EXPORT_QUERY_BLOCK] @ keys
        blocks.append(scores.softmax(dim=-1) @ v)
    return torch.cat(blocks, dim=2)


class SequenceEncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (official ``TransformerEncoderLayer``)."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadSelfAttention(d_model, num_heads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor | PackedSequences) -> torch.Tensor:
        """[R, L, d] with a padding mask, or packed [T, d] (``MultiheadSelfAttention``)."""
        x = layer_norm(self.norm1, x + self.dropout(self.self_attn(x, pos, padding_mask)))
        ffn = self.linear2(self.dropout(linear_relu(self.linear1, x)))
        return layer_norm(self.norm2, x + self.dropout(ffn))


def linear_relu(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``relu(linear(x))`` with the bias and the ReLU done by the matmul itself in eager mode.

    The feed-forward activation [tokens, dim_feedforward] is the refiner's largest tensor; as
    ``relu(linear(x))`` it is written, read and written again. ``torch._addmm_activation`` adds
    the bias and clamps in the matmul's epilogue (cuBLASLt on CUDA), so it is written once.
    Rounding commutes with ReLU, so the result equals the unfused one (exactly on the CPU).
    Training (the fused operator has no gradient) and traced graphs keep the two standard
    operators, which every runtime knows.
    """
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.jit.is_scripting() or linear.bias is None:
        return F.relu(linear(x))
    weight, bias = linear.weight, linear.bias
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        flat = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t())
    return flat.view(*x.shape[:-1], flat.shape[-1])


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` that keeps a bf16/fp16 token stream in its dtype under autocast.

    CUDA autocast runs LayerNorm in float32 *and returns float32*, which would turn the whole
    residual stream of the encoder into float32: twice the memory traffic in every add, and a
    cast before every linear layer. Here the stream stays in its dtype; the kernel still
    accumulates in float32. CUDA's kernel wants the parameters in the input's dtype (CPU's also
    takes float32 ones), so they are rounded to it, as in any half-precision transformer.
    """
    if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
        return norm(x)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)


class SequenceEncoder(nn.Module):
    """A stack of encoder layers over all quadtree levels jointly (official ``encoder.layers``).

    ``packed``: run the layers on each sequence's real tokens only, packed one after another
    (``PackedSequences``, ``packed_attention``), instead of on padded sequences with a key mask.
    The same outputs at the real tokens (padding outputs are zeros, and unused). Off by default:
    measured faster on an H200 for the attention alone, not yet end to end (scripts/bench_gpu.py
    measures both, part ``refiner``). Eager inference only; traced graphs stay padded.
    """

    def __init__(self, cfg: TransfinerConfig) -> None:
        super().__init__()
        self.packed = False
        self.layers = nn.ModuleList(
            SequenceEncoderLayer(cfg.d_model, cfg.num_heads, cfg.dim_feedforward, cfg.dropout)
            for _ in range(cfg.num_layers)
        )
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """tokens, pos [R, L, d]; padding_mask [R, L] True = padding -> [R, L, d]."""
        if self.packed and not (self.training or torch.jit.is_tracing() or torch.jit.is_scripting()):
            return self.forward_packed(tokens, pos, padding_mask)
        for layer in self.layers:
            tokens = layer(tokens, pos, padding_mask)
        return tokens

    def forward_packed(self, tokens: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        sequences = PackedSequences.from_padding(padding_mask)
        d_model = tokens.shape[-1]
        x = tokens.reshape(-1, d_model)[sequences.index]  # [T, d]
        x_pos = pos.reshape(-1, d_model)[sequences.index]
        for layer in self.layers:
            x = layer(x, x_pos, sequences)
        out = x.new_zeros((tokens.shape[0] * tokens.shape[1], d_model))
        return out.index_copy(0, sequences.index, x).view(tokens.shape[0], tokens.shape[1], d_model)


class PixelDecoder(nn.Module):
    """Two-layer MLP from a token to a mask probability (official ``encoder.conv_r1``)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [R, L, d] -> probabilities [R, L]."""
        return self.layers(tokens).squeeze(-1).float().sigmoid()


def write_nodes(grid: torch.Tensor, level: QuadtreeLevel, values: torch.Tensor) -> torch.Tensor:
    """Overwrites the valid nodes of ``grid`` [R, S*S] with ``values`` [R, n]; others untouched."""
    current = grid.gather(1, level.nodes)
    return grid.scatter(1, level.nodes, torch.where(level.valid, values.to(grid.dtype), current))


def propagate(coarse: torch.Tensor, levels: list[QuadtreeLevel], refined: list[torch.Tensor]) -> torch.Tensor:
    """Quadtree propagation: correct level 28, upsample, correct 56, upsample, correct 112.

    coarse [R, 28, 28] probabilities; refined: per level [R, n_l]. Returns [R, 112, 112].
    Upsampling is bilinear with ``align_corners=True`` as the official code. Unlike it, the
    56-level step always runs (the official code skips it for the whole batch when no box has a
    56-level node), so a box's mask never depends on the other boxes in the batch.
    """
    num = coarse.shape[0]
    grid = write_nodes(coarse.flatten(1), levels[0], refined[0])
    for level, values in zip(levels[1:], refined[1:]):
        previous = grid.view(num, 1, level.size // 2, level.size // 2)
        grid = F.interpolate(previous, size=(level.size, level.size), mode="bilinear", align_corners=True)
        grid = write_nodes(grid.flatten(1), level, values)
    return grid.view(num, LEVEL_SIZES[-1], LEVEL_SIZES[-1])


def cell_boxes(boxes: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The image-space box of each chosen 28-grid cell: boxes [R, 4], cells [R, k] -> [R, k, 4]."""
    grid = LEVEL_SIZES[0]
    x0, y0 = boxes[:, 0:1], boxes[:, 1:2]
    cell_w = (boxes[:, 2:3] - x0) / grid
    cell_h = (boxes[:, 3:4] - y0) / grid
    col, row = (cells % grid).to(boxes.dtype), torch.div(cells, grid, rounding_mode="floor").to(boxes.dtype)
    return torch.stack((x0 + col * cell_w, y0 + row * cell_h, x0 + (col + 1) * cell_w, y0 + (row + 1) * cell_h), dim=2)


class TransfinerRefiner(nn.Module):
    """Refines coarse 28x28 masks into 112x112 masks on the point quadtree."""

    def __init__(self, cfg: TransfinerConfig, in_channels: int, scales: tuple[float, ...]) -> None:
        super().__init__()
        if cfg.d_model % 2 or cfg.d_model % cfg.num_heads:
            raise ValueError("d_model must be even and divisible by num_heads")
        self.scales = scales
        self.tokens_per_chunk = cfg.tokens_per_chunk
        self.gpu_tokens_per_chunk = cfg.gpu_tokens_per_chunk
        self.boxes_per_chunk = cfg.boxes_per_chunk
        self.quadtree = PointQuadtree(cfg.thresholds, cfg.max_cells)
        self.node_encoder = NodeEncoder(in_channels, cfg.d_model)
        self.sequence_encoder = SequenceEncoder(cfg)
        self.pixel_decoder = PixelDecoder(cfg.d_model)
        for size in (CONTEXT_SIZE,) + LEVEL_SIZES:
            self.register_buffer(f"pos_{size}", sine_position_table(size, cfg.d_model), persistent=False)

    def node_features(
        self,
        features: list[torch.Tensor],
        boxes: torch.Tensor,
        batch_index: torch.Tensor,
        box_levels: torch.Tensor,
        levels: list[QuadtreeLevel],
    ) -> list[torch.Tensor]:
        """RoIAlign features of every node -> per level [R, n_l, C].

        Level l of the quadtree reads FPN level ``max(box level - l - 1, P2)``, as the official
        pooler. The 28-level pools whole boxes at 28x28; the finer levels pool only the chosen
        cells at 2x2 / 4x4, which gives the same bins (and the same adaptive sample count) as
        pooling the whole box at 56x56 / 112x112, at a fraction of the cost.
        """
        num = boxes.shape[0]
        out = []
        for shift, level in enumerate(levels, start=1):
            fpn_level = (box_levels - shift).clamp(min=0)
            c = level.size // LEVEL_SIZES[0]
            if c == 1:
                rois = torch.cat((batch_index[:, None].to(boxes.dtype), boxes), dim=1)
                pooled = multilevel_roi_align(features, rois, fpn_level, level.size, self.scales)
                # [R, C, 28, 28] -> the chosen cells [R, k, C]
                flat = pooled.reshape(num, pooled.shape[1], level.size**2).transpose(1, 2)
                out.append(flat.gather(1, level.cells[..., None].expand(-1, -1, flat.shape[2])))
            else:
                k = level.cells.shape[1]
                # Explicit sizes, never -1: a -1 cannot be resolved for 0 boxes in ONNX Runtime.
                sub = cell_boxes(boxes, level.cells).reshape(num * k, 4)
                # Each box's values repeated for its k cells (expand, not repeat_interleave, which
                # ONNX export cannot do for a dynamic box count).
                cell_batch = batch_index[:, None].expand(num, k).reshape(num * k, 1).to(sub.dtype)
                cell_level = fpn_level[:, None].expand(num, k).reshape(num * k)
                rois = torch.cat((cell_batch, sub), dim=1)
                pooled = multilevel_roi_align(
                    features, rois, cell_level, c, self.scales
                )  # [R*k, C, c, c], children in (row, col) order like the node indices
                channels = pooled.shape[1]
                out.append(pooled.reshape(num * k, channels, c * c).transpose(1, 2).reshape(num, k * c * c, channels))
        return out

    def decode(
        self,
        features: list[torch.Tensor],
        boxes: torch.Tensor,
        batch_index: torch.Tensor,
        box_levels: torch.Tensor,
        context: torch.Tensor,
        coarse: torch.Tensor,
        levels: list[QuadtreeLevel],
    ) -> list[torch.Tensor]:
        """Builds each box's token sequence, encodes all boxes at once, decodes probabilities.

        Returns [context [R, 196], level 28 [R, n28], level 56 [R, n56], level 112 [R, n112]].
        """
        num = boxes.shape[0]
        level_features = self.node_features(features, boxes, batch_index, box_levels, levels)
        coarse_1 = coarse[:, None].float()
        # Coarse probability at the context grid and at each level's nodes (bilinear, as official).
        context_probs = F.interpolate(coarse_1, size=(CONTEXT_SIZE,) * 2, mode="bilinear").flatten(1)
        token_features = [context.reshape(num, context.shape[1], CONTEXT_SIZE**2).transpose(1, 2)]
        token_probs = [context_probs]
        positions = [self.pos_14.expand(num, -1, -1)]
        padding = [torch.zeros((num, CONTEXT_SIZE**2), dtype=torch.bool, device=boxes.device)]
        for level, feats in zip(levels, level_features):
            if level.size == LEVEL_SIZES[0]:
                probs = coarse_1.flatten(1)
            else:
                probs = F.interpolate(coarse_1, size=(level.size,) * 2, mode="bilinear").flatten(1)
            token_features.append(feats)
            token_probs.append(probs.gather(1, level.nodes))
            positions.append(getattr(self, f"pos_{level.size}")[level.nodes])
            padding.append(~level.valid)

        tokens = self.node_encoder(torch.cat(token_features, dim=1), torch.cat(token_probs, dim=1))
        pos = torch.cat(positions, dim=1).to(tokens.dtype)
        padding_mask = torch.cat(padding, dim=1)
        decoded = self.pixel_decoder(self.sequence_encoder(tokens, pos, padding_mask))  # [R, L]
        sizes = [CONTEXT_SIZE**2] + [level.nodes.shape[1] for level in levels]
        return list(decoded.split(sizes, dim=1))

    def forward(
        self,
        features: list[torch.Tensor],
        boxes: torch.Tensor,
        batch_index: torch.Tensor,
        box_levels: torch.Tensor,
        context: torch.Tensor,
        coarse: torch.Tensor,
        incoherence: torch.Tensor,
    ) -> torch.Tensor:
        """Refines R boxes.

        - features: P2 (+ semantic enhancement), P3, P4, P5; boxes [R, 4] in input-image pixels;
          batch_index [R]; box_levels [R] (0 = P2) from the box size; context [R, C, 14, 14] RoI
          features; coarse [R, 28, 28] and incoherence [R, 28, 28] probabilities.
        - Returns [R, 112, 112] mask probabilities.
        - Eager: boxes go in chunks of at most ``tokens_per_chunk`` tokens (``gpu_tokens_per_chunk``
          off the CPU; and ``boxes_per_chunk`` boxes), every level trimmed to the chunk's real
          cells, so peak memory is flat in R and compute follows the real nodes (``plan_chunks``).
          The plan needs the node counts on the host: one device sync per call. A traced graph
          (TorchScript, ONNX) has static shapes and a dynamic box count: all boxes in one chunk,
          padded to the caps.
        """
        per_box = (boxes, batch_index, box_levels, context, coarse)
        if torch.jit.is_tracing():
            return self.refine_chunk(features, *per_box, self.quadtree(incoherence))
        refined = coarse.new_empty((boxes.shape[0], LEVEL_SIZES[-1], LEVEL_SIZES[-1]), dtype=torch.float32)
        for index, levels in self.chunks(incoherence):
            refined.index_copy_(0, index, self.refine_chunk(features, *(t[index] for t in per_box), levels))
        return refined

    def chunks(self, incoherence: torch.Tensor) -> list[tuple[torch.Tensor, list[QuadtreeLevel]]]:
        """incoherence [R, 28, 28] -> per chunk: (its boxes [n] as indices, its trimmed levels)."""
        levels = self.quadtree(incoherence)
        counts = torch.stack([level.cell_valid.sum(1) for level in levels], dim=1)  # [R, 3]
        out = []
        budget = self.tokens_per_chunk if incoherence.device.type == "cpu" else self.gpu_tokens_per_chunk
        for members, slots in plan_chunks(counts.tolist(), budget, self.boxes_per_chunk):
            index = torch.tensor(members, device=incoherence.device)
            out.append((index, [self.quadtree.trim_level(level, index, n) for level, n in zip(levels, slots)]))
        return out

    def refine_chunk(
        self,
        features: list[torch.Tensor],
        boxes: torch.Tensor,
        batch_index: torch.Tensor,
        box_levels: torch.Tensor,
        context: torch.Tensor,
        coarse: torch.Tensor,
        levels: list[QuadtreeLevel],
    ) -> torch.Tensor:
        """``forward`` for one chunk of boxes and its chosen nodes -> [n, 112, 112]."""
        decoded = self.decode(features, boxes, batch_index, box_levels, context, coarse, levels)
        # The context tokens' outputs are only supervised in training.
        return propagate(coarse.float(), levels, decoded[1:])
