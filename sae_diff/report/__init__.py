"""The diffing study and its report (``sae-diff demo``): methods scored against planted ground truth.

- ``demo``: the command line (``main``) and its terminal summary.
- ``methods``: the methods of the study (trained dictionaries, base-SAE methods, baselines).
- ``config``: :class:`~sae_diff.report.config.DemoConfig`, the study's sizes.
- ``inputs``: the harvested cache and the held-out scoring set, built once per study.
- ``training``: one method's dictionary, and the base-SAE, trained with SAELens.
- ``base_sae_methods``: stage-wise diffing and the causal filter on a seed's base-SAE.
- ``scoreboard``: each method's figures per seed and over seeds; candidate selection.
- ``study``: :func:`~sae_diff.report.study.run_demo`, the whole study over seeds.
- ``output``: report.json, report.html and the dashboards.
- ``scoring``, ``baselines``, ``findings``, ``dashboards``, ``html``: AUROC against planted
  labels, the dictionary-free baselines, the seed findings, latent dashboards, the HTML page.
"""
