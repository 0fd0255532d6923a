"""report.md's per-method fidelity table says plainly which method misses the cache's goals, and why."""

from stages.report import _cache_section


def test_a_method_that_misses_the_goals_is_named_with_its_reason(tmp_path):
    grads = {"grad_cosine": {"cskd": 0.9987, "ssim": 0.985, "pfi": 0.995},
             "loss_rel_err": {"cskd": 2.5e-3, "ssim": 4e-3, "pfi": 0.0109}}
    text = "\n".join(_cache_section({"fidelity_gradients": grads}, tmp_path / "c.png"))
    assert "| cskd | 0.99870 | 2.50e-03 | met |" in text
    assert "| ssim | 0.98500 | 4.00e-03 | MISSED |" in text and "| pfi | 0.99500 | 1.09e-02 | MISSED |" in text
    assert "**ssim misses the goal** (cosine 0.985 < 0.99)" in text and "variance" in text
    assert "**pfi misses the goal** (error 1.09% > 1%)" in text and "multiplies two cached targets" in text
    assert "cskd misses" not in text
