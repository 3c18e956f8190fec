"""minilm/cpu.py: what precision="auto" picks on each kind of CPU, the warnings for slow explicit precisions, the
probe (measured once per process). The CPUs are faked (their flags and GEMM rates): the decisions, not this
machine's timings, are under test; one test runs the real probe on a tiny size and checks only its form."""

import math

import pytest

from minilm import cpu
from minilm.errors import InputError


def fake_cpu(*flags, bf16=None, fp16=None):
    """A CPU with these /proc/cpuinfo flags; oneDNN runs bf16/fp16 where the flags say so, unless told."""
    flags = frozenset(flags)
    return cpu.CPU(vendor="AuthenticAMD", model="AMD EPYC (fake)", flags=flags, torch_capability="AVX2",
                   onednn_bf16=bool(flags & {"avx512_bf16", "amx_bf16"}) if bf16 is None else bf16,
                   onednn_fp16=bool(flags & {"avx512_fp16", "amx_fp16"}) if fp16 is None else fp16)


AVX2 = fake_cpu("avx2")
ZEN4 = fake_cpu("avx2", "avx512f", "avx512_vnni", "avx512_bf16")  # AVX-512 bf16 and VNNI, no AMX
CASCADE_LAKE = fake_cpu("avx2", "avx512f", "avx512_vnni")  # VNNI, no bf16
SAPPHIRE_RAPIDS = fake_cpu("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
# G(FL)OP/s measured by bench_encode.py (benchmarks/README.md): AMD EPYC with AVX2 only, and with AVX-512 bf16 + VNNI
AVX2_RATES = {"fp32": 71.0, "bf16": 1.0, "fp16": 1.2, "int8": 1.0}
ZEN4_RATES = {"fp32": 139.0, "bf16": 372.0, "fp16": 139.0, "int8": 820.0}


@pytest.fixture
def no_probe(monkeypatch):
    """Fail the test if the GEMM probe runs: where the instruction sets decide, nothing is measured."""
    def probe():
        raise AssertionError("the GEMM probe ran")
    monkeypatch.setattr(cpu, "gemm_rates", probe)


def test_avx2_only_picks_fp32_without_probing(no_probe):
    choice = cpu.choose_precision(AVX2)
    assert choice.precision == "fp32"
    assert choice.reason.startswith("auto -> fp32: no amx_bf16/avx512_bf16, no amx_int8/avx512_vnni/avx_vnni")


def test_avx2_only_warns_with_the_measured_factor_for_every_fast_precision():
    assert cpu.slow_precision_warning("fp32", AVX2, AVX2_RATES) is None
    assert cpu.slow_precision_warning("bf16", AVX2, AVX2_RATES) == (
        "precision bf16 runs 71x slower than fp32 on this CPU (no amx_bf16/avx512_bf16): use fp32 or auto")
    assert "fp16 runs 59x slower" in cpu.slow_precision_warning("fp16", AVX2, AVX2_RATES)
    assert "int8 runs 71x slower" in cpu.slow_precision_warning("int8", AVX2, AVX2_RATES)
    assert cpu.slowdown("bf16", AVX2_RATES) == pytest.approx(71.0)
    assert cpu.slowdown("fp32", AVX2_RATES) == 1.0


def test_a_precision_that_is_not_slower_does_not_warn():
    rates = {"fp32": 100.0, "bf16": 90.0, "fp16": 100.0, "int8": 300.0}  # 1.1x: noise, not a trap
    assert cpu.slow_precision_warning("bf16", AVX2, rates) is None
    assert cpu.slowdown("int8", rates) == 1.0


def test_amx_precisions_never_warn_and_never_probe(no_probe):
    for precision in ("bf16", "int8"):
        assert cpu.slow_precision_warning(precision, SAPPHIRE_RAPIDS) is None
    assert cpu.slow_precision_warning("fp16", fake_cpu("avx512_fp16", "amx_fp16")) is None
    # oneDNN without bf16 support on a CPU whose flags have it: encode's bf16 is not fast there
    assert not fake_cpu("avx512_bf16", bf16=False).fast("bf16")


def test_avx512_precisions_are_probed_and_warn_where_they_run_slower_than_fp32():
    """AVX-512 bf16 / fp16 / VNNI do not make a precision faster than fp32 by themselves: oneDNN held to
    AVX512_CORE_BF16 on a Xeon with AMX ran bf16's GEMMs 1.8x slower than fp32 (encode 0.58x). Where the probe
    says so, the explicit precision warns; where it is faster (AMD EPYC), it does not."""
    held = {"fp32": 216.0, "bf16": 121.0, "fp16": 16.4, "int8": 837.0}
    assert cpu.slow_precision_warning("bf16", ZEN4, held) == (
        "precision bf16 runs 1.8x slower than fp32 on this CPU (avx512_bf16 without AMX): use fp32 or auto")
    assert cpu.slow_precision_warning("int8", ZEN4, held) is None
    for precision in ("bf16", "int8"):
        assert cpu.slow_precision_warning(precision, ZEN4, ZEN4_RATES) is None
    assert "fp16 runs 13x slower than fp32 on this CPU (avx512_fp16 without AMX)" in cpu.slow_precision_warning(
        "fp16", fake_cpu("avx2", "avx512f", "avx512_fp16"), held)
    without_onednn = fake_cpu("amx_bf16", bf16=False)  # the flags, but oneDNN in this torch does not run bf16
    assert "(oneDNN does not run bf16 here)" in cpu.slow_precision_warning("bf16", without_onednn, held)


def test_amx_picks_bf16_without_probing(no_probe):
    choice = cpu.choose_precision(SAPPHIRE_RAPIDS)
    assert choice.precision == "bf16" and choice.reason.startswith("auto -> bf16: amx_bf16")


def test_vnni_and_avx512_bf16_pick_bf16_even_where_int8s_gemm_is_faster():
    """The AMD EPYC of benchmarks/README.md: int8's GEMM ran 2.2x bf16's, its encode 0.46-0.64x bf16's."""
    choice = cpu.choose_precision(ZEN4, ZEN4_RATES)
    assert choice == cpu.Choice("bf16", "auto -> bf16: avx512_bf16, bf16 GEMM 2.7x fp32, int8 GEMM 5.9x fp32 (int8 "
                                        "encodes slower than bf16 where both run natively)")
    much_faster_int8 = {**ZEN4_RATES, "int8": 5000.0}
    assert cpu.choose_precision(ZEN4, much_faster_int8).precision == "bf16"
    # bf16 that does not beat fp32 here (oneDNN held to AVX512_CORE_BF16 on a Xeon): int8 where its GEMM pays
    held = {"fp32": 216.0, "bf16": 121.0, "fp16": 16.4, "int8": 837.0}
    assert cpu.choose_precision(ZEN4, held) == cpu.Choice(
        "int8", "auto -> int8: avx512_vnni, bf16 GEMM 1.8x slower than fp32, int8 GEMM 3.9x fp32")


def test_vnni_without_bf16_picks_int8_when_the_probe_says_faster():
    assert cpu.choose_precision(CASCADE_LAKE, {"fp32": 100.0, "bf16": 2.0, "fp16": 2.0, "int8": 350.0}) == \
        cpu.Choice("int8", "auto -> int8: avx512_vnni, bf16 GEMM 50x slower than fp32, int8 GEMM 3.5x fp32")
    # the instructions are there but int8's GEMM gains too little to pay for its quantization and float32
    # attention (1.5x GEMM encoded at 0.45x fp32): fp32, with the figures that say why
    choice = cpu.choose_precision(CASCADE_LAKE, {"fp32": 100.0, "bf16": 2.0, "fp16": 2.0, "int8": 250.0})
    assert choice == cpu.Choice("fp32", "auto -> fp32: bf16 GEMM 50x slower than fp32, int8 GEMM 2.5x fp32")


def test_unknown_precision_is_an_input_error():
    with pytest.raises(InputError, match="unknown precision 'int4'; expected one of"):
        cpu.slowdown("int4", AVX2_RATES)


def test_cpuinfo_is_read_from_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum\n"
                    "flags\t\t: fpu avx2 avx512f amx_bf16\n\nprocessor\t: 1\nvendor_id\t: other\n")
    fields = cpu._cpuinfo(info)
    assert fields["vendor_id"] == "GenuineIntel" and fields["model name"] == "Intel(R) Xeon(R) Platinum"
    assert fields["flags"].split() == ["fpu", "avx2", "avx512f", "amx_bf16"]
    assert cpu._cpuinfo(tmp_path / "absent") == {}
    assert SAPPHIRE_RAPIDS.summary() == ("AMD EPYC (fake) (AuthenticAMD): AVX2, AVX-512, AVX-512 VNNI, AVX-512 bf16, "
                                         "AVX-512 fp16, AMX bf16/int8; torch kernels AVX2")
    assert AVX2.summary().endswith(": AVX2, no AMX; torch kernels AVX2")


