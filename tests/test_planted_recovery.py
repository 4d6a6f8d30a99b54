"""Planted truth: a BatchTopK crosscoder trained with SAELens's SAETrainer on synthetic paired
data recovers the planted shared / ft-only / base-only directions with the right Δ tags, and its
inference threshold gives a mean L0 near k on the training distribution."""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.dictionaries import geometry
from sae_diff.dictionaries.normalisation import prepare_crosscoder
from sae_diff.dictionaries.registry import training_config, training_sae
from sae_diff.synthetic import PlantedPairedData

EXPECTED_TAG = {"shared": "shared", "ft_only": "ft_only", "base_only": "base_only"}


def train(
    arch: str, data: PlantedPairedData, steps: int, batch: int = 256, **kw
) -> torch.nn.Module:
    sae = training_sae(training_config(arch, d_in=data.d, d_sae=48, **kw))
    provider = data.batches(batch, seed=1)
    prepare_crosscoder(sae, provider, n_batches=4)
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=1e-2,
        lr_end=1e-2,
        dead_feature_window=50,
        feature_sampling_window=100,
    )
    SAETrainer(cfg, sae, provider).fit()
    return sae


def match_planted(sae_inf: SAE, data: PlantedPairedData) -> tuple[torch.Tensor, torch.Tensor]:
    """For each planted feature: best cosine with a learned (raw-space) decoder row, and that latent."""
    rows = geometry.decoder_rows(sae_inf, normalised=False).flatten(1)
    planted = data.directions.flatten(1)
    cos = (
        torch.nn.functional.normalize(planted, dim=-1)
        @ torch.nn.functional.normalize(rows, dim=-1).T
    )
    best, idx = cos.max(dim=1)
    return best, idx


@pytest.mark.slow
def test_batchtopk_crosscoder_recovers_planted_directions(tmp_path) -> None:
    data = PlantedPairedData.make(
        d=32, n_shared=8, n_ft_only=4, n_base_only=4, active_per_token=2.0, seed=0
    )
    sae = train("batchtopk_crosscoder", data, steps=500, k=2)
    sae.save_inference_model(tmp_path / "cc")
    inf = SAE.load_from_disk(tmp_path / "cc")
    best, idx = match_planted(inf, data)
    assert best.min() > 0.9, best
    learned_tags = geometry.tags(geometry.relative_norm(inf))[idx.numpy()]
    assert list(learned_tags) == [EXPECTED_TAG[k] for k in data.kinds]
    # inference threshold: mean L0 near k on the training distribution
    x, _ = data.sample(4096, torch.Generator().manual_seed(123))
    l0 = (inf.encode(x) > 0).float().sum(-1).mean().item()
    assert 1.5 <= l0 <= 2.6, l0


@pytest.mark.slow
def test_l1_crosscoder_recovers_planted_directions() -> None:
    data = PlantedPairedData.make(
        d=32, n_shared=8, n_ft_only=4, n_base_only=4, active_per_token=2.0, seed=2
    )
    sae = train("crosscoder", data, steps=500, l1_coefficient=0.3)
    best, idx = match_planted(sae.to_inference(), data)
    assert best.min() > 0.9, best
    learned_tags = geometry.tags(geometry.relative_norm(sae))[idx.numpy()]
    assert list(learned_tags) == [EXPECTED_TAG[k] for k in data.kinds]
