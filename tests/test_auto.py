"""What the machine decides (fastfilm/auto.py): precision and kernels under a forced AVX2 capability and under
avx512_bf16 (mocked flags and probe results), an explicit config winning, threads, the log lines."""

from __future__ import annotations

import os

import pytest
import torch

from fastfilm import auto
from fastfilm.config import config_from_dict
from fastfilm.precision import autocast_dtype

AVX2_FLAGS = frozenset({"sse4_2", "avx", "avx2", "fma"})
BF16_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512_bf16"}
CPU = torch.device("cpu")


def cfg(precision="auto", kernels="auto", ds=None, **train):
    return config_from_dict(
        {
            "train": {"precision": precision, "max_minutes": 10, **train},
            "kernels": {"mode": kernels},
            "deepspeed": ds or {},
        }
    )


def probe(fp32, bf16):
    return lambda: {"fp32": fp32, "bf16": bf16}


def test_avx2_cpu_runs_fp32_and_says_why():
    c = cfg()
    ch = auto.choose_precision(
        c, CPU, flags=AVX2_FLAGS, capability="AVX2", tiny_probe=probe(1.0, 24.0), probe=pytest.fail
    )
    assert ch.value == "fp32"
    assert ch.line() == (
        "precision: fp32 (this CPU has no bf16 instructions (no avx512_bf16, no amx_bf16): bf16 matmul 24× slower)"
    )
    auto.apply_precision(c, ch)
    assert autocast_dtype(c.deepspeed) is None


def test_forced_avx2_capability_hides_avx512_bf16():
    """ATEN_CPU_CAPABILITY=avx2 on an avx512_bf16 CPU (how an AVX2 machine is emulated): fp32."""
    ch = auto.choose_precision(cfg(), CPU, flags=BF16_FLAGS, capability="AVX2", tiny_probe=probe(1.0, 30.0))
    assert ch.value == "fp32" and "capability is AVX2" in ch.reason and "30× slower" in ch.reason
    ch = auto.choose_precision(
        cfg(), CPU, flags=BF16_FLAGS, capability="AVX512", onednn_isa="AVX2", tiny_probe=probe(1.0, 30.0)
    )
    assert ch.value == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX2" in ch.reason


def test_avx512_bf16_cpu_runs_bf16_when_the_probe_says_faster():
    c = cfg()
    ch = auto.choose_precision(
        c, CPU, flags=BF16_FLAGS, capability="AVX512", onednn_isa="", probe=probe(2.0, 1.0)
    )
    assert ch.value == "bf16"
    assert (
        ch.line()
        == "precision: bf16 (this CPU has avx512_bf16; the model's forward + backward 2.00× faster in bf16 at batch ?)"
    )
    auto.apply_precision(c, ch)
    assert autocast_dtype(c.deepspeed) is torch.bfloat16
    # bf16 instructions, but the model's own shapes are not faster in bf16: fp32
    ch = auto.choose_precision(
        cfg(), CPU, flags=BF16_FLAGS, capability="AVX512", onednn_isa="", probe=probe(1.0, 1.0)
    )
    assert ch.value == "fp32" and "only 1.00× as fast" in ch.reason


@pytest.mark.parametrize("key", ["bf16", "fp16"])
def test_an_explicit_deepspeed_section_wins(key):
    c = cfg(ds={key: {"enabled": True}})
    for flags, cap in ((AVX2_FLAGS, "AVX2"), (BF16_FLAGS, "AVX512")):
        ch = auto.choose_precision(
            c, CPU, flags=flags, capability=cap, probe=pytest.fail, tiny_probe=pytest.fail
        )
        assert ch.value == key and ch.reason == f"deepspeed.{key} in the config"
        auto.apply_precision(c, ch)
        assert c.deepspeed[key]["enabled"] is True
    off = cfg(ds={"bf16": {"enabled": False}})  # explicitly off is explicit too
    ch = auto.choose_precision(off, CPU, flags=BF16_FLAGS, capability="AVX512", probe=pytest.fail)
    assert ch.value == "fp32" and "deepspeed.bf16" in ch.reason