def test_onednn_held_to_an_older_instruction_set_is_described_as_that_cpu(monkeypatch):
    """$ONEDNN_MAX_CPU_ISA holds every fast matrix multiply of encode (oneDNN's) below the CPU: describe_cpu reports
    the instruction sets oneDNN may use, so auto and the warnings follow the CPU it emulates."""
    try:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        cpu.describe_cpu.cache_clear()
        raw = cpu.describe_cpu()
        for cap, allowed in (("AVX2", {"avx2"}), ("avx512_core_vnni", {"avx2", "avx512f", "avx512_vnni"}),
                             ("ALL", set(cpu.FLAGS))):
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
            cpu.describe_cpu.cache_clear()
            held = cpu.describe_cpu()
            assert held.flags == raw.flags & allowed
            assert held.onednn_cap == (cap.upper() if raw.flags - allowed else "")
    finally:
        cpu.describe_cpu.cache_clear()  # described again from the environment the suite runs in
    capped = cpu.CPU("AuthenticAMD", "AMD EPYC (fake)", frozenset({"avx2"}), "AVX2", False, False, "AVX2")
    assert capped.summary().endswith(": AVX2, no AMX (oneDNN held to AVX2 by $ONEDNN_MAX_CPU_ISA); torch kernels AVX2")


