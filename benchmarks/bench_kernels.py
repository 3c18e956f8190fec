"""Attention and pooling kernels against their references: time and max error, as a table.

    python benchmarks/bench_kernels.py                       # MiniLM shapes: 12 heads x 32, lengths 16..512
    python benchmarks/bench_kernels.py --head-dim 64 --backward --dtype bf16
    python benchmarks/bench_kernels.py --ragged --backward --dropout 0.1 --batch-sizes 16 --lengths 128,512
                                                             # training batches: random lengths, dropout

For every (batch, length) it runs the attention backends of `minilm.attention` ("math", "sdpa", "triton") on the
same packed inputs (on the CPU also "sdpa_padded": the sdpa backend always padded around one call, to show what
its per-sentence layout saves) and reports the median time, the max absolute error against "math" in float32,
and the achieved TFLOP/s and GB/s. On CUDA times come from CUDA events after warm-up. On a CPU only "math" and "sdpa"
can be timed: Triton runs there only under its interpreter, whose times mean nothing, so the table says that
"triton" was skipped (tests/test_kernels.py checks its values under the interpreter).

FLOPs count the real tokens only (4 * sum(L^2) * heads * head_dim forward, 2.5x that for backward), so a
backend that computes on padding is charged for it as lost time, not credited as work. Bytes are the minimum
traffic: q, k, v read and out written (plus d_out, dq, dk, dv for backward).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minilm import kernels  # noqa: E402
from minilm.attention import attention  # noqa: E402
from minilm.pooling import pool  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16,32,64,128,256,512", help="sentence lengths, comma-separated")
    parser.add_argument("--batch-sizes", default="1,8,32", help="sentences per batch, comma-separated")
    parser.add_argument("--heads", type=int, default=12, help="attention heads (MiniLM: 12)")
    parser.add_argument("--head-dim", type=int, default=32, help="head size (MiniLM: 32, BERT-base: 64)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--ragged", action="store_true",
                        help="sentence lengths drawn uniformly from 1..L instead of all equal to L")
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout on the attention probabilities while timing, as in training (errors are "
                             "measured without it)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default 20 CUDA, 5 CPU)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args()


def make_inputs(batch, length, heads, head_dim, dtype, device, ragged, generator):
    if ragged:
        lengths = torch.randint(1, length + 1, (batch,), generator=generator).tolist()
    else:
        lengths = [length] * batch
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total = int(cu_seqlens[-1])
    q, k, v = (torch.randn(total, heads, head_dim, generator=generator).to(device=device, dtype=dtype)
               for _ in range(3))  # [total_tokens, heads, head_dim]
    return q, k, v, cu_seqlens, lengths


def timed(function, device, repeats):
    """Median seconds of `function()` after warm-up."""
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            function()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def attention_rows(args, device, dtype):
    backends = ["math", "sdpa", "triton"] + (["sdpa_padded"] if device.type == "cpu" else [])
    skipped = []
    if device.type != "cuda":
        backends.remove("triton")
        skipped.append("triton (needs CUDA; under TRITON_INTERPRET=1 it runs, but its times mean nothing)")
    elif not kernels.available():
        backends.remove("triton")
        skipped.append("triton (not installed)")
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in map(int, args.batch_sizes.split(",")):
        for length in map(int, args.lengths.split(",")):
            q, k, v, cu_seqlens, lengths = make_inputs(batch, length, args.heads, args.head_dim, dtype, device,
                                                       args.ragged, generator)
            longest = max(lengths)
            flops = 4 * sum(n * n for n in lengths) * args.heads * args.head_dim
            tensors_moved = 4
            if args.backward:
                flops, tensors_moved = flops * 3.5, 12  # forward recomputed inside backward: 1 + 2.5
            bytes_moved = tensors_moved * q.numel() * q.element_size()
            q32, k32, v32 = (x.float() for x in (q, k, v))
            expected = attention(q32, k32, v32, cu_seqlens, longest, backend="math")
            for backend in backends:
                out = attention(q, k, v, cu_seqlens, longest, backend=backend)
                error = float((out.float() - expected).abs().max())
                if args.backward:
                    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                    grad = torch.randn_like(q)

                    def step():
                        out = attention(*leaves, cu_seqlens, longest, backend=backend, dropout_p=args.dropout)
                        torch.autograd.grad(out, leaves, grad)
                else:
                    def step():
                        with torch.no_grad():
                            attention(q, k, v, cu_seqlens, longest, backend=backend, dropout_p=args.dropout)
                seconds = timed(step, device, repeats)
                rows.append({"batch": batch, "length": length, "tokens": sum(lengths), "backend": backend,
                             "ms": seconds * 1e3, "max_abs_error": error, "tflops": flops / seconds / 1e12,
                             "gbps": bytes_moved / seconds / 1e9})
    return rows, skipped


def pooling_rows(args, device, dtype):
    if device.type != "cuda" or not kernels.available():
        return [], ["fused mean pooling (needs CUDA)"]
    generator = torch.Generator().manual_seed(1)
    rows = []
    for batch in map(int, args.batch_sizes.split(",")):
        for length in map(int, args.lengths.split(",")):
            lengths = [length] * batch
            cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                                      device=device)
            tokens = torch.randn(sum(lengths), 384, generator=generator).to(device=device, dtype=dtype)
            expected = pool(tokens.float(), cu_seqlens, ("mean",), True, backend="plain")
            for fused in (False, True):
                backend = "triton" if fused else "plain"
                pooled = pool(tokens, cu_seqlens, ("mean",), True, backend=backend)
                error = float((pooled.float() - expected).abs().max())
                seconds = timed(lambda: pool(tokens, cu_seqlens, ("mean",), True, backend=backend), device, 20)
                rows.append({"batch": batch, "length": length, "fused": fused, "ms": seconds * 1e3,
                             "max_abs_error": error, "gbps": tokens.numel() * tokens.element_size() / seconds / 1e9})
    return rows, []


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 is set; nothing here times the interpreter")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"# attention, {'forward + backward' if args.backward else 'forward'}, {args.heads} heads x "
          f"{args.head_dim}, {str(dtype).replace('torch.', '')}, {'ragged' if args.ragged else 'equal'} lengths, "
          f"dropout {args.dropout}, {name}\n")
    rows, skipped = attention_rows(args, device, dtype)
    print("| batch | length | tokens | backend | ms | TFLOP/s | GB/s | max abs error vs math fp32 |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['batch']} | {row['length']} | {row['tokens']} | {row['backend']} | {row['ms']:.3f} | "
              f"{row['tflops']:.3f} | {row['gbps']:.1f} | {row['max_abs_error']:.1e} |")
    pool_rows, pool_skipped = pooling_rows(args, device, dtype)
    if pool_rows:
        print("\n# mean pooling + L2 normalization, 384 dims\n")
        print("| batch | length | fused | ms | GB/s | max abs error |")
        print("|---:|---:|---|---:|---:|---:|")
        for row in pool_rows:
            print(f"| {row['batch']} | {row['length']} | {row['fused']} | {row['ms']:.3f} | {row['gbps']:.1f} | "
                  f"{row['max_abs_error']:.1e} |")
    for what in skipped + pool_skipped:
        print(f"skipped: {what}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "attention": rows, "pooling": pool_rows}, indent=1))


if __name__ == "__main__":
    main()
