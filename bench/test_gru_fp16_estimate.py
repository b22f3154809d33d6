"""bench/gru_fp16_estimate.py runs (a small config, two measured steps on the bench's tiny set; not a timing), and its
recomputed float32 GRU backward equals autograd's (what makes the float16 emulation a measure of float16 alone)."""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_estimate_measures_the_encoders_gradients(bench_dataset, tmp_path):
    import gru_fp16_estimate

    out = tmp_path / "est.json"
    argv = ["--cache", bench_dataset["cache"], "--config", os.path.join(ROOT, "configs", "synthetic.json")]
    argv += ["--batch", "8", "--steps", "1", "--every", "1", "--emulate", "--out", str(out)]
    assert gru_fp16_estimate.main(argv) == 0
    d = json.loads(out.read_text())
    assert [m["step"] for m in d["measurements"]] == [0, 1]
    for m in d["measurements"]:
        assert {"dL/dh_T", "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"} <= set(m)
        for k, e in m.pop("fp32_recomputed_vs_autograd").items():  # the emulation's backward is the GRU's
            assert e["rel_error"] < 1e-5 and e["lost_nonzeros"] == 0, (k, e)
        assert all(e["cosine"] > 0.99 for e in m.pop("fp16_backward_vs_fp32").values())
        for k, v in m.items():
            if isinstance(v, dict):
                assert 0 <= v["zeroed"] <= 1 and 0 <= v["subnormal"] <= 1, k
                assert 0 <= v["rel_error"] < 1e-2 and v["max_abs"] > 0, k  # float16 rounding, not a loss