def test_int8_sums_saturate_where_the_cpu_has_neither_vnni_nor_amx():
    if "avx2" not in cpu.describe_cpu().flags:
        pytest.skip("not an x86 CPU with AVX2: which int8 kernels run here is not known to this test")
    assert cpu.int8_sums_saturate() == (not cpu.describe_cpu().native("int8"))


def test_this_cpu_is_described_once():
    assert cpu.describe_cpu() is cpu.describe_cpu()
    assert cpu.describe_cpu().flags <= set(cpu.FLAGS)


def test_the_probe_runs_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "measure_gemm_rates", lambda rows, repeats: calls.append(rows) or dict(ZEN4_RATES))
    cpu.gemm_rates.cache_clear()
    try:
        assert cpu.gemm_rates() is cpu.gemm_rates() and calls == [cpu.PROBE_ROWS]
    finally:
        cpu.gemm_rates.cache_clear()


def test_a_slow_precision_is_timed_on_the_trial_only(monkeypatch):
    timed = []
    per_row = {"fp32": 10.0, "bf16": 0.2, "fp16": 9.0, "int8": 40.0}  # bf16 50x slower than fp32 on the trial
    monkeypatch.setattr(cpu, "_layer", lambda precision, rows, shapes: rows)  # a "layer" is its number of rows

    def best_rates(layers, repeats):
        timed.append(dict(layers))
        return {precision: per_row[precision] * rows for precision, rows in layers.items()}

    monkeypatch.setattr(cpu, "_best_rates", best_rates)
    rates = cpu.measure_gemm_rates(256, repeats=1)
    assert timed == [dict.fromkeys(cpu.PRECISIONS, cpu.TRIAL_ROWS), {"fp32": 256, "fp16": 256, "int8": 256}]
    assert rates == {"fp32": 2560.0, "bf16": 0.2 * cpu.TRIAL_ROWS, "fp16": 2304.0, "int8": 10240.0}


def test_the_real_probe_measures_every_precision_on_a_tiny_size():
    rates = cpu.measure_gemm_rates(64, repeats=1)
    assert sorted(rates) == sorted(cpu.PRECISIONS)
    assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())
