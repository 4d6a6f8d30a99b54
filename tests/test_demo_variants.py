"""Issue 17's crosscoder variants, stage-wise diffing and the base-SAE causal filter are methods
of the diffing game, all in the default run; `--methods` selects among them.

That the default quick run trains and scores each of them is checked on the one shared quick
run of tests/test_demo.py; selecting a subset through `sae-diff demo --methods` and the causal
filter's fallback are checked at a tiny size in tests/test_report_demo.py."""

from __future__ import annotations

import pytest

from sae_diff.report import demo

VARIANTS = (
    "jumprelu_crosscoder",
    "shared_l1_crosscoder",
    "shared_batchtopk_crosscoder",
    "dedicated_crosscoder",
)


def test_every_method_is_in_the_default_run() -> None:
    """`make demo` scores issue 17's methods too (at their shrunk step counts); --methods selects."""
    assert set(VARIANTS) | {"stagewise", "causal_filter"} <= set(demo.DEFAULT_METHODS)
    assert set(demo.DEFAULT_METHODS) == set(demo.METHODS) | set(demo.ANALYSIS_METHODS)
    assert demo.DemoConfig().methods == demo.DEFAULT_METHODS
    assert demo.DemoConfig(methods=("stagewise",)).methods == ("stagewise",)
    with pytest.raises(ValueError, match="Unknown method"):
        demo.DemoConfig(methods=("stage_wise",))
    for name in VARIANTS:
        assert demo.METHODS[name]["kind"] == "crosscoder" and demo.METHODS[name]["mode"] == "paired"
