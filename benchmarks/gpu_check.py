"""GPU proof in one run (at most 8 minutes on one H100): kernels, attention timings, encode, training.

Writes report.md and report.json into --out (default runs/gpu-check). Steps, each wrapped so that one failure is
reported and the rest still run, under a global time guard (--time-limit, default 450 s):
  1. kernels: the Triton attention (forward, backward) and fused pooling compiled for the GPU (no interpreter)
     against their float32 references in fp32/bf16/fp16, lengths 1..512, ragged batches;
  2. attention timings: triton vs sdpa vs math, forward and forward+backward, batch 32 at lengths 128 and 512,
     TFLOP/s and the fraction of the GPU's bf16 peak (both the datasheet's and a matmul measured in the run);
  3. encode STS-B test and 1,000 SciFact abstracts (title + " " + text, max_seq_length 256): minilm fp16/bf16
     vs sentence-transformers fp32 and fp16 on the same GPU, speed, STS-B Spearman, max difference;
  4. training: train.py MNRL bs 64, 200 steps, --precision bf16, whole process, vs sentence-transformers'
     trainer with bf16 (benchmarks/reference_train.py); the two loss curves side by side.

The device machine has no network and no ../shared/data, so first make a bundle here (the model with fp16
weights, ~45 MB, so that it fits the 64 MiB the device tool carries, and the data the steps read), then run:

    python benchmarks/gpu_check.py --bundle runs/gpu-bundle
    run(command="python3 benchmarks/gpu_check.py --from runs/gpu-bundle --out $OUT/gpu-check",
        carry=["runs/gpu-bundle"], timeout_s=540)

Packages it needs there: torch with CUDA, triton, tokenizers, safetensors, numpy (minilm); sentence-transformers
and transformers (steps 3-4, the references); datasets (step 4's reference trainer; not in the device image:
carry its wheel, or step 4 reports the reference as failed and still runs train.py).

`--dry-run` runs every step at toy sizes on the CPU (the kernels under Triton's interpreter, no
sentence-transformers) so that tests/test_gpu_check.py keeps this script from rotting.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter must be on before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import minilm  # noqa: E402
from benchmarks.bench_encode import scifact_abstracts, timed_in_turns  # noqa: E402
from benchmarks.bench_kernels import make_inputs, timed  # noqa: E402
from benchmarks.bench_train import WRAPPER, last_json_line  # noqa: E402
from minilm.data import load_stsb  # noqa: E402
from minilm.evaluation import similarity_metrics  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense bf16 tensor-core peak from the datasheets (TFLOP/s), by a word of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


# --- step 1: the kernels against their references ---------------------------------------------------------

def kernel_tests(ctx) -> dict:
    """tests/test_kernels.py's checks (same inputs, references and tolerances), on the GPU's compiled kernels."""
    from test_kernels import TOLERANCE, packed, relative_error

    from minilm.kernels.attention import attention_reference, flash_attention
    from minilm.kernels.pooling import fused_mean_pool, mean_pool_reference

    generator = torch.Generator().manual_seed(0)
    if ctx.dry:
        cases = [([1], 2, 32), ([3, 17, 1], 2, 32)]
        pool_lengths = [1, 20, 3]
    else:
        ragged = torch.randint(1, 513, (32,), generator=generator).tolist()
        cases = [([1], 12, 32), ([1, 1, 1], 12, 32), ([1, 37, 5, 64, 2], 12, 32), (ragged, 12, 32),
                 ([512] * 4, 12, 32), ([1, 512, 9], 12, 64), ([3, 70, 1, 128], 16, 16), ([200, 7], 8, 128)]
        pool_lengths = [1, 512] + torch.randint(1, 513, (30,), generator=generator).tolist()
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for lengths, heads, head_dim in cases:
            torch.manual_seed(len(rows))
            q, k, v, cu_seqlens = packed(lengths, heads, head_dim, dtype)
            grad_out = torch.randn_like(q)
            out = flash_attention(q, k, v, cu_seqlens, max(lengths))
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
            q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
            expected = attention_reference(q32, k32, v32, cu_seqlens)
            expected_grads = torch.autograd.grad(expected, (q32, k32, v32), grad_out.float())
            forward = relative_error(out, expected)
            backward = max(relative_error(g, e) for g, e in zip(grads, expected_grads))
            limit = TOLERANCE[dtype]
            rows.append({"kernel": "attention", "dtype": dtype_name, "heads": heads, "head_dim": head_dim,
                         "sentences": len(lengths), "max_length": max(lengths), "forward_error": forward,
                         "backward_error": backward, "ok": forward < limit and backward < limit * (
                             5 if dtype != torch.float32 else 1)})
        for normalize in (False, True):
            cu_seqlens = torch.tensor([0] + torch.tensor(pool_lengths).cumsum(0).tolist(), dtype=torch.int32,
                                      device=ctx.device)
            tokens = torch.randn(int(cu_seqlens[-1]), 384, device=ctx.device).to(dtype).requires_grad_()
            grad_out = torch.randn(len(pool_lengths), 384, device=ctx.device)
            out = fused_mean_pool(tokens, cu_seqlens, normalize)
            (grad,) = torch.autograd.grad(out, tokens, grad_out.to(dtype))
            tokens32 = tokens.detach().float().requires_grad_()
            expected = mean_pool_reference(tokens32, cu_seqlens, normalize)
            (expected_grad,) = torch.autograd.grad(expected, tokens32, grad_out)
            forward, backward = relative_error(out, expected), relative_error(grad, expected_grad)
            rows.append({"kernel": f"mean pool{' + normalize' if normalize else ''}", "dtype": dtype_name,
                         "heads": "-", "head_dim": "-", "sentences": len(pool_lengths),
                         "max_length": max(pool_lengths), "forward_error": forward, "backward_error": backward,
                         "ok": forward < TOLERANCE[dtype] and backward < TOLERANCE[dtype]})
    failed = [row for row in rows if not row["ok"]]
    table = markdown_table(rows, ["kernel", "dtype", "heads", "head_dim", "sentences", "max_length",
                                  "forward_error", "backward_error", "ok"])
    return {"rows": rows, "ok": not failed, "markdown": f"{len(rows) - len(failed)}/{len(rows)} cases within "
            f"tests/test_kernels.py's tolerances (relative error; backward 5x in half precision)\n\n{table}"}


# --- step 2: attention timings -----------------------------------------------------------------------------

def matmul_tflops(device, dtype) -> float:
    """What a large matrix multiply reaches here: the practical peak the attention figures are set against."""
    size = 8192 if device.type == "cuda" else 256
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: a @ b, device, 10 if device.type == "cuda" else 2)
    return 2 * size**3 / seconds / 1e12


def attention_timings(ctx) -> dict:
    """FLOPs of the real tokens: forward 4 * sum(L^2) * heads * head_dim (q k^T and p v, 2 FLOPs per multiply-add);
    forward + backward 3.5x that (the backward recomputes q k^T, then dv, dp, dq, dk: 2.5x the forward)."""
    from minilm.attention import attention

    heads, head_dim = 12, 32
    batch, lengths = (2, [16]) if ctx.dry else (32, [128, 512])
    backends = ["math", "sdpa"] + (["triton"] if ctx.device.type == "cuda" else [])
    repeats = 1 if ctx.dry else 20
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    measured_peak = matmul_tflops(ctx.device, dtype)
    name = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "CPU"
    datasheet = next((peak for word, peak in PEAK_BF16_TFLOPS.items() if word in name), None)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in lengths:
        q, k, v, cu_seqlens, real = make_inputs(batch, length, heads, head_dim, dtype, ctx.device, False, generator)
        forward_flops = 4 * sum(n * n for n in real) * heads * head_dim
        for backend in backends:
            for backward in (False, True):
                leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
                grad = torch.randn_like(q)

                def step(backend=backend, backward=backward, leaves=leaves, grad=grad):
                    with torch.set_grad_enabled(backward):
                        out = attention(*leaves, cu_seqlens, length, backend=backend)
                        if backward:
                            torch.autograd.grad(out, leaves, grad)

                seconds = timed(step, ctx.device, repeats)
                tflops = forward_flops * (3.5 if backward else 1) / seconds / 1e12
                rows.append({"length": length, "batch": batch, "backend": backend,
                             "pass": "forward+backward" if backward else "forward", "ms": seconds * 1e3,
                             "tflops": tflops, "of_measured_peak": tflops / measured_peak,
                             "of_datasheet_peak": tflops / datasheet if datasheet else None})
    head = (f"{heads} heads x {head_dim}, {str(dtype).replace('torch.', '')}, equal lengths; matmul measured here "
            f"{measured_peak:.1f} TFLOP/s; datasheet peak {datasheet or '?'} TFLOP/s. "
            + (attention_timings.__doc__.split("\n")[0]) + " " + attention_timings.__doc__.split("\n")[1].strip())
    if ctx.device.type != "cuda":
        head += "\n\ntriton not timed: on the CPU it runs only under the interpreter."
    table = markdown_table(rows, ["length", "batch", "backend", "pass", "ms", "tflops", "of_measured_peak",
                                  "of_datasheet_peak"])
    return {"rows": rows, "measured_peak_tflops": measured_peak, "datasheet_peak_tflops": datasheet, "ok": True,
            "markdown": f"{head}\n\n{table}"}


# --- step 3: encode ----------------------------------------------------------------------------------------

def synchronized(fn, device):
    def call():
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result
    return call


def encode_check(ctx) -> dict:
    rows_stsb = load_stsb(ctx.data / "stsb", "test")[: 8 if ctx.dry else None]
    sentences = [row["sentence1"] for row in rows_stsb] + [row["sentence2"] for row in rows_stsb]
    scores = [row["score"] for row in rows_stsb]
    corpora = {"STS-B test": sentences, "SciFact abstracts": scifact_abstracts(ctx.data / "scifact", 8 if ctx.dry else 1000)}
    model = minilm.load(ctx.model, device=ctx.device, max_seq_length=256)
    precisions = ["fp32", "bf16"] if ctx.dry else ["fp16", "bf16"]
    references = {}
    if not ctx.dry:
        from sentence_transformers import SentenceTransformer

        references["sentence-transformers fp32"] = SentenceTransformer(str(model.source_dir), device=ctx.device.type)
        references["sentence-transformers fp16"] = SentenceTransformer(str(model.source_dir),
                                                                       device=ctx.device.type).half()
        for reference in references.values():
            reference.max_seq_length = 256
    rounds = 1 if ctx.dry else 3
    rows = []
    for corpus, texts in corpora.items():
        if ctx.out_of_time():
            break
        paths = {f"minilm {p}": synchronized(lambda p=p: model.encode(texts, batch_size=32, precision=p), ctx.device)
                 for p in precisions}
        for name, reference in references.items():
            paths[name] = synchronized(lambda reference=reference: reference.encode(
                texts, batch_size=32, convert_to_numpy=True), ctx.device)
        measured = timed_in_turns(paths, rounds)
        baseline = "sentence-transformers fp32" if references else f"minilm {precisions[0]}"
        base_times, base_embeddings = measured[baseline]
        for name, (times, embeddings) in measured.items():
            embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
            base = torch.as_tensor(base_embeddings, dtype=torch.float32)
            per_round = [b / t for b, t in zip(base_times, times)]
            row = {"corpus": corpus, "path": name, "texts_per_s": len(texts) / statistics.median(times),
                   "x_baseline": statistics.median(base_times) / statistics.median(times),
                   "range": [min(per_round), max(per_round)],
                   "max_abs_diff": float((embeddings - base).abs().max()),
                   "min_cosine": float(torch.nn.functional.cosine_similarity(embeddings, base).min())}
            if corpus == "STS-B test":
                half = len(rows_stsb)
                row["spearman"] = similarity_metrics(embeddings[:half], embeddings[half:], scores)["spearman_cosine"]
            rows.append(row)
    table = markdown_table(rows, ["corpus", "path", "texts_per_s", "x_baseline", "range", "spearman",
                                  "max_abs_diff", "min_cosine"])
    note = (f"batch 32, max_seq_length 256, median of {rounds} alternating rounds; x and differences against "
            f"{'sentence-transformers fp32 on the same GPU' if references else 'minilm fp32 (dry run: no reference)'}")
    return {"rows": rows, "ok": True, "markdown": f"{note}\n\n{table}"}


# --- step 4: training --------------------------------------------------------------------------------------

def run_process(command: list, timeout: float, env: dict) -> dict:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 1), env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, command[:4]))} ... exited {done.returncode}:\n{done.stderr[-2000:]}")
    result = last_json_line(done.stdout)
    result.setdefault("wall_seconds", time.perf_counter() - started)
    return result


def training_check(ctx) -> dict:
    steps, batch, log_every = (2, 4, 1) if ctx.dry else (200, 64, 10)
    common = ["--loss", "mnrl", "--data", str(ctx.data / "stsb"), "--batch-size", str(batch),
              "--max-steps", str(steps)]
    # one thread in the dry run: on a shared CPU, idle OpenMP threads spin and burn CPU time
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if ctx.dry else {}))
    toy = ["--max-seq-length", "32"] if ctx.dry else []
    result = {"ok": True, "steps": steps, "batch": batch}
    with tempfile.TemporaryDirectory() as scratch:
        ours_dir = Path(scratch) / "minilm"
        ours = run_process([sys.executable, "-c", WRAPPER, *common, "--model", str(ctx.model), "--out",
                            str(ours_dir), "--precision", "bf16", "--device", ctx.device.type, "--no-progress",
                            "--save-steps", "0", "--log-steps", str(log_every), *toy], ctx.seconds_left(), env)
        log = [json.loads(line) for line in (ours_dir / "log.jsonl").read_text().splitlines()]
        losses = [[entry["step"], entry["loss"]] for entry in log if "loss" in entry and "step" in entry]
        train_seconds = [entry["seconds"] for entry in log if "seconds" in entry][-1]
        result["minilm"] = {"wall_seconds": ours["wall_seconds"], "train_seconds": train_seconds,
                            "pairs_per_second": steps * batch / train_seconds, "losses": losses}
        if not ctx.dry:
            try:
                theirs = run_process([sys.executable, "benchmarks/reference_train.py", *common, "--model",
                                      str(ctx.model), "--out", str(Path(scratch) / "st"), "--device",
                                      ctx.device.type, "--precision", "bf16", "--logging-steps", str(log_every)],
                                     ctx.seconds_left(), env)
                result["sentence_transformers"] = {key: theirs[key] for key in (
                    "wall_seconds", "train_seconds", "pairs_per_second", "losses")}
            except Exception as error:  # noqa: BLE001  (reported; minilm's half still stands)
                result["sentence_transformers"] = {"error": f"{type(error).__name__}: {error}"[-2000:]}
                result["ok"] = False
    lines = [f"MNRL on STS-B train pairs, batch {batch}, {steps} steps, --precision bf16 (AMP), whole process\n",
             "| | whole process s | training s | pairs/s |", "|---|---:|---:|---:|"]
    theirs = result.get("sentence_transformers", {})
    for name, run in (("minilm train.py", result["minilm"]), ("sentence-transformers trainer", theirs)):
        if "wall_seconds" in run:
            lines.append(f"| {name} | {run['wall_seconds']:.1f} | {run['train_seconds']:.1f} | "
                         f"{run['pairs_per_second']:.0f} |")
    if "wall_seconds" in theirs:
        lines.append(f"\nwhole process: minilm {theirs['wall_seconds'] / result['minilm']['wall_seconds']:.2f}x "
                     f"sentence-transformers; training loop "
                     f"{result['minilm']['pairs_per_second'] / theirs['pairs_per_second']:.2f}x")
    elif "error" in theirs:
        lines.append(f"\nsentence-transformers trainer failed: {theirs['error'].splitlines()[-1]}")
    curve = {step: [loss, None] for step, loss in result["minilm"]["losses"]}
    for step, loss in theirs.get("losses", []):
        curve.setdefault(step, [None, None])[1] = loss
    lines += ["\n| step | minilm loss | sentence-transformers loss |", "|---:|---:|---:|"]
    lines += [f"| {step} | {fmt(a)} | {fmt(b)} |" for step, (a, b) in sorted(curve.items())]
    result["markdown"] = "\n".join(lines)
    return result


# --- the report --------------------------------------------------------------------------------------------

def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:.2e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5) else f"{value:.3f}"
    if isinstance(value, list):
        return "-".join(fmt(x) for x in value)
    return str(value)


def markdown_table(rows: list, columns: list) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


class Context:
    def __init__(self, args):
        self.dry = args.dry_run
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.started = time.perf_counter()
        self.limit = args.time_limit
        source = Path(args.source) if args.source else None
        self.model = str(source / "model") if source else args.model
        self.data = source / "data" if source else Path(args.data)

    def seconds_left(self) -> float:
        return self.limit - (time.perf_counter() - self.started)

    def out_of_time(self) -> bool:
        return self.seconds_left() <= 0


STEPS = [("kernels", kernel_tests, 30), ("attention timings", attention_timings, 20), ("encode", encode_check, 60),
         ("training", training_check, 90)]  # name, function, seconds it needs at least to be worth starting


def make_bundle(target: Path, data: Path) -> None:
    """The model with fp16 weights and the data the steps read, small enough for the device tool's carry."""
    from safetensors.torch import load_file, save_file

    model = minilm.load(MODEL, device="cpu")
    model.save(target / "model")
    weights = target / "model" / "model.safetensors"
    save_file({name: value.half().contiguous() for name, value in load_file(weights).items()}, weights)
    (target / "data" / "stsb").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        shutil.copyfile(data / "stsb" / f"{split}.tsv", target / "data" / "stsb" / f"{split}.tsv")
    (target / "data" / "scifact").mkdir(exist_ok=True)
    with open(data / "scifact" / "corpus.jsonl", encoding="utf-8") as lines:
        head = [next(lines) for _ in range(1000)]
    (target / "data" / "scifact" / "corpus.jsonl").write_text("".join(head), encoding="utf-8")
    size = sum(path.stat().st_size for path in target.rglob("*") if path.is_file())
    print(f"wrote {target} ({size / 2**20:.1f} MiB)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu-check", help="folder for report.md and report.json")
    parser.add_argument("--dry-run", action="store_true", help="every step at toy sizes on the CPU")
    parser.add_argument("--model", default=MODEL, help="model directory or hub id (default: %(default)s)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with stsb/, scifact/")
    parser.add_argument("--from", dest="source", help="a folder made by --bundle (model/ and data/ inside)")
    parser.add_argument("--bundle", help="write the model (fp16 weights) and data for the device here, and stop")
    parser.add_argument("--time-limit", type=float, default=450, help="seconds for all steps (default 450)")
    parser.add_argument("--steps", nargs="+", choices=[name.split()[0] for name, _, _ in STEPS],
                        help="run only these steps")
    args = parser.parse_args(argv)
    if args.bundle:
        make_bundle(Path(args.bundle), Path(args.data))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --dry-run to check the script on the CPU")
    ctx = Context(args)
    if ctx.dry:
        torch.set_num_threads(1)  # as in training_check: spinning OpenMP threads only cost CPU time here
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "sentence_transformers", "transformers", "tokenizers"):
        try:
            versions[package] = __import__(package).__version__
        except Exception as error:  # noqa: BLE001
            versions[package] = f"missing ({type(error).__name__})"
    device_name = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "CPU (dry run)"
    report = {"device": device_name, "dry_run": ctx.dry, "versions": versions, "steps": {}}
    markdown = [f"# GPU check: {device_name}\n", "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    for name, function, needs in STEPS:
        if args.steps and name.split()[0] not in args.steps:
            continue
        started = time.perf_counter()
        if ctx.seconds_left() < (0 if ctx.dry else needs):
            result = {"ok": False, "skipped": f"time guard: {ctx.seconds_left():.0f} s left of {ctx.limit:.0f}"}
        else:
            try:
                result = function(ctx)
            except Exception as error:  # noqa: BLE001  (one failure is reported; the other steps still run)
                result = {"ok": False, "error": traceback.format_exc()[-4000:]}
                print(f"step {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
        result["seconds"] = time.perf_counter() - started
        body = result.pop("markdown", None) or (f"**skipped**: {result['skipped']}" if "skipped" in result else
                                                f"**failed**:\n\n```\n{result.get('error', '')}\n```")
        status = "ok" if result["ok"] else ("skipped" if "skipped" in result else "FAILED")
        markdown += [f"\n## {name} ({status}, {result['seconds']:.0f} s)\n", body]
        report["steps"][name] = result
        print(f"{name}: {status} in {result['seconds']:.1f} s", flush=True)
    report["seconds"] = time.perf_counter() - ctx.started
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text("\n".join(markdown) + "\n")
    print(f"wrote {out / 'report.md'} and {out / 'report.json'} ({report['seconds']:.0f} s)")
    return 0 if all(step["ok"] for step in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
