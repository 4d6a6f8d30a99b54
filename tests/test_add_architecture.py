"""The one-table rule, end to end: adding an architecture is one file plus one table row.

A copy of the package gets exactly that: a new module ``dictionaries/toy_crosscoder.py`` (a
BatchTopK crosscoder under new training and inference names) and one ``ArchitectureSpec`` row
appended to ``specs.ARCHITECTURES``; nothing else is edited. In a fresh interpreter on that
copy the new architecture is registered with SAELens, is a crosscoder for the training
config (``store_mode: auto`` -> paired), is a flag choice of ``sae-diff train``
(``--architecture``), is a pair architecture for the Hub, trains with SAELens's
``SAETrainer`` and round-trips through ``save_inference_model`` / ``SAE.load_from_disk``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NEW_MODULE = '''
"""A toy architecture: the BatchTopK crosscoder under other names (the one-table test)."""

from sae_lens.saes.sae import SAEConfig

from sae_diff.dictionaries.batchtopk_crosscoder import (
    BatchTopKCrosscoderTraining,
    BatchTopKCrosscoderTrainingConfig,
    JumpReLUCrosscoder,
    JumpReLUCrosscoderConfig,
)


class ToyCrosscoderConfig(JumpReLUCrosscoderConfig):
    @classmethod
    def architecture(cls) -> str:
        return "toy_crosscoder"


class ToyCrosscoder(JumpReLUCrosscoder):
    pass


class ToyTrainingConfig(BatchTopKCrosscoderTrainingConfig):
    @classmethod
    def architecture(cls) -> str:
        return "toy_batchtopk_crosscoder"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return ToyCrosscoderConfig


class ToyTraining(BatchTopKCrosscoderTraining):
    pass
'''

NEW_ROW = """
ARCHITECTURES = (
    *ARCHITECTURES,
    _cc("toy_batchtopk_crosscoder", "toy_crosscoder", "a toy", "toy_crosscoder", "ToyTraining", "ToyCrosscoder"),
)
_BY_TRAINING = {s.training: s for s in ARCHITECTURES}
"""

CHECK = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import sae_diff
    from sae_lens import SAE
    from sae_lens import registry as sl
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from sae_diff.dictionaries import normalisation, registry
    from sae_diff.dictionaries.toy_crosscoder import ToyCrosscoder, ToyTraining
    from sae_diff.hub import PAIR_ARCHITECTURES
    from sae_diff.synthetic import PlantedPairedData
    from sae_diff.training.flags import parse_config
    from sae_diff.training.validation import CROSSCODER_ARCHITECTURES

    out = {"file": sae_diff.__file__}
    out["registered"] = [
        sl.SAE_TRAINING_CLASS_REGISTRY["toy_batchtopk_crosscoder"][0] is ToyTraining,
        sl.SAE_CLASS_REGISTRY["toy_crosscoder"][0] is ToyCrosscoder,
    ]
    out["crosscoder"] = "toy_batchtopk_crosscoder" in CROSSCODER_ARCHITECTURES
    out["hub"] = "toy_crosscoder" in PAIR_ARCHITECTURES
    cfg = parse_config(sys.argv[1], ["--architecture", "toy_batchtopk_crosscoder", "--k", "2"])
    out["config"] = [type(cfg.sae).__name__, cfg.store_mode, cfg.is_crosscoder]
    data = PlantedPairedData.make(d=16, n_shared=4, n_ft_only=2, n_base_only=2)
    sae = registry.training_sae(
        registry.training_config("toy_batchtopk_crosscoder", d_in=16, d_sae=32, k=2)
    )
    batches = data.batches(batch_size=64)
    normalisation.prepare_crosscoder(sae, batches)
    tc = SAETrainerConfig(total_training_samples=20 * 64, train_batch_size_samples=64, lr=1e-2, lr_end=1e-2)
    SAETrainer(tc, sae, batches).fit()
    sae.save_inference_model(sys.argv[2])
    loaded = SAE.load_from_disk(sys.argv[2])
    x = next(data.batches(batch_size=8, seed=1))
    out["loaded"] = [type(loaded).__name__, json.load(open(sys.argv[2] + "/cfg.json"))["architecture"]]
    out["same_codes"] = bool(torch.allclose(loaded.encode(x), sae.to_inference().encode(x), atol=1e-5))
    print(json.dumps(out))
    """
)


def test_one_file_and_one_row_add_an_architecture(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(
        ROOT / "sae_diff",
        copy / "sae_diff",
        ignore=shutil.ignore_patterns("__pycache__", "data"),  # organism weights: not needed
    )
    (copy / "sae_diff" / "dictionaries" / "toy_crosscoder.py").write_text(NEW_MODULE)
    specs = copy / "sae_diff" / "dictionaries" / "specs.py"
    text = specs.read_text()
    anchor = "\n_BY_TRAINING = {s.training: s for s in ARCHITECTURES}\n"
    assert anchor in text
    specs.write_text(text.replace(anchor, anchor + NEW_ROW, 1))

    env = {**os.environ, "PYTHONPATH": str(copy)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHECK,
            str(ROOT / "configs" / "smoke_test_crosscoder.yaml"),
            str(tmp_path / "toy"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(copy))  # the copy, not the checkout, was imported
    assert out["registered"] == [True, True]
    assert out["crosscoder"] and out["hub"]
    assert out["config"] == ["ToyTrainingConfig", "paired", True]
    assert out["loaded"] == ["ToyCrosscoder", "toy_crosscoder"]
    assert out["same_codes"]