def test_precision_deepspeed_is_the_sections_word():
    ch = auto.choose_precision(cfg(precision="deepspeed"), CPU, flags=BF16_FLAGS, probe=pytest.fail)
    assert ch.value == "fp32" and "train.precision=deepspeed" in ch.reason


def test_the_resolved_config_keeps_its_choice_when_reloaded():
    """A run folder's config.json (auto resolved into the DeepSpeed section) reloads to the same choice."""
    c = cfg()
    auto.apply_precision(c, auto.Choice("precision", "bf16", "x"))
    again = config_from_dict(c.to_dict())
    assert auto.explicit_precision(again) == "bf16" and autocast_dtype(again.deepspeed) is torch.bfloat16


def test_kernels_auto(monkeypatch):
    monkeypatch.setattr(auto, "cpu_capability", lambda: "AVX512")  # the budget rule for AVX2: the next test
    for precision in ("bf16", "fp32"):  # on a CPU: the whole model compiled in graph mode's static step
        whole = auto.choose_kernels(cfg(), CPU, compiler="g++", precision=precision)
        assert whole.value == auto.MODEL_COMPILE and "make train" in whole.reason
    # where graph mode's step cannot run (or is switched off), the ResBlock ops' compile with bf16, else reference
    for ds, train, world, why in (
        ({}, {"compile": False}, 1, "train.compile=false"),
        ({}, {"cuda_graphs": False}, 1, "train.cuda_graphs=false"),
        ({}, {}, 2, "2 ranks"),
        ({"zero_optimization": {"stage": 1}}, {}, 1, "ZeRO stage 1"),
        ({}, {"max_minutes": 5}, 1, "train.max_minutes=5"),
    ):
        c = cfg(ds=ds, **train)
        bf16 = auto.choose_kernels(c, CPU, compiler="g++", world=world)
        assert bf16.value == "compile" and f"the whole-model compile: not with {why}" in bf16.reason
        fp32 = auto.choose_kernels(c, CPU, compiler="g++", precision="fp32", world=world)
        assert fp32.value == "reference" and "slower than eager" in fp32.reason and why in fp32.reason
    two = auto.choose_kernels(cfg(cuda_graphs=True), CPU, compiler="g++", world=2)  # opted in: the same step
    assert two.value == auto.MODEL_COMPILE
    no_cc = auto.choose_kernels(cfg(), CPU, compiler=None)
    assert no_cc.value == "reference" and "no C++ compiler" in no_cc.line()
    short = auto.choose_kernels(cfg(max_minutes=1), CPU, compiler="g++")
    assert short.value == "reference" and "max_minutes=1" in short.reason
    assert (
        auto.choose_kernels(cfg(kernels="triton"), CPU).line()
        == "kernels: triton (kernels.mode in the config)"
    )
    gpu = auto.choose_kernels(cfg(), torch.device("cuda"))
    assert gpu.value == auto.PER_OP and "reference, triton" in gpu.reason
    c = cfg()
    assert auto.build_mode(c) == "triton"
    c.kernels.candidates = ["reference"]
    only_ref = auto.choose_kernels(c, torch.device("cuda"))
    assert only_ref.value == "reference" and auto.build_mode(c) == "reference"
    c.kernels.candidates = ["compile", "reference"]
    assert auto.build_mode(c) == "compile"


