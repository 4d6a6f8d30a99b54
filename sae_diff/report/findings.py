"""The seed posts' findings, checked against the measured numbers (never asserted blindly)."""

from __future__ import annotations

from typing import Any


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def seed_findings(report: dict[str, Any], nu_eps_max: float, nu_r_max: float) -> list[dict[str, Any]]:
    """Each finding: the question, the measured answer in words, ``holds`` (True/False/None when
    the numbers cannot decide) and the numbers it rests on."""
    out: list[dict[str, Any]] = []
    art = report["crosscoder_artefacts"]
    l1, bt = art["l1_crosscoder"], art["batchtopk_crosscoder"]
    q1 = (f"Does the L1 crosscoder show more ft-only latents that Latent Scaling marks as artefacts "
          f"(Complete Shrinkage: ν_ε ≥ {nu_eps_max}; Latent Decoupling: ν_r ≥ {nu_r_max}) than the BatchTopK crosscoder?")
    if l1["n_with_nu"] == 0 and bt["n_with_nu"] == 0:
        holds, ans = None, "Undecided: neither crosscoder has ft-only latents with enough activity to measure ν."
    else:
        holds = l1["n_artefact"] > bt["n_artefact"]
        ans = (f"{'Yes' if holds else 'No'}: the L1 crosscoder has {l1['n_artefact']} artefact latents among its "
               f"{l1['n_ft_only']} ft-only latents ({l1['n_complete_shrinkage']} by ν_ε, {l1['n_latent_decoupling']} by ν_r); "
               + (f"the BatchTopK crosscoder has no ft-only latents at all (smallest Δ of an active latent: "
                  f"{bt.get('min_delta_active')}), so none can be an artefact."
                  if bt["n_ft_only"] == 0 else
                  f"the BatchTopK crosscoder has {bt['n_artefact']} among {bt['n_ft_only']} "
                  f"({bt['n_complete_shrinkage']} by ν_ε, {bt['n_latent_decoupling']} by ν_r)."))
    out.append({"question": q1, "answer": ans, "holds": holds, "numbers": {"l1": l1, "batchtopk": bt}})

    board = {r["method"]: r for r in report["scoreboard"]}
    diff = board.get("diff_sae", {}).get("kl_closed_reconstruction")
    cc = {m: board.get(m, {}).get("kl_closed_reconstruction") for m in ("batchtopk_crosscoder", "l1_crosscoder")}
    q2 = "Does the diff-SAE close more of the KL gap (full reconstruction patch) than the crosscoders?"
    known = [v for v in cc.values() if v is not None]
    if diff is None or not known:
        holds2, ans2 = None, "Undecided: a KL-gap figure is missing (see the patching table)."
    else:
        holds2 = diff > max(known)
        ans2 = (f"{'Yes' if holds2 else 'No'}: the diff-SAE reconstruction closes {_pct(diff)} of the KL gap; the "
                f"BatchTopK crosscoder {_pct(cc['batchtopk_crosscoder'])}, the L1 crosscoder {_pct(cc['l1_crosscoder'])}.")
    out.append({"question": q2, "answer": ans2, "holds": holds2,
                "numbers": {"diff_sae": diff, **cc}})

    errs = {m: board.get(m, {}).get("kl_closed_error") for m in ("diff_sae", "batchtopk_crosscoder")}
    if None not in errs.values():
        holds3 = errs["diff_sae"] < errs["batchtopk_crosscoder"]  # type: ignore[operator]
        out.append({
            "question": "Does less of the KL gap live in the diff-SAE's error than in the crosscoder's error?",
            "answer": (f"{'Yes' if holds3 else 'No'}: patching the diff-SAE's error closes {_pct(errs['diff_sae'])}, "
                       f"the BatchTopK crosscoder's error {_pct(errs['batchtopk_crosscoder'])}."),
            "holds": holds3, "numbers": errs})
    return out
