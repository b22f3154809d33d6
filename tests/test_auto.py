

def test_demo_is_sized_by_the_probed_speed():
    # seconds per question at 64/48/32 px: an avx512_bf16 machine (~1,200 q/s) keeps 64 px; an AVX2 one at a
    # third of that goes down to the largest size that still sees the target
    fast = {64: 1 / 1200, 48: 1 / 2000, 32: 1 / 3500}
    ch = auto.plan_demo(cfg(), [64, 48, 32], 10, fast.__getitem__)
    assert ch.value == 64 and ch.line().startswith("demo image size: 64 (projected questions in 10 min: 64 px ≈ 540k")
    slow = {s: 3 * t for s, t in fast.items()}
    assert auto.plan_demo(cfg(), [32, 64, 48], 10, slow.__getitem__).value == 48
    crawl = {s: 30 * t for s, t in fast.items()}
    ch = auto.plan_demo(cfg(), [64, 48, 32], 10, crawl.__getitem__)
    assert ch.value == 32 and "the smallest" in ch.reason