def test_kernels_choice_is_written_into_the_config():
    """MODEL_COMPILE: kernels.mode reference, train.compile true, train.cuda_graphs 'auto' made true (an explicit
    value stays); any other choice leaves train.compile 'auto' false and an explicit one as it is."""
    c = cfg()
    auto.apply_kernels(c, auto.Choice("kernels", auto.MODEL_COMPILE, "x"))
    assert (c.kernels.mode, c.train.compile, c.train.cuda_graphs) == ("reference", True, True)
    c = cfg()
    auto.apply_kernels(c, auto.Choice("kernels", "compile", "x"))
    assert (c.kernels.mode, c.train.compile, c.train.cuda_graphs) == ("compile", False, "auto")
    c = cfg(kernels="reference", compile=True)
    auto.apply_kernels(c, auto.choose_kernels(c, CPU))
    assert (c.kernels.mode, c.train.compile) == ("reference", True)
    c = cfg()
    auto.apply_kernels(c, auto.Choice("kernels", auto.PER_OP, "x"))
    assert (c.kernels.mode, c.train.compile) == ("triton", False)


def test_threads_follow_the_cores_this_process_may_use(monkeypatch):
    assert auto.choose_threads(2, env={"OMP_NUM_THREADS": "3"}).value == 3
    monkeypatch.setattr(auto, "cores_available", lambda: (4, "4 core(s) in this process's affinity"))
    ch = auto.choose_threads(2, env={})
    assert (
        ch.value == 2
        and ch.line() == "threads: 2 (4 core(s) in this process's affinity, 2 rank(s) on this machine)"
    )
    assert auto.choose_threads(8, env={}).value == 1


def test_real_probes_are_short():
    import time

    t0 = time.perf_counter()
    p = auto.matmul_ratio_probe()
    assert p["fp32"] > 0 and p["bf16"] > 0
    n, gflops = auto.sized_matmul(torch.float32, max_seconds=0.05)
    assert 64 <= n <= 2048 and n % 64 == 0 and gflops > 0
    assert time.perf_counter() - t0 < 5  # < 1 s alone; a shared CPU gets slack


