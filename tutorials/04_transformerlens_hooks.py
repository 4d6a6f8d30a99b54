# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Splicing crosscoder / diff-SAE patches into TransformerLens forwards
#
# `sae_diff.evaluation` measures how much of the base→ft behaviour change a dictionary
# explains (KL patching, METHODS.md §4). The same patches are available as ordinary
# TransformerLens hook functions, so they combine with `run_with_hooks`, `run_with_cache`
# and your own analyses. Runs on CPU in seconds: a tiny model pair whose fine-tune changed
# one MLP, and a diff-SAE trained for a few hundred steps.

# %%
import copy

import torch
from sae_lens.saes.sae import TrainStepInput
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_diff  # noqa: F401  (registers the dictionary architectures with SAELens)
from sae_diff.dictionaries.registry import training_config, training_sae
from sae_diff.evaluation import (
    compare_dictionaries,
    kl_patching_table,
    latent_direction,
    paired_hooks,
    record_codes_hook,
    steering_hook,
    token_kl,
)
from sae_diff.pairing.model import PairedModel

torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4,
                              d_mlp=128, d_vocab=64, act_fn="gelu", normalization_type="LN")
base = HookedTransformer(cfg).eval()
ft = copy.deepcopy(base)
with torch.no_grad():  # the "fine-tune": block 0's MLP output changed
    ft.blocks[0].mlp.W_out.add_(0.15 * torch.randn_like(ft.blocks[0].mlp.W_out))
    ft.blocks[0].mlp.b_out.add_(0.5 * torch.randn(32))
pair = PairedModel(base, ft)
HOOK = "blocks.0.hook_resid_post"  # = resid_pre of block 1: split layer 1

# %% [markdown]
# Train a small BatchTopK diff-SAE on `x_ft − x_base` at the hook (a second or two).

# %%
tokens = torch.randint(0, 64, (128, 32))
acts = pair.paired_activations(tokens, [HOOK])[HOOK].reshape(-1, 2, 32)  # (tokens, 2, d)
trainer = training_sae(training_config("batchtopk_diff_sae", d_in=32, d_sae=64, k=4))
opt = torch.optim.Adam(trainer.parameters(), lr=3e-3)
for step in range(200):
    x = acts[torch.randint(0, len(acts), (256,))]
    out = trainer.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=step,
        is_logging_step=False))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
diff_sae = trainer.to_inference()
diff_sae.cfg.metadata.hook_name = HOOK
print({k: round(float(v.detach()), 4) for k, v in out.losses.items()})

# %% [markdown]
# ## The KL patching table
# Stitched baseline (base first half, ft second half), reconstruction and error patches,
# random subsets as baselines; `closed` is the fraction of the KL gap closed.

# %%
eval_tokens = torch.randint(0, 64, (16, 32))
mask = torch.ones_like(eval_tokens, dtype=torch.bool)
table = kl_patching_table(pair, {"diff_sae": diff_sae}, eval_tokens, mask, random_seeds=3,
                          subsets={"diff_sae": {"top8": torch.arange(8)}})
print(compare_dictionaries(table, "closed").round(3))

# %% [markdown]
# ## The same patch as a TransformerLens hook
# `paired_hooks` computes the base residual at the dictionary's layer and returns
# `(hook_name, hook_fn)`; running the ft model with it replaces `x_ft` by
# `x_base + SAE(x_ft − x_base)`.

# %%
name, recon = paired_hooks(pair, diff_sae, eval_tokens, mode="reconstruction")
_, stitch = paired_hooks(pair, None, eval_tokens, layer=1, mode="stitch")
ft_logits = pair.ft(eval_tokens)
kl_recon = token_kl(ft_logits, pair.ft.run_with_hooks(eval_tokens, fwd_hooks=[(name, recon)]))
kl_stitch = token_kl(ft_logits, pair.ft.run_with_hooks(eval_tokens, fwd_hooks=[(name, stitch)]))
print(name, f"KL stitched {kl_stitch.mean():.4f} -> reconstruction {kl_recon.mean():.4f}",
      f"(closed {1 - kl_recon.mean() / kl_stitch.mean():.3f})")

# %% [markdown]
# Hooks compose with `run_with_cache` (through the `hooks` context manager) and with
# recording: here we keep the diff-SAE codes and the downstream residual of the patched run.

# %%
store: dict[str, torch.Tensor] = {}
x_base = pair.residual_at("base", eval_tokens, 1)
with pair.ft.hooks(fwd_hooks=[(name, record_codes_hook(diff_sae, store, base_acts=x_base)),
                              (name, recon)]):
    logits, cache = pair.ft.run_with_cache(eval_tokens, names_filter=["blocks.1.hook_resid_post"])
codes = store["codes"]
top = codes.flatten(0, 1).mean(0).topk(3).indices
print("most active diff-SAE latents:", top.tolist(), "| cached", tuple(cache["blocks.1.hook_resid_post"].shape))

# %% [markdown]
# ## Steering the base model with ft-specific directions
# Add the top latents' (signed) decoder directions to the *base* model's residual and see
# how far it moves towards the fine-tune.

# %%
direction = latent_direction(diff_sae, top)
base_logits = pair.base(eval_tokens)
for scale in (0.0, 1.0, 2.0):
    steered = pair.base.run_with_hooks(eval_tokens, fwd_hooks=[(name, steering_hook(direction, scale))])
    print(f"scale {scale}: KL(p_ft || p_steered base) = {token_kl(ft_logits, steered).mean():.4f}")
