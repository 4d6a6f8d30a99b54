"""Issue 17's crosscoder variants, stage-wise diffing and the base-SAE causal filter are methods
of the diffing game, all in the default run; `--methods` selects among them.

That the default quick run trains and scores each of them is checked on the one shared quick
run of tests/test_demo.py; selecting a subset through `sae-diff demo --methods` and the causal
filter's fallback are checked at a tiny size in tests/test_report_demo.py."""

from __future__ import annotations

import pytest

from sae_diff.report import demo, methods

VARIANTS = (
    "jumprelu_crosscoder",
    "shared_l1_crosscoder",
    "shared_batchtopk_crosscoder",
    "dedicated_crosscoder",
)


def test_every_method_is_in_the_default_run() -> None:
    """`make demo` scores issue 17's methods too (at their shrunk step counts); --methods selects."""
    assert set(VARIANTS) | {"stagewise", "causal_filter"} <= set(demo.DEFAULT_METHODS)
    assert set(demo.DEFAULT_METHODS) == set(methods.METHODS) | set(methods.ANALYSIS_METHODS)
    assert demo.DemoConfig().methods == demo.DEFAULT_METHODS
    assert demo.DemoConfig(methods=("stagewise",)).methods == ("stagewise",)
    with pytest.raises(ValueError, match="Unknown method"):
        demo.DemoConfig(methods=("stage_wise",))
    for name in VARIANTS:
        spec = methods.METHODS[name]
        assert spec["kind"] == "crosscoder" and spec["mode"] == "paired"
