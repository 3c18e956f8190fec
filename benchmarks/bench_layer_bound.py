"""How close to its GEMM peak an encode can come on this CPU with torch's ops: one encoder layer, piece by piece.

    python benchmarks/bench_layer_bound.py                  # fp32, bf16 and int8; STS-B-like and SciFact-like batches
    python benchmarks/bench_layer_bound.py --threads 2 --precisions bf16

bench_encode.py prints each path's share of its GEMM peak (useful FLOPs / time / the fastest GEMM rate measured in
the run). This script asks what that share could be at best. It times each piece of one encoder layer alone, on a
batch shaped like a corpus's typical one (sentences of one length, as encode's length-sorted batches are), through
the ops encode runs: the four Linears with prepacked weights (oneDNN; the erf GELU is what ffn_in's post-op
adds, as encode fuses it; int8: the int8 GEMMs alone, no quantization), SDPA on per-sentence views of a packed
q/k/v (bf16: the faster of bf16 and float32 attention, the cast not counted), two LayerNorms and two residual
adds (int8: the cheaper of float32 and bf16). The sum is what a layer costs with nothing else: no casts, no
padding copies, no dispatch between ops, no quantization. The bound printed is

    useful FLOPs of the layer (the Linears' and attention's, as bench_encode.py counts them)
        / (the Linears' FLOPs at the GEMM peak + the other pieces' times) / GEMM peak

and the same with the GEMMs as timed here, at the batch's shape. The peak is measured as bench_encode.py's
(minilm.cpu.LAYER_SHAPES at 1,024 rows and at the batch's, the better). One thread by default, timed in process
CPU time: a descheduled thread costs nothing, so the figures hold on a shared machine; --threads 2 times
wall-clock (a quiet machine only). An encode can exceed the bound only by running fewer ops (fusing them into a
kernel of its own) or different maths (a GELU other than erf). Figures in benchmarks/README.md.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minilm import cpu  # noqa: E402
from minilm.encoder import BertConfig, flops_per_token  # noqa: E402

# corpus -> (tokens per sentence, sentences per batch): encode's batches at batch_size 32 (bench_encode.py's)
SHAPES = {"STS-B-like": (12, 120), "SciFact-like": (256, 32)}


def timed(fn, repeats: int) -> float:
    """Best milliseconds of `repeats` calls, after two warm-up calls (oneDNN builds its code at the first): process
    CPU time with one thread, wall-clock with more."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    fn(), fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best * 1e3


def gemm_peaks(precisions, rows: int, repeats: int) -> dict:
    """{precision: G(FL)OP/s}: one layer's Linears through the ops encode runs (minilm.cpu's probe), at 1,024 rows
    and at `rows`, the better."""
    peaks = {}
    for precision in precisions:
        layers = [cpu._layer(precision, n, cpu.LAYER_SHAPES) for n in sorted({cpu.PROBE_ROWS, rows})]
        peaks[precision] = max(flops / timed(run, repeats) / 1e6 for run, flops in layers)
    return peaks


def linear_pieces(precision: str, rows: int, config: BertConfig, repeats: int) -> dict:
    """{"GEMMs": ms, "GELU": ms}: the layer's four Linears as encode runs them, and what the GELU adds to ffn_in."""
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes = {"qkv": (hidden, 3 * hidden), "out": (hidden, hidden), "ffn_in": (hidden, inter),
              "ffn_out": (inter, hidden)}
    plain, gelu = 0.0, 0.0
    for name, (k, n) in shapes.items():
        if precision == "int8":
            x = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
            product = cpu._int8_product(x, torch.randint(-127, 128, (n, k), dtype=torch.int8))
            plain += timed(product, repeats)
            continue
        dtype = cpu.DTYPES[precision]
        x = torch.randn(rows, k).to(dtype)
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k).to(dtype), None)
        bias = torch.randn(n).to(dtype)
        alone = timed(lambda: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""), repeats)
        plain += alone
        if name == "ffn_in":
            fused = timed(lambda: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none"), repeats)
            gelu = fused - alone
    if precision == "int8":  # int8 runs the GELU on its float activations: the cheaper of float32 and bf16
        activations = [torch.randn(rows, inter).to(dtype) for dtype in (torch.float32, torch.bfloat16)]
        gelu = min(timed(lambda: F.gelu(x), repeats) for x in activations)
    return {"GEMMs": plain, "GELU": max(gelu, 0.0)}


def other_pieces(dtypes, length: int, count: int, config: BertConfig, repeats: int) -> dict:
    """{"attention", "2 LayerNorms", "2 adds": ms}: each the cheapest over `dtypes`."""
    rows, heads, head_dim, hidden = length * count, config.num_attention_heads, config.head_dim, config.hidden_size
    best = {}
    for dtype in dtypes:
        qkv = torch.randn(rows, 3, heads, head_dim).to(dtype)  # packed, as the qkv Linear's output is viewed
        q, k, v = (part.view(count, length, heads, head_dim).transpose(1, 2) for part in qkv.unbind(1))
        x = torch.randn(rows, hidden).to(dtype)
        norm = torch.nn.LayerNorm(hidden, eps=config.layer_norm_eps).to(dtype)
        times = {"attention": timed(lambda: F.scaled_dot_product_attention(q, k, v), repeats),
                 "2 LayerNorms": 2 * timed(lambda: norm(x), repeats),
                 "2 adds": 2 * timed(lambda: x + x, repeats)}
        best = {piece: min(ms, best.get(piece, float("inf"))) for piece, ms in times.items()}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time, see above)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per piece, the best kept (default 10)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = BertConfig()
    print(f"CPU: {cpu.describe_cpu().summary()}; {args.threads} threads, torch {torch.__version__}")
    for corpus, (length, count) in SHAPES.items():
        rows = length * count
        peaks = gemm_peaks(args.precisions, rows, args.repeats)
        print(f"\n{corpus}: {count} sentences of {length} tokens ({rows} rows); GEMM peaks "
              + ", ".join(f"{p} {peaks[p]:,.0f}" for p in args.precisions) + " G(FL)OP/s")
        useful = rows * flops_per_token(config, length) / config.num_hidden_layers  # one layer
        for precision in args.precisions:
            if cpu.slowdown(precision) > cpu.SLOW:
                print(f"  {precision}: skipped, its GEMMs run {cpu.slowdown(precision):.0f}x slower than fp32 here")
                continue
            dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16, torch.float32],
                      "int8": [torch.float32, torch.bfloat16] if cpu.describe_cpu().fast("bf16") else [torch.float32]}
            pieces = {**linear_pieces(precision, rows, config, args.repeats),
                      **other_pieces(dtypes[precision], length, count, config, args.repeats)}
            rest = sum(ms for piece, ms in pieces.items() if piece != "GEMMs")
            linear_flops = rows * flops_per_token(config, 0) / config.num_hidden_layers
            at_peak = linear_flops / peaks[precision] / 1e6  # ms: the GEMMs as fast as the probe runs them
            shares = ", ".join(f"{piece} {ms:.2f} ms" for piece, ms in pieces.items())
            print(f"  {precision}: {shares}; GEMMs at {linear_flops / pieces['GEMMs'] / 1e6:,.0f} G(FL)OP/s here. "
                  f"With the GEMMs at the peak: at most {useful / (at_peak + rest) / 1e6 / peaks[precision]:.0%} "
                  f"of it; with them as timed here: {useful / (pieces['GEMMs'] + rest) / 1e6 / peaks[precision]:.0%}")


if __name__ == "__main__":
    main()
