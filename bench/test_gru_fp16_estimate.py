"""bench/gru_fp16_estimate.py runs (a small config, two measured steps on the bench's tiny set; not a timing)."""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_estimate_measures_the_encoders_gradients(bench_dataset, tmp_path):
    import gru_fp16_estimate

    out = tmp_path / "est.json"
    argv = ["--cache", bench_dataset["cache"], "--config", os.path.join(ROOT, "configs", "synthetic.json")]
    assert (
        gru_fp16_estimate.main([*argv, "--batch", "8", "--steps", "1", "--every", "1", "--out", str(out)])
        == 0
    )
    d = json.loads(out.read_text())
    assert [m["step"] for m in d["measurements"]] == [0, 1]
    for m in d["measurements"]:
        assert {"dL/dh_T", "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"} <= set(m)
        for k, v in m.items():
            if isinstance(v, dict):
                assert 0 <= v["zeroed"] <= 1 and 0 <= v["subnormal"] <= 1, k
                assert 0 <= v["rel_error"] < 1e-2 and v["max_abs"] > 0, k  # float16 rounding, not a loss
