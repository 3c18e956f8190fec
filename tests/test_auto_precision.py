"""precision="auto" and the warnings for slow explicit precisions, where they are wired in: fast_paths.resolve_precision
(decided once per process, logged once), encode, eval.py --precision. What auto picks on each kind of CPU is
tests/test_cpu.py's; here the choice is faked where the wiring, not this CPU, is under test."""

import json
import logging

import numpy as np
import pytest
import torch

import minilm
from minilm import cpu, fast_paths
from minilm.errors import InputError

TEXTS = ["A man is playing a guitar.", "Two dogs run across a snowy field.", "Stocks fell sharply today."]


@pytest.fixture
def fresh_choice(monkeypatch):
    """auto_precision decided anew in this test (and again after it: the fakes never outlive it), fast_paths'
    and cpu.py's once-only logs emptied."""
    monkeypatch.setattr(fast_paths, "_logged", set())
    monkeypatch.setattr(cpu, "_warned", set())
    fast_paths.auto_precision.cache_clear()
    yield
    fast_paths.auto_precision.cache_clear()


def messages(caplog, logger=None) -> list:
    return [record.getMessage() for record in caplog.records if logger in (None, record.name)]


def test_auto_is_decided_once_per_process_and_logged_once(fresh_choice, monkeypatch, caplog):
    calls = []
    choice = cpu.Choice("int8", "auto -> int8: avx512_vnni, int8 GEMM 5.9x fp32")
    monkeypatch.setattr(cpu, "choose_precision", lambda: calls.append(1) or choice)
    with caplog.at_level(logging.WARNING):
        assert [fast_paths.resolve_precision("cpu", "auto") for _ in range(3)] == ["int8"] * 3
    assert calls == [1] and messages(caplog) == [choice.reason]


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_is_bf16_where_the_gpu_has_it(fresh_choice, monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    monkeypatch.setattr(cpu, "choose_precision", lambda: pytest.fail("the CPU's choice was asked for CUDA"))
    choice = fast_paths.auto_precision("cuda")
    assert choice.precision == expected and choice.reason.startswith(f"auto -> {expected}: this CUDA GPU")
    # torch.device("cuda") needs no GPU: the rule, not a device, is under test
    assert fast_paths.resolve_precision(torch.device("cuda"), "auto") == expected


def test_an_explicit_slow_precision_warns_once_on_the_cpu_only(fresh_choice, monkeypatch, caplog):
    warning = "precision bf16 runs 71x slower than fp32 on this CPU (no amx_bf16/avx512_bf16): use fp32 or auto"
    monkeypatch.setattr(cpu, "slow_precision_warning", lambda precision: warning if precision == "bf16" else None)
    with caplog.at_level(logging.WARNING):
        assert fast_paths.resolve_precision("cpu", "fp32") == "fp32"
        assert [fast_paths.resolve_precision("cpu", "bf16") for _ in range(2)] == ["bf16", "bf16"]
        assert fast_paths.resolve_precision("cuda", "bf16") == "bf16"  # the CPU's speed says nothing of a GPU's
        cpu.warn_if_slow("bf16", torch.device("cuda"))  # train.py's one line, for a run on a GPU
        cpu.warn_if_slow("bf16", "cpu")  # and on the CPU: said already
    assert messages(caplog) == [warning]
    with pytest.raises(InputError, match=r"precision must be one of \('fp32', 'bf16', 'fp16', 'int8', 'auto'\)"):
        fast_paths.resolve_precision("cpu", "int4")


def test_encode_auto_runs_the_chosen_precision_and_warns_for_a_slow_one(tiny_model_dir, one_thread, fresh_choice,
                                                                        monkeypatch, caplog):
    model = minilm.load(tiny_model_dir, device="cpu")
    choice = fast_paths.auto_precision("cpu")  # this CPU's real choice
    with caplog.at_level(logging.WARNING):
        auto = [model.encode(TEXTS, precision="auto") for _ in range(2)]
    np.testing.assert_array_equal(auto[0], model.encode(TEXTS, precision=choice.precision))
    np.testing.assert_array_equal(auto[1], auto[0])
    assert messages(caplog, "minilm.fast_paths") == [choice.reason]
    warning = "precision fp16 runs 59x slower than fp32 on this CPU (no amx_fp16/avx512_fp16): use fp32 or auto"
    monkeypatch.setattr(cpu, "slow_precision_warning", lambda precision: warning if precision == "fp16" else None)
    with caplog.at_level(logging.WARNING):
        model.encode(TEXTS[:1], precision="fp16")
        model.encode(TEXTS[:1], precision="fp16")
    assert messages(caplog, "minilm.cpu") == [warning]
    with pytest.raises(InputError, match="precision must be one of"):
        model.encode(TEXTS, precision="Auto")


def test_eval_precision_auto_records_the_precision_that_ran(tiny_model_dir, one_thread, tmp_path, capsys):
    import eval as eval_script

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{a}\t{b}\t{score}\n" for a, b, score in zip(TEXTS, TEXTS[1:] + TEXTS[:1], (1.0, 2.5, 4.0))))
    results = {}
    for precision in ("auto", fast_paths.auto_precision("cpu").precision):
        target = tmp_path / f"{precision}.json"
        assert eval_script.main(["--model", str(tiny_model_dir), "--task", "pairs", "--data", str(pairs),
                                 "--device", "cpu", "--precision", precision, "--json", str(target)]) == 0
        results[precision] = json.loads(target.read_text())
    chosen = fast_paths.auto_precision("cpu").precision
    assert results["auto"]["precision"] == chosen  # what ran, never "auto"
    assert results["auto"]["metrics"] == results[chosen]["metrics"]
    assert f"precision {chosen} (auto)" in capsys.readouterr().out


def test_every_precision_flag_that_takes_auto_says_what_auto_picks():
    """--help of eval.py --precision, python -m minilm encode --precision and train.py --eval-precision: each flag
    that takes auto says it is the fastest here within the quality bands (a bare choice list says nothing)."""
    import eval as eval_script
    import train
    from minilm import __main__ as cli

    encode_parser = next(action for action in cli.build_parser()._actions if action.dest == "command").choices["encode"]
    flags = {"eval.py --precision": (eval_script.build_parser(), "precision"),
             "python -m minilm encode --precision": (encode_parser, "precision"),
             "train.py --eval-precision": (train.build_parser(), "eval_precision")}
    for name, (parser, dest) in flags.items():
        action = next(action for action in parser._actions if action.dest == dest)
        assert "auto" in action.choices and "auto: the fastest" in " ".join(action.help.split()), name


def test_train_precision_bf16_warns_once_on_a_cpu_without_bf16(tiny_model_dir, one_thread, fresh_choice, monkeypatch,
                                                              tmp_path, caplog, capsys):
    """train.py --precision bf16 on a CPU without bf16 instructions (an AMD EPYC with AVX2 only, faked: its
    description and measured GEMM rates): one warning with the factor and the way out, before the first step;
    --precision fp32 gives none."""
    import train

    avx2 = cpu.CPU("AuthenticAMD", "AMD EPYC (fake)", frozenset({"avx2"}), "AVX2", False, False)
    monkeypatch.setattr(cpu, "describe_cpu", lambda: avx2)
    monkeypatch.setattr(cpu, "gemm_rates", lambda: {"fp32": 71.0, "bf16": 1.0, "fp16": 1.2, "int8": 1.0})
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t0.5\n" for a, b in zip(TEXTS, TEXTS[1:])))
    warning = "precision bf16 runs 71x slower than fp32 on this CPU (no amx_bf16/avx512_bf16): use fp32 or auto"
    for precision, expected in (("bf16", [warning]), ("fp32", [])):
        caplog.clear()
        monkeypatch.setattr(cpu, "_warned", set())
        with caplog.at_level(logging.WARNING):
            assert train.main(["--no-progress", "--model", str(tiny_model_dir), "--loss", "cosine", "--data",
                               str(pairs), "--batch-size", "2", "--max-steps", "1", "--precision", precision,
                               "--device", "cpu", "--save-steps", "0", "--out", str(tmp_path / precision)]) == 0
        assert messages(caplog, "minilm.cpu") == expected, precision
        assert f"process(es), {precision}, device cpu" in capsys.readouterr().out


def test_a_forced_linear_backend_that_cannot_run_the_precision_is_one_line_before_any_work(
        tiny_model_dir, one_thread, fresh_choice, monkeypatch, tmp_path, capsys):
    """$MINILM_LINEAR=onednn with a precision oneDNN cannot run here (bf16 on an AVX2-only CPU: faked, oneDNN
    running fp32 only): eval.py and python -m minilm encode say so in one line before encoding (encode, before DIR
    is made), train.py before its first step (it used to train, then fail at the evaluation with a traceback)."""
    import eval as eval_script
    import train
    from minilm import onednn
    from minilm.__main__ import main as cli

    monkeypatch.setattr(onednn, "available", lambda device, dtype: dtype == torch.float32)
    monkeypatch.setattr(cpu, "slow_precision_warning", lambda precision: None)
    monkeypatch.setenv("MINILM_LINEAR", "onednn")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t0.5\n" for a, b in zip(TEXTS, TEXTS[1:])))
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    problem = "$MINILM_LINEAR=onednn: linear backend 'onednn' cannot run bf16 on cpu here"

    def one_line(prefix):
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(prefix) and problem in err, err

    assert eval_script.main(["--model", str(tiny_model_dir), "--task", "pairs", "--data", str(pairs), "--device",
                             "cpu", "--precision", "bf16"]) == 2
    one_line("eval.py: error: --precision bf16: ")
    with pytest.raises(SystemExit):
        cli(["encode", str(tmp_path / "t.txt"), "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress",
             "--precision", "bf16", "--out", str(tmp_path / "dir")])
    one_line("python -m minilm encode: error: --precision bf16: ")
    assert not (tmp_path / "dir").exists()
    steps = []
    monkeypatch.setattr(train, "train", lambda run, stop: steps.append(run) or True)
    assert train.main(["--no-progress", "--model", str(tiny_model_dir), "--loss", "cosine", "--data", str(pairs),
                       "--max-steps", "1", "--eval-task", "pairs", "--eval-precision", "bf16", "--device", "cpu",
                       "--out", str(tmp_path / "run")]) == 2
    one_line("train.py: error: --eval-precision bf16: ")
    assert steps == []
