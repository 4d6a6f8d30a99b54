"""Stage-wise model diffing on planted data: the latents that rotate in the model-change stages
are exactly the ones tracking the planted rotated features, and they do not rotate when only the
data changes; the rotation table against an independent cosine computation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_diff.analysis import stagewise as sw
from sae_diff.synthetic import PlantedPairedData

N_SHARED, N_ROT = 8, 4


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trainer_cfg(steps: int, batch: int = 256) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=1e-2,
        lr_end=1e-2,
        dead_feature_window=50,
        feature_sampling_window=100,
    )


def planted() -> tuple[PlantedPairedData, PlantedPairedData]:
    base = PlantedPairedData.make(
        d=32,
        n_shared=N_SHARED,
        n_ft_only=0,
        n_base_only=0,
        n_rotated=N_ROT,
        rotation_cos=0.2,
        active_per_token=2.0,
        seed=0,
    )
    # the fine-tuning data exercises the first four shared features four times as often
    ft = base.with_frequency([4.0] * 4 + [1.0] * (N_SHARED - 4) + [1.0] * N_ROT)
    return base, ft


def start_sae(data: PlantedPairedData) -> BatchTopKTrainingSAE:
    torch.manual_seed(0)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=data.d, d_sae=24, k=2))
    SAETrainer(trainer_cfg(400), sae, sw.model_side(data.batches(256, seed=1), 0)).fit()
    return sae


@pytest.mark.slow
def test_model_change_rotation_is_attributed_to_the_planted_rotated_features() -> None:
    base, ft = planted()
    sae = start_sae(base)
    # which latent tracks which planted feature (base direction), at the start
    dec0 = torch.nn.functional.normalize(sae.W_dec.detach().double(), dim=-1)
    cos0 = torch.nn.functional.normalize(base.directions[:, 0].double(), dim=-1) @ dec0.T
    best, owner = cos0.max(dim=1)
    assert best.min() > 0.9, best  # the start dictionary has every planted base direction
    rotated = {int(owner[i]) for i, k in enumerate(base.kinds) if k == "rotated"}
    assert len(rotated) == N_ROT

    res = sw.run_stages(
        sae,
        {"base": lambda: base.batches(256, seed=2), "ft": lambda: ft.batches(256, seed=3)},
        trainer_cfg(300),
    )
    assert res.model_change_stages() == ["model", "both"]
    top = res.top_rotating(n=N_ROT)
    assert set(top.index) == rotated, top
    wide = res.table.pivot(index="latent", columns="stage", values="dec_cos")
    r = sorted(rotated)
    assert (1 - wide.loc[r, "model"]).min() > 0.5  # cos 0.2 planted: they turn most of the way
    assert (1 - wide.loc[r, "data"]).max() < 0.05  # ... and not when only the data changes
    assert (1 - wide.loc[r, "both"]).min() > 0.5
    others = [j for j in wide.index if j not in rotated and j in set(owner.tolist())]
    assert (1 - wide.loc[others, "model"]).max() < 0.05  # shared features' latents stay put
    fig = sw.rotation_figure(res.table, latents=r)
    assert len(fig.data) == 3 + N_ROT


def test_rotation_table_against_direct_cosines() -> None:
    torch.manual_seed(0)
    cfg = BatchTopKTrainingSAEConfig(d_in=6, d_sae=5, k=2)
    a = BatchTopKTrainingSAE(cfg)
    b, c = sw.copy_sae(a), sw.copy_sae(a)
    with torch.no_grad():
        b.W_dec.add_(0.3 * torch.randn_like(b.W_dec))
        c.W_enc.add_(0.3 * torch.randn_like(c.W_enc))
    plan = (sw.Stage("data", "base", "ft"), sw.Stage("both", "ft", "ft", parent="data"))
    table = sw.rotation_table({"start": a, "data": b, "both": c}, plan)
    assert list(table.columns[:6]) == ["latent", "stage", "model", "data", "parent", "model_change"]
    both = table[table.stage == "both"].set_index("latent")
    for j in range(5):  # float64 reference, by hand
        d_c, d_b = c.W_dec[j].double(), b.W_dec[j].double()
        ref = float(d_c @ d_b / (d_c.norm() * d_b.norm()))
        assert both.loc[j, "dec_cos"] == pytest.approx(ref, abs=1e-9)
        e_c, e_a = c.W_enc[:, j].double(), a.W_enc[:, j].double()
        assert both.loc[j, "enc_cos_start"] == pytest.approx(
            float(e_c @ e_a / (e_c.norm() * e_a.norm())), abs=1e-9
        )
    assert bool(both["model_change"].all()) and not bool(
        table[table.stage == "data"]["model_change"].any()
    )
    assert isinstance(sw.top_rotating(table, plan, n=2, stage="data"), pd.DataFrame)


def test_bad_plans_fail_clearly() -> None:
    with pytest.raises(ValueError, match="must each be 'base' or 'ft'"):
        sw.Stage("x", model="chat", data="base")
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=4, d_sae=4, k=1))
    with pytest.raises(ValueError, match="not an earlier stage"):
        sw.run_stages(
            sae,
            {"base": iter, "ft": iter},
            trainer_cfg(1),  # type: ignore[dict-item]
            plan=(sw.Stage("both", "ft", "ft", parent="data"),),
        )
    with pytest.raises(ValueError, match="No batches for data"):
        sw.run_stages(sae, {"base": iter}, trainer_cfg(1))  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="paired batches"):
        next(sw.model_side(iter([torch.zeros(3, 4)]), 0))


@pytest.mark.slow
def test_stagewise_on_the_organism_writes_table_figure_and_examples(tmp_path: Any) -> None:
    res = sw.stagewise_on_organism(
        tmp_path,
        n_docs=48,
        max_rows=48,
        expansion=2,
        k=8,
        start_steps=20,
        stage_steps=10,
        batch_size=128,
        n_top=4,
    )
    d_sae = res.result.stages["start"].cfg.d_sae
    assert len(res.result.table) == 3 * d_sae
    assert list(res.top.index) == list(res.examples) and len(res.top) == 4
    assert (res.top["rotation"].diff().dropna() <= 0).all()
    for path in res.files.values():
        assert path.is_file() and path.stat().st_size > 0
    saved = pd.read_csv(res.files["rotation_table"])
    assert set(saved["stage"]) == {"data", "model", "both"}


@pytest.mark.slow
def test_stages_run_from_one_config(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    shipped = yaml.safe_load(
        (
            Path(__file__).resolve().parents[1] / "configs" / "analysis" / "stagewise_organism.yaml"
        ).read_text()
    )
    small = {
        **shipped,
        "n_docs": 48,
        "max_rows": 48,
        "expansion": 2,
        "k": 8,
        "start_steps": 20,
        "stage_steps": 10,
        "batch_size": 128,
        "n_top": 3,
    }
    cfg = tmp_path / "sw.yaml"
    cfg.write_text(yaml.safe_dump(small))
    assert sw.main(["--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    assert "rotation_table" in capsys.readouterr().out
    assert set(pd.read_csv(tmp_path / "out" / "rotation_table.csv")["stage"]) == {
        "data",
        "model",
        "both",
    }
    cfg.write_text(yaml.safe_dump({**small, "n_stpes": 3}))
    with pytest.raises(ValueError, match=r"Unknown field\(s\) \['n_stpes'\]"):
        sw.main(["--config", str(cfg)])
