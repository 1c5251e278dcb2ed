"""Writes benchmarks/perf/llama3-8b-h100-modelled.json: a *modelled* (not measured) perf model of
Llama-3-8B in bf16 on one H100, from first principles and the ceilings measured on the lent H100
(docs/benchmarks.md, design notes §4): bf16 matmul ~790 TFLOP/s, device memory ~3.0 TB/s.

    .venv/bin/python benchmarks/modelled_perf_llama3_8b_h100.py

- prefill: 2 * params FLOPs per token, plus causal attention 4 * layers * hidden FLOPs per
  query-key pair (QK^T and PV), at 70% of the matmul ceiling. Check: 4,096 tokens come out at
  ~127 ms, the HF prefill measured there.
- decode step: a roofline: the weights are read once per step (16 GB / 3.0 TB/s = 5.35 ms, the
  188 tok/s batch-1 ceiling) or the matmuls (2 * params FLOPs per sequence at 70%), whichever is
  longer, plus every sequence's KV read (context tokens * 128 KiB / 3.0 TB/s).
- step overhead: 1 ms per step (kernel launches, scheduling, sampling); an assumption.
- KV transfer: the fabric presets of pdserve/planner/perf_model.py (assumptions, cited there),
  plus 0.5 ms per handoff (messages and bookkeeping; an assumption).
"""

from __future__ import annotations

from pathlib import Path

from pdserve.planner.perf_model import PerfModel

PARAMS = 8.03e9
LAYERS, HIDDEN, KV_HEADS, HEAD_DIM = 32, 4096, 8, 128
BYTES = 2  # bf16
MATMUL_FLOPS = 790e12
MATMUL_FRACTION = 0.70
HBM_BYTES_PER_S = 3.0e12


def model() -> PerfModel:
    flops = MATMUL_FLOPS * MATMUL_FRACTION
    kv_bytes_per_token = 2 * LAYERS * KV_HEADS * HEAD_DIM * BYTES  # K and V: 128 KiB
    weights = PARAMS * BYTES
    return PerfModel(
        name="Llama-3-8B bf16 on H100 SXM (modelled)",
        source="modelled",
        kv_bytes_per_token=kv_bytes_per_token,
        num_layers=LAYERS,
        overhead_s=1e-3,
        prefill_token_s=2 * PARAMS / flops,
        attn_pair_s=4 * LAYERS * HIDDEN / flops,
        decode_seq_s=2 * PARAMS / flops,
        decode_ctx_s=kv_bytes_per_token / HBM_BYTES_PER_S,
        weights_read_s=weights / HBM_BYTES_PER_S,
        transfer_overhead_s=0.5e-3,
        notes=__doc__ or "",
    )


def main() -> None:
    out = Path(__file__).parent / "perf" / "llama3-8b-h100-modelled.json"
    perf = model()
    perf.save(out)
    print(
        f"wrote {out}: prefill 4096 tokens {perf.prefill_s(4096) * 1e3:.1f} ms, "
        f"decode batch 1 @ 1k ctx {perf.decode_step_s(1, 1024) * 1e3:.2f} ms, "
        f"batch 64 @ 64k ctx {perf.decode_step_s(64, 65536) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
