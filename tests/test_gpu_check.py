"""benchmarks/gpu_check.py --dry-run: every step of the GPU proof at toy sizes on the CPU, so the script that runs
when a GPU is lent (for minutes, with no time to debug) cannot rot."""

import importlib
import json
import math
import sys

from conftest import REPO, shared_data


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    """In this process (conftest has switched Triton's interpreter on), so the run costs no second start-up of
    torch; the training step still starts train.py as its own process, as on the GPU."""
    data = shared_data()
    shared_data("scifact", "corpus.jsonl")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        gpu_check = importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--data", str(data)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["kernels", "attention timings", "encode", "training"]
    assert all(step["ok"] for step in steps.values()), {name: step.get("error") for name, step in steps.items()}
    kernels = steps["kernels"]["rows"]
    assert {row["dtype"] for row in kernels} == {"fp32", "bf16", "fp16"}
    assert {row["kernel"] for row in kernels} == {"attention", "mean pool", "mean pool + normalize"}
    # Every row within its tolerance is implied by the step's "ok"; what is not: half precision really ran in half
    # precision: its largest error is far above float32's bound, 1e-5 (measured 3e-4 in fp16, 3e-3 in bf16; the
    # rounding of a 10- or 7-bit mantissa, 5e-4 and 4e-3 relative).
    for dtype in ("bf16", "fp16"):
        assert max(row["forward_error"] for row in kernels if row["dtype"] == dtype) > 1e-4, dtype
    timings = steps["attention timings"]["rows"]
    assert {(row["backend"], row["pass"]) for row in timings} == {
        (backend, which) for backend in ("math", "sdpa") for which in ("forward", "forward+backward")}
    assert all(row["tflops"] > 0 for row in timings)
    encode = steps["encode"]["rows"]
    assert {row["corpus"] for row in encode} == {"STS-B test", "SciFact abstracts"}
    bf16 = [row for row in encode if row["path"] == "minilm bf16"]
    assert len(bf16) == 2 and all(2e-4 < row["max_abs_diff"] < 2e-2 for row in bf16)  # measured ~2e-3
    training = steps["training"]
    assert [step for step, _ in training["minilm"]["losses"]] == [1, 2]
    assert all(math.isfinite(loss) for _, loss in training["minilm"]["losses"])
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.count("\n## ") == 4 and "FAILED" not in markdown
