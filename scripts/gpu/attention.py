"""Key-masked attention at the refiner's shape: the kernels SDPA offers for it, side by side (CUDA)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from scripts.gpu.timing import sync
from transfiner.model.modeling.refiner import CONTEXT_SIZE


def bench_attention(device: torch.device, log) -> list[dict]:
    """64 boxes x 4 heads x 2,788 tokens x 64 in bf16, 5% of the keys padding: ms, TFLOP/s, error vs fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows_, heads, length, dim = 64, 4, 2788, 64
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(rows_, heads, length, dim, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3)
    )
    padding = torch.rand(rows_, length, device=device, generator=gen) < 0.05
    padding[:, : CONTEXT_SIZE**2] = False
    keep = ~padding[:, None, None, :]
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep)

    def masked(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

        return run

    def unmasked():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    # Packed: only each box's real tokens, one after another ([T, heads, dim]), as FlashAttention's
    # variable-length kernel takes them (torch.nn.attention.varlen, where this torch has it): no
    # mask and no padded keys or queries. Compared at the real queries only.
    valid = ~padding  # [rows, length]
    lengths = valid.sum(dim=1)
    packed_q, packed_k, packed_v = (t.transpose(1, 2)[valid] for t in (q, k, v))  # [T, heads, dim]
    cumulative = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())
    packed_reference = reference.transpose(1, 2)[valid]

    def packed():
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(packed_q, packed_k, packed_v, cumulative, cumulative, longest, longest)

    variants = {
        "bool mask, SDPA's choice (the model)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
        "bool mask, memory-efficient": masked(SDPBackend.EFFICIENT_ATTENTION),
        "bool mask, cuDNN": masked(SDPBackend.CUDNN_ATTENTION),
        "no mask, flash (a bound: wrong result)": unmasked,
        "packed real tokens, flash varlen": packed,
    }
    # TFLOP/s of the work each variant does: the padded square, or the packed boxes' own squares.
    flops = 4 * rows_ * heads * length * length * dim
    packed_flops = 4 * heads * dim * float((lengths.double() ** 2).sum())
    results = []
    for name, fn in variants.items():
        row = {"variant": name}
        try:
            out = fn()
            sync(device)
            start = time.perf_counter()
            for _ in range(5):
                out = fn()
            sync(device)
            seconds = (time.perf_counter() - start) / 5
            is_packed = fn is packed
            expected = packed_reference if is_packed else reference
            row.update(
                ms=seconds * 1000,
                tflops=(packed_flops if is_packed else flops) / seconds / 1e12,
                max_abs_error=float((out.float() - expected).abs().max()),
            )
        except Exception as error:  # noqa: BLE001 - unsupported kernels are a result too
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        results.append(row)
        log(f"attention {name}: {row.get('ms', 0):.2f} ms, {row.get('tflops', 0):.0f} TFLOP/s {row.get('error', '')}")
    return results
