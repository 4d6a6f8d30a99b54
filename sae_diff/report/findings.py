"""The seed posts' findings, checked against the measured numbers on every seed.

A finding is a yes/no question evaluated on each training seed separately. It is stated
"Yes" only when it holds on every seed, "No" when it fails on every seed, and "Mixed" otherwise
(``holds`` is True / False / None); "Undecided" when a seed lacks the numbers. The answer
quotes each figure as mean ± std over seeds with its min–max.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: One seed's evidence: (holds or None when undecidable, the numbers it rests on).
Check = Callable[[Mapping[str, Any]], tuple[bool | None, dict[str, float | None]]]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def interval(values: Sequence[float | None], pct: bool = False, digits: int = 3) -> str:
    """``mean ± std (min–max)`` of the known values (``n/a`` when none); ``pct`` shows percent."""
    v = np.array(
        [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))],
        dtype=float,
    )
    if v.size == 0:
        return "n/a"
    s = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    if v.size == 1:
        return f"{s * v[0]:.{digits}g}{unit} (1 seed)"
    return (
        f"{s * v.mean():.{digits}g}{unit} ± {s * v.std():.2g}{unit} "
        f"(min–max {s * v.min():.{digits}g}–{s * v.max():.{digits}g}{unit}, {v.size} seeds)"
    )


def verdict(per_seed: Sequence[bool | None]) -> tuple[bool | None, str]:
    """``(holds, word)``: Yes only if it holds on every seed, No if on none, else Mixed."""
    if not per_seed or any(h is None for h in per_seed):
        return None, "Undecided"
    if all(per_seed):
        return True, "Yes"
    if not any(per_seed):
        return False, "No"
    return None, "Mixed"


def _artefacts(
    seed: Mapping[str, Any], nu_eps_max: float, nu_r_max: float
) -> tuple[bool | None, dict[str, float | None]]:
    art = seed.get("crosscoder_artefacts", {})
    l1, bt = art.get("l1_crosscoder", {}), art.get("batchtopk_crosscoder", {})
    nums: dict[str, float | None] = {
        "l1_n_artefact": l1.get("n_artefact"),
        "l1_n_ft_only": l1.get("n_ft_only"),
        "l1_n_complete_shrinkage": l1.get("n_complete_shrinkage"),
        "l1_n_latent_decoupling": l1.get("n_latent_decoupling"),
        "batchtopk_n_artefact": bt.get("n_artefact"),
        "batchtopk_n_ft_only": bt.get("n_ft_only"),
        "batchtopk_min_delta_active": bt.get("min_delta_active"),
    }
    if not l1 or not bt or (l1["n_with_nu"] == 0 and bt["n_with_nu"] == 0):
        return (
            None,
            nums,
        )  # a crosscoder was not trained, or neither has a measurable ft-only latent
    return l1["n_artefact"] > bt["n_artefact"], nums


def _board(seed: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in seed["scoreboard"]}


def _kl_closed(seed: Mapping[str, Any]) -> tuple[bool | None, dict[str, float | None]]:
    b = _board(seed)
    nums = {
        m: b.get(m, {}).get("kl_closed_reconstruction")
        for m in ("diff_sae", "batchtopk_crosscoder", "l1_crosscoder")
    }
    known = [
        float(v) for m in ("batchtopk_crosscoder", "l1_crosscoder") if (v := nums[m]) is not None
    ]
    diff = nums["diff_sae"]
    if diff is None or not known:
        return None, nums
    return diff > max(known), nums


def _kl_error(seed: Mapping[str, Any]) -> tuple[bool | None, dict[str, float | None]]:
    b = _board(seed)
    nums = {m: b.get(m, {}).get("kl_closed_error") for m in ("diff_sae", "batchtopk_crosscoder")}
    if None in nums.values():
        return None, nums
    return nums["diff_sae"] < nums["batchtopk_crosscoder"], nums  # type: ignore[operator]


def _game(
    seed: Mapping[str, Any],
    behaviours: Sequence[str],
    methods: Sequence[str],
    top: int,
    threshold: float,
) -> tuple[bool | None, dict[str, float | None]]:
    """For every behaviour, some dictionary method has a conversation-level AUROC >=
    ``threshold`` among its first ``top`` candidates. Numbers: per behaviour, the best AUROC in
    the top ``top`` over the methods. Reads ``seed["top_scores"][top]`` (score rows computed with
    ``top_n=top``)."""
    nums: dict[str, float | None] = {}
    ok = True
    for b in behaviours:
        hits = [
            r["best_auroc"]
            for r in seed["top_scores"][top]
            if r["behaviour"] == b
            and r["granularity"] == "conversation"
            and r["method"] in methods
            and r["best_auroc"] is not None
        ]
        nums[b] = max(hits) if hits else None
        ok = ok and bool(hits) and max(hits) >= threshold
    return (ok if behaviours else None), nums


def seed_findings(
    seeds: Sequence[Mapping[str, Any]],
    nu_eps_max: float,
    nu_r_max: float,
    behaviours: Sequence[str] = (),
    methods: Sequence[str] = (),
    top: int = 20,
    threshold: float = 0.95,
) -> list[dict[str, Any]]:
    """The findings over seeds. Each element of ``seeds`` is one seed's evidence:
    ``{"seed", "crosscoder_artefacts", "scoreboard" (per-method rows), "top_scores" ({top: score
    rows computed among the first ``top`` candidates})}``.
    Each finding: ``question``, ``answer`` (starts with Yes / No / Mixed / Undecided),
    ``holds`` (True / False / None), ``per_seed`` (seed -> holds) and ``numbers`` (per figure,
    the per-seed values)."""
    checks: list[
        tuple[
            str,
            Callable[[Mapping[str, Any]], tuple[bool | None, dict[str, float | None]]],
            Callable[[dict[str, list[float | None]]], str],
        ]
    ] = [
        (
            f"Does the L1 crosscoder show more ft-only latents that Latent Scaling marks as artefacts "
            f"(Complete Shrinkage: ν_ε ≥ {nu_eps_max}; Latent Decoupling: ν_r ≥ {nu_r_max}) than the BatchTopK crosscoder?",
            lambda s: _artefacts(s, nu_eps_max, nu_r_max),
            lambda n: (
                f"L1 crosscoder artefact latents {interval(n['l1_n_artefact'])} among "
                f"{interval(n['l1_n_ft_only'])} ft-only ({interval(n['l1_n_complete_shrinkage'])} by ν_ε, "
                f"{interval(n['l1_n_latent_decoupling'])} by ν_r); BatchTopK crosscoder "
                f"{interval(n['batchtopk_n_artefact'])} among {interval(n['batchtopk_n_ft_only'])} ft-only "
                f"(smallest Δ of an active latent {interval(n['batchtopk_min_delta_active'])}; with no ft-only "
                "latents none can be an artefact)."
            ),
        ),
        (
            "Does the diff-SAE close more of the KL gap (full reconstruction patch) than the crosscoders?",
            _kl_closed,
            lambda n: (
                f"the diff-SAE reconstruction closes {interval(n['diff_sae'], pct=True)} of the KL gap; the "
                f"BatchTopK crosscoder {interval(n['batchtopk_crosscoder'], pct=True)}, the L1 crosscoder "
                f"{interval(n['l1_crosscoder'], pct=True)}."
            ),
        ),
        (
            "Does less of the KL gap live in the diff-SAE's error than in the crosscoder's error?",
            _kl_error,
            lambda n: (
                f"patching the diff-SAE's error closes {interval(n['diff_sae'], pct=True)}, the BatchTopK "
                f"crosscoder's error {interval(n['batchtopk_crosscoder'], pct=True)}."
            ),
        ),
    ]
    if behaviours and methods:
        checks.append(
            (
                f"Does some dictionary method find every planted behaviour at the conversation level "
                f"(best AUROC ≥ {threshold} within its top {top} candidates)?",
                lambda s: _game(s, behaviours, methods, top, threshold),
                lambda n: (
                    "; ".join(f"{b}: best in top {top} {interval(n[b])}" for b in behaviours) + "."
                ),
            )
        )
    out = []
    for question, check, words in checks:
        per_seed: list[bool | None] = []
        numbers: dict[str, list[float | None]] = {}
        for s in seeds:
            h, nums = check(s)
            per_seed.append(h)
            for k, v in nums.items():
                numbers.setdefault(k, []).append(None if v is None else float(v))
        holds, word = verdict(per_seed)
        n_true, n_none = sum(1 for h in per_seed if h), sum(1 for h in per_seed if h is None)
        detail = {
            "Yes": "",
            "No": "",
            "Mixed": f" (holds on {n_true} of {len(per_seed)} seeds)",
            "Undecided": f" (the numbers cannot decide on {n_none} of {len(per_seed)} seeds)",
        }[word]
        out.append(
            {
                "question": question,
                "answer": f"{word}{detail}: {words(numbers)}",
                "holds": holds,
                "per_seed": {str(s.get("seed")): h for s, h in zip(seeds, per_seed)},
                "numbers": numbers,
            }
        )
    return out