def test_resolve_logs_and_applies(capsys, monkeypatch):
    monkeypatch.setattr(auto, "cpu_info", lambda: {"model": "x", "flags": AVX2_FLAGS})
    monkeypatch.setattr(auto, "cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(auto, "have_compiler", lambda: "g++")
    threads = torch.get_num_threads()
    try:
        c = cfg(max_minutes=0)  # no time limit: the whole-model compile repays on AVX2 too
        auto.resolve(c, CPU, None)
        short = cfg()  # 10 minutes on AVX2: eager
        auto.resolve(short, CPU, None)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("fastfilm: threads: ")
    assert out[1].startswith("fastfilm: precision: fp32 (this CPU has no bf16 instructions")
    why = f"{auto.MODEL_COMPILE_REASON_AVX2} (train.max_minutes=0, no time limit)"
    assert out[2] == f"fastfilm: kernels: {auto.MODEL_COMPILE} ({why})"
    assert (c.kernels.mode, c.train.compile, c.train.cuda_graphs) == ("reference", True, True)
    assert autocast_dtype(c.deepspeed) is None
    assert out[5].startswith("fastfilm: kernels: reference (") and "without AVX-512" in out[5]
    assert (short.kernels.mode, short.train.compile) == ("reference", False)


def test_whole_model_compile_without_avx512_needs_an_hour():
    """On an AVX2-only EPYC the compiled model's steps were ~1.05× faster and its compilations took ~3.3 minutes:
    make train's 10 minutes trained 2,900 steps with it against eager's 4,080. There it needs 60 minutes or no limit."""
    for capability, minutes, expect in (
        ("AVX2", 10, "reference"),
        ("AVX2", 59, "reference"),
        ("AVX2", 60, auto.MODEL_COMPILE),
        ("AVX2", 0, auto.MODEL_COMPILE),  # no time limit
        ("DEFAULT", 10, "reference"),  # no AVX2 either (or another architecture): unmeasured, the same rule
        ("AVX512", 10, auto.MODEL_COMPILE),
        ("AVX512", 7, "reference"),
    ):
        c = cfg(max_minutes=minutes)
        ch = auto.choose_kernels(c, CPU, compiler="g++", precision="fp32", capability=capability)
        assert ch.value == expect, (capability, minutes, ch.line())
        if capability != "AVX512":
            words = "without AVX-512" if expect == "reference" else "only ~1.05× faster"
            assert words in ch.reason, ch.line()


@pytest.mark.parametrize(
    "machine, expect",
    [
        ((BF16_FLAGS, "AVX512", {"fp32": 2.0, "bf16": 1.0, "batch": 64}), ("bf16", "compile")),
        ((BF16_FLAGS, "AVX512", {"fp32": 1.0, "bf16": 1.0, "batch": 64}), ("fp32", "reference")),
        ((AVX2_FLAGS, "AVX2", None), ("fp32", "reference")),
    ],
    ids=["avx512_bf16", "avx512_bf16-no-gain", "avx2"],
)
def test_precision_and_kernels_are_decided_together(monkeypatch, machine, expect):
    """`decide` as the trainer runs it: the whole-model compile in either precision; without it (here switched
    off) the kernels follow the precision (the ResBlock ops' compile only pays with bf16 autocast)."""
    flags, capability, model_probe = machine
    monkeypatch.setattr(auto, "cpu_info", lambda: {"model": "x", "flags": flags})
    monkeypatch.setattr(auto, "cpu_capability", lambda: capability)
    monkeypatch.setattr(auto, "have_compiler", lambda: "g++")
    monkeypatch.setattr(auto, "precision_probe", lambda *a, **k: model_probe or pytest.fail("no model probe"))
    monkeypatch.setattr(auto, "matmul_ratio_probe", lambda: {"fp32": 1.0, "bf16": 24.0, "matmul": 256})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    # make train's 10 minutes: the whole model compiled with AVX-512 only
    precision, kernels = auto.decide(cfg(), CPU)
    whole = auto.MODEL_COMPILE if capability == "AVX512" else "reference"
    assert (precision.value, kernels.value) == (expect[0], whole)
    precision, kernels = auto.decide(cfg(compile=False), CPU)
    assert (precision.value, kernels.value) == expect
    if expect[0] == "fp32":
        assert kernels.reason.startswith(auto.FP32_REASON)


def test_demo_is_sized_by_the_probed_speed():
    # seconds per question at 64/48/32 px: an avx512_bf16 machine (~1,200 q/s) keeps 64 px; an AVX2 one at
    # 1/2.5 of that goes down to the largest size that still sees the target
    fast = {64: 1 / 1200, 48: 1 / 2000, 32: 1 / 3500}
    ch = auto.plan_demo(cfg(), [64, 48, 32], 10, fast.__getitem__)
    assert ch.value == 64 and ch.line().startswith(
        "demo image size: 64 (projected questions in 10 min: 64 px ≈ 540k"
    )
    slow = {s: 2.5 * t for s, t in fast.items()}
    assert auto.plan_demo(cfg(), [32, 64, 48], 10, slow.__getitem__).value == 48
    crawl = {s: 30 * t for s, t in fast.items()}
    ch = auto.plan_demo(cfg(), [64, 48, 32], 10, crawl.__getitem__)
    assert ch.value == 32 and "the smallest" in ch.reason


@pytest.mark.parametrize("native, zero, expect", [(True, 0, "bf16"), (False, 0, "fp16"), (False, 1, "fp32")])
def test_precision_on_a_gpu_takes_bf16_only_where_it_is_native(monkeypatch, native, zero, expect):
    """A GPU without native bf16 (compute capability < 8: torch.cuda.is_bf16_supported() alone says yes there,
    emulated) gets fp16 with the loss scaler, or fp32 under ZeRO."""
    seen = []

    def is_bf16_supported(including_emulation=True):
        seen.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    c = cfg()
    c.deepspeed["zero_optimization"] = {"stage": zero}
    assert auto.choose_precision(c, torch.device("cuda", 0)).value == expect and seen == [False]


def model_cfg(dtype):
    """An exported model's config trained in `dtype` ("fp32", "bf16", "fp16")."""
    ds = {"bf16": {"enabled": dtype == "bf16"}, "fp16": {"enabled": dtype == "fp16"}}
    return cfg(precision="deepspeed", ds=ds)


@pytest.mark.parametrize(
    "own, flags, capability, expect",
    [
        ("bf16", AVX2_FLAGS, "AVX2", "fp32"),  # emulated bf16: 20-50× slower than float32
        ("bf16", BF16_FLAGS, "AVX2", "fp32"),  # the instructions are there, torch is capped below them
        ("bf16", BF16_FLAGS, "AVX512", "bf16"),
        ("fp16", BF16_FLAGS, "AVX512", "fp32"),  # no avx512_fp16 / amx_fp16
        ("fp16", BF16_FLAGS | {"avx512_fp16"}, "AVX512", "fp16"),
        ("fp32", AVX2_FLAGS, "AVX2", "fp32"),
    ],
)
def test_inference_on_a_cpu_keeps_the_models_precision_unless_emulated(
    own, flags, capability, expect, capsys
):
    c = model_cfg(own)
    ch = auto.inference_precision(c, CPU, flags=flags, capability=capability, onednn_isa="")
    assert ch.value == expect
    auto.announce_precision(ch, c)
    said = capsys.readouterr().err
    if expect == own:
        assert ch.reason == "the model's" and said == ""
    else:  # one line, naming the model's precision, why, and how to keep it
        assert said.count("\n") == 1 and f"the model's {own}, but " in said and "--precision model" in said
    # "model" always runs the model's own precision; an explicit dtype always wins, and nothing is said
    assert auto.inference_precision(c, CPU, "model", flags=flags, capability=capability).value == own
    for asked in ("fp32", "bf16", "fp16"):
        ch = auto.inference_precision(c, CPU, asked, flags=flags, capability=capability)
        assert ch.value == asked
        auto.announce_precision(ch, c)
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize("native, expect", [(True, "bf16"), (False, "fp32")])
def test_inference_on_a_gpu_without_native_bf16_runs_fp32(monkeypatch, native, expect):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    ch = auto.inference_precision(model_cfg("bf16"), torch.device("cuda", 0))
    assert ch.value == expect and (native or "GPU X only emulates bf16" in ch.reason)
    assert auto.inference_precision(model_cfg("fp16"), torch.device("cuda", 0)).value == "fp16"


def test_inference_precision_names_are_the_clis():
    from fastfilm.core.config import INFERENCE_PRECISIONS

    assert set(INFERENCE_PRECISIONS) == {"auto", "model", *auto.PRECISION_DTYPES}
    with pytest.raises(ValueError, match="precision 'half': expected one of auto, model, fp32"):
        auto.inference_precision(model_cfg("bf16"), CPU, "half")


def test_compile_caches_are_kept_per_cpu_kind_and_capability(monkeypatch, tmp_path):
    """Inductor's own cache key leaves ATEN_CPU_CAPABILITY out (AVX512 kernels replayed under avx2 gave NaN
    logits): one folder per CPU kind and capability, unless the user set one."""
    monkeypatch.setattr(auto, "cpu_info", lambda: {"model": "EPYC", "flags": frozenset({"avx2", "avx512f"})})
    dirs = {}
    for cap in ("AVX512", "AVX2"):
        monkeypatch.setattr(auto, "cpu_capability", lambda cap=cap: cap)
        dirs[cap] = (auto.inductor_cache_dir(str(tmp_path)), auto.extensions_dir(str(tmp_path)))
    assert (
        dirs["AVX512"][0] != dirs["AVX2"][0] and dirs["AVX512"][1] == dirs["AVX2"][1]
    )  # the op: -march=native
    monkeypatch.setenv(
        "TORCH_EXTENSIONS_DIR", str(tmp_path / "ext")
    )  # (restored after the test, as the next)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    auto.use_per_cpu_build_dirs()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == auto.inductor_cache_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    auto.use_per_cpu_build_dirs()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
