"""Every Triton kernel of minilm/kernels compiled ahead of time for real GPUs (sm_80 and sm_90), no GPU needed.

The interpreter (tests/test_kernels.py) checks what the kernels compute but neither compiles them nor checks that
they fit a GPU. Here each kernel goes through Triton's whole pipeline down to ptxas, for every dtype and head
dimension the launcher accepts, with the constexprs the launcher passes (`launch_constexprs`, which the launchers
call too), and the test checks what ptxas reports: registers per thread, spills, shared memory per block.

The compiles run in one subprocess without TRITON_INTERPRET (conftest.py sets it for this process, and under it
@triton.jit makes interpreter functions that cannot be compiled), with a fresh Triton cache, so a cached result
never hides a failure.
"""

import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use (A100, H100)
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM on both, so registers x threads of one block must fit
MAX_SPILL = 1024  # bytes of spill stores per thread: ptxas spills 12 B in the bf16/fp16 forward at head dim 32 on
# sm_80 and ~340 B in the fp32 dK/dV kernel at head dim 128 (measured, all 120 compiles); kilobytes would mean a
# tile that no longer fits in registers (the fp32 backward spilled 17 KB before its launch settings were fixed).
HEADS = 12  # all-MiniLM-L6-v2; HEADS only divides program ids, it changes no tile
POOL_DIMS = (384, 768)  # MiniLM's width (BLOCK_D 512) and BERT-base's (BLOCK_D 1024, the largest tile)

ATTENTION_KERNELS = ("_forward", "_backward_preprocess", "_backward_dk_dv", "_backward_dq")
POOLING_KERNELS = ("_pool_forward", "_pool_backward")

# The type of every runtime argument, by name ("{dtype}" is the dtype of q or of the tokens). Arguments the
# launchers always pass as multiples of 16 (pointers from torch allocations, strides of MiniLM-shaped tensors)
# get Triton's divisibility hint, as the JIT would give them.
ARG_TYPES = {
    "Q": "*{dtype}", "K": "*{dtype}", "V": "*{dtype}", "Out": "*{dtype}", "dOut": "*{dtype}", "dQ": "*{dtype}",
    "dK": "*{dtype}", "dV": "*{dtype}", "Tokens": "*{dtype}", "dTokens": "*{dtype}",
    "LSE": "*fp32", "Delta": "*fp32", "Norm": "*fp32", "cu_seqlens": "*i32",
    "scale_log2": "fp32", "scale": "fp32", "stride_t": "i32", "stride_h": "i32", "total": "i32", "dim": "i32",
}
UNALIGNED = {"scale_log2", "scale", "total"}  # any value: no divisibility hint


def jobs():
    """(kernel, dtype, arch, size): size is the head dim for attention kernels, the width for pooling ones.

    Each compile costs ~0.5 s of CPU, and all 120 combinations ~60 s, over this test's share of the suite's
    budget. So by default each kernel is compiled for every pair of (dtype, arch), (dtype, size) and (arch, size)
    (3 x 4 = 12 compiles per attention kernel, 6 per pooling kernel, 60 in all, ~30 s); the largest fp32 tiles
    (head dim 128, the most registers and shared memory) land on sm_80, whose shared memory is the smaller.
    MINILM_COMPILE_ALL=1 compiles every combination (run it after editing a kernel)."""
    from minilm.kernels.attention import HEAD_DIMS

    sizes = {**{name: HEAD_DIMS for name in ATTENTION_KERNELS}, **{name: POOL_DIMS for name in POOLING_KERNELS}}
    if os.environ.get("MINILM_COMPILE_ALL") == "1":
        return [job for name in sizes for job in itertools.product([name], DTYPES, ARCHS, sizes[name])]
    return [(name, dtype, ARCHS[(i + j + 1) % 2], size) for name in sizes
            for i, dtype in enumerate(DTYPES) for j, size in enumerate(sizes[name])]


def _ptxas_report(log: str) -> dict:
    """Registers, spill bytes and static shared memory from `ptxas -v` (the log Triton prints on request)."""
    def number(pattern):
        found = re.findall(pattern, log)
        return max(int(x) for x in found) if found else 0
    if not re.search(r"Used \d+ registers", log):
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "static_shared": number(r"(\d+) bytes smem")}


def compile_one(kernel_name: str, dtype: str, arch: int, size: int) -> dict:
    """Compile one kernel as its launcher would launch it and return what ptxas and Triton report."""
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from minilm.kernels import attention, pooling

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if kernel_name in ATTENTION_KERNELS:
        module, constexprs = attention, attention.launch_constexprs(torch_dtype, HEADS, size, interpreted=False)
    else:
        module, constexprs = pooling, pooling.launch_constexprs(size, normalize=True)
    kernel, constexprs = getattr(module, kernel_name), dict(constexprs[kernel_name])
    options = {"num_warps": constexprs.pop("num_warps")} if "num_warps" in constexprs else {}
    signature = {name: "constexpr" if name in constexprs else ARG_TYPES[name].format(dtype=dtype)
                 for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name not in constexprs and name not in UNALIGNED}
    started = time.process_time(), os.times().children_user
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's output instead of discarding it
    knobs.compilation.always_compile = True  # never a cache hit (which would print no ptxas log)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
    report = _ptxas_report(log.getvalue())
    report.update(shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                  cubin_bytes=len(compiled.asm["cubin"]),
                  cpu_s=round(time.process_time() - started[0] + os.times().children_user - started[1], 3))
    return report


def _worker():
    """Subprocess entry: compile every job given on stdin as JSON, print one JSON line per job."""
    for kernel_name, dtype, arch, size in json.load(sys.stdin):
        result = {"job": [kernel_name, dtype, arch, size]}
        try:
            result.update(compile_one(kernel_name, dtype, arch, size))
        except Exception as error:  # reported per job, so one kernel's failure names itself
            result["error"] = f"{type(error).__name__}: {error}"[-4000:]
        print(json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env.update(TRITON_CACHE_DIR=cache, TRITON_DEFAULT_FP_FUSION="1")  # fusion is the default; this silences
        # Triton 3.9's warning that the default will change
        done = subprocess.run([sys.executable, __file__], input=json.dumps(jobs()), env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"the compile subprocess failed ({done.returncode}):\n{done.stderr[-4000:]}")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {tuple(r["job"]): r for r in results}


@pytest.mark.parametrize("job", jobs(), ids=lambda job: "-".join(map(str, job)))
def test_kernel_compiles_and_fits(compiled, job):
    kernel_name, dtype, arch, size = job
    result = compiled.get(tuple(job))
    assert result is not None, f"{job}: no result from the compile subprocess"
    assert "error" not in result, f"{job} does not compile for sm_{arch}: {result['error']}"
    threads = result["num_warps"] * 32
    assert result["registers"] * threads <= REGISTER_FILE, f"{job}: {result['registers']} registers x {threads}"
    assert result["spill_stores"] <= MAX_SPILL, f"{job}: {result['spill_stores']} bytes of spill stores"
    shared = max(result["shared"], result["static_shared"])
    assert shared <= SHARED_LIMIT[arch], f"{job}: {shared} bytes of shared memory > sm_{arch}'s {SHARED_LIMIT[arch]}"
    assert result["cubin_bytes"] > 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a script: tests/ is on the path, the package beside it may not be
    _worker()
