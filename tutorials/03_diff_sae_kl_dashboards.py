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
# # 03 · Diff-SAEs, KL dashboards and KL attribution
#
# Tutorial 01 found ft-specific latents by their *geometry* (Δ, ν). This one starts from the
# *outputs*: where do the fine-tune's next-token predictions differ from the base model's,
# and which dictionary latents explain those differences causally? It follows the diff-SAE
# posts' pipeline (METHODS.md §2 and §4) on the bundled organism:
#
# 1. per-token `KL(p_ft || p_base)` on chat data, split into the first 10 assistant tokens
#    and the rest, and the highest-KL tokens (the **KL dashboard**);
# 2. a layer-stitching sweep: which layers carry the change;
# 3. a BatchTopK **diff-SAE** on `x_ft − x_base` at the organism's hook;
# 4. the **KL patching table**: patch the diff-SAE's reconstruction (or its error) into the
#    stitched model and measure how much of the KL gap closes;
# 5. **KL attribution**: which latents, patched one at a time, remove the KL at the top tokens;
# 6. **diff amplification** for one planted behaviour (refusal): sample from
#    `l_ft + α (l_ft − l_base)` and watch the behaviour's rate.
#
# CPU, about a minute.

# %%
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

import sae_diff  # noqa: F401  (registers the dictionary architectures with SAELens)
from sae_diff.analysis import cache_batches, latent_table
from sae_diff.data import ActivationCache, PairedActivationsStore, TokenSource, harvest_cache
from sae_diff.dictionaries.registry import training_config, training_sae
from sae_diff.evaluation import (
    amplification_sweep,
    contains_tokens,
    gap_closed_summary,
    kl_attribution,
    kl_dashboard,
    kl_patching_table,
    layer_from_hook,
    response_logprob,
    stitching_sweep,
)
from sae_diff.organisms import load_organism, pad_conversations

t_start = time.perf_counter()
torch.manual_seed(0)
WORK = Path(tempfile.mkdtemp(prefix="sae_diff_tutorial03_"))

org = load_organism()
pair = org.paired()
HOOK = org.recommended_hook
print(f"{org.base_name} vs {org.ft_name} | hook {HOOK} | behaviours: {', '.join(org.behaviours)}")

# %% [markdown]
# ## 1. Where do the two models' outputs diverge?
#
# Held-out chat conversations (6 per planted behaviour), right-padded into one batch. We
# score the **assistant** positions only: that is where a chat fine-tune is supposed to
# behave differently. The first few assistant tokens usually carry most of the KL (the model
# "decides" how to answer there), so METHODS.md §4 reports the first 10 and the rest apart.

# %%
convs, tokens, valid, assistant = org.eval_batch(n=6)
mask = assistant & valid
attn = valid.long()

dash = kl_dashboard(pair, tokens, mask, top_n=10, context=10, attention_mask=attn)
s = dash.summary
print(f"mean KL(p_ft || p_base) on assistant tokens: all {s['all']:.3f} (n={s['n_all']}), "
      f"first 10 {s['first']:.3f} (n={s['n_first']}), rest {s['rest']:.3f} (n={s['n_rest']})")

# %% [markdown]
# Per behaviour: which planted behaviours move the output distribution most?

# %%
per_conv = torch.nan_to_num(dash.kl, nan=0.0).sum(1) / mask.sum(1).clamp(min=1)  # mean KL per chat
by_behaviour = pd.Series(per_conv.numpy(), index=[c.behaviour for c in convs]).groupby(level=0).mean()
print(by_behaviour.sort_values(ascending=False).round(3).to_string())

# %% [markdown]
# The highest-KL tokens, with context (`[[token]]` is the position whose next-token
# distribution differs; `next_token` is what follows in the data). `dash.save_html` writes
# the same table with every context token coloured by its KL.

# %%
print(dash.table[["token", "next_token", "kl", "top_base", "top_ft", "in_first", "context"]].to_string())
dash.save_html(WORK / "kl_dashboard.html")

# %% [markdown]
# ## 2. Layer stitching: which layers carry the change?
#
# Run base blocks `< L`, then ft blocks `≥ L`. At `L = 0` this is the fine-tune (KL 0), at
# `L = n_layers` the base model. Where `kl_to_ft` rises, the base's early layers are missing
# something the fine-tune computes there. The dictionary's hook is a *split layer*: a
# diff-SAE at `blocks.L.hook_resid_pre` explains the gap of the row `L`.

# %%
sweep = stitching_sweep(pair, tokens, mask, directions=("base",), attention_mask=attn)
print(sweep[["layer", "kl_to_ft", "kl_to_ft_first", "kl_to_ft_rest", "kl_to_base"]].round(3).to_string(index=False))
SPLIT = layer_from_hook(HOOK, pair.n_layers)
print(f"{HOOK} is split layer {SPLIT}")

# %% [markdown]
# ## 3. A diff-SAE at the hook
#
# Harvest a small paired cache (pretraining text + chat, half each) and train a BatchTopK
# SAE on `x_ft − x_base` with SAELens's `SAETrainer` (store mode `diff`; the sign is saved in
# `cfg.diff_sign`). A diff-SAE spends all its capacity on the change, which is why it
# explains more of the KL gap than a crosscoder of the same width (METHODS.md §5).

# %%
source = TokenSource([org.pretraining_dataset("train", n=300, seed=0), org.chat_dataset("train", n=300, seed=0)],
                     org.tokenizer, context_size=64, proportions=[0.5, 0.5], max_rows=256)
harvest_cache(pair, source, WORK / "cache", HOOK, batch_size=32, rows_per_shard=64, progress=False, verbose=False)
cache = ActivationCache(WORK / "cache")

STEPS, BATCH = 250, 256
store = PairedActivationsStore.from_cache(cache, mode="diff", batch_size=BATCH, seed=0)
trainer_sae = training_sae(training_config("batchtopk_diff_sae", d_in=pair.d_model, d_sae=8 * pair.d_model,
                                           k=16, normalize_activations="expected_average_only_in"))
for key, value in {"base_model_name": pair.base_name, "model_name": pair.ft_name, "hook_name": HOOK}.items():
    trainer_sae.cfg.metadata[key] = value
SAETrainer(SAETrainerConfig(total_training_samples=STEPS * BATCH, train_batch_size_samples=BATCH, lr=2e-3,
                            lr_end=2e-4, lr_scheduler_name="cosineannealing", lr_warm_up_steps=STEPS // 20,
                            dead_feature_window=50, feature_sampling_window=100, n_batches_for_norm_estimate=8),
           trainer_sae, store).fit()
trainer_sae.save_inference_model(WORK / "diff_sae")
diff_sae = SAE.load_from_disk(WORK / "diff_sae")

table = latent_table(diff_sae, cache_batches(cache), min_count=20, progress=False)
print(f"diff-SAE: {int((table['count_active'] > 0).sum())} of {len(table)} latents fired on "
      f"{table.attrs['n_tokens']} tokens; ν_act known for {int(table['nu_act'].notna().sum())}")

# %% [markdown]
# ## 4. The KL patching table
#
# Split at the hook. Every intervention builds a residual `h` from `x_base` and `x_ft` and
# runs the fine-tune's second half on it; the metric is `KL(p_ft || p_patched)` on assistant
# tokens, and `closed = 1 − KL(patched) / KL(stitched)` is the fraction of the gap closed:
#
# - `stitched`: `h = x_base` (the gap to close); `ft`: `h = x_ft` (KL 0);
# - `reconstruction`: `h = x_base + SAE(x_ft − x_base)`; `error`: `h = x_base + (D − D̂)`;
#   the two together are the whole difference;
# - `subset:nu<t`: only latents with ν_act < t, against `random:` subsets of the same size;
# - `tokens:first10`: `x_ft` at the first 10 assistant positions only.
#
# A good diff-SAE closes most of the gap with its reconstruction and little with its error.
# A ν subset only means something next to its random baseline: when most live latents have
# ν < t (common for a diff-SAE, whose latents are all about the change), the two coincide;
# the `nu_low50%` / `nu_high50%` halves compare equal-size sets ranked by ν.

# %%
patch = kl_patching_table(pair, {"diff_sae": diff_sae}, tokens, mask, nu={"diff_sae": table},
                          random_seeds=2, attention_mask=attn)
cols = ["intervention", "kl", "kl_first", "kl_rest", "closed"]
print(patch[[c for c in cols if c in patch.columns]].round(3).to_string(index=False))
summary = gap_closed_summary(patch)
print(summary.round(3).to_string())
closed_recon = float(summary.loc["diff_sae", "reconstruction"])

# %% [markdown]
# ## 5. KL attribution: which latents explain the top-KL tokens?
#
# For the 8 highest-`KL(p_ft || p_stitched)` assistant tokens, every diff-SAE latent active up
# to that token is a candidate; a first-order estimate picks the best 16, and each is patched
# alone into the stitched run (`h = x_base + f_j d_j`). `frac` is the share of that token's KL
# it removes. `.overall` sums over tokens: the latents to read first.

# %%
attr = kl_attribution(pair, diff_sae, tokens, mask, top_tokens=8, n_candidates=16, top_latents=3)
print(attr.tokens.round(3).to_string(index=False))
print(attr.per_token.query("rank == 0")[["seq", "pos", "token", "kl_stitched", "latent", "activation", "frac"]]
      .round(3).to_string(index=False))
print(attr.overall.head(5).round(3).to_string())

# %% [markdown]
# Do the attributed latents track a planted behaviour? Their AUROC against the organism's
# trigger and response labels on these conversations (BOS and padding excluded):

# %%
from sae_diff.report.scoring import auroc_matrix  # noqa: E402  (notebook cell)

with torch.no_grad():
    codes = diff_sae.encode(pair.paired_activations(tokens, [HOOK], attention_mask=attn)[HOOK])
scored = valid.clone()
scored[:, 0] = False
labels = {f"{b}:trigger": m[scored] for b, m in org.behaviour_masks(tokens).items()}
labels |= {f"{b}:response": m[scored] for b, m in org.response_masks(tokens).items()}
top_latents = torch.tensor(attr.overall["latent"].head(5).tolist())
matrix = auroc_matrix(codes[scored], top_latents, labels)
print(pd.DataFrame({"best label": matrix.idxmax(axis=1), "AUROC": matrix.max(axis=1).round(3)}).to_string())

# %% [markdown]
# ## 6. Diff amplification: making a planted behaviour louder
#
# `l_ft + α (l_ft − l_base)`: α = −1 is the base model, α = 0 the fine-tune, α > 0
# exaggerates whatever fine-tuning changed, which surfaces *rare* fine-tuning behaviours in
# samples (e.g. a backdoor the fine-tune shows once in a thousand samples). Here: the
# refusal. Prompts are held-out refusal requests with the generation prompt appended; the
# detector looks for `sorry`. Between α = −1 and 0 we interpolate from the base model to the
# fine-tune and can see where the behaviour switches on.
#
# `response_logprob` scores the planted response itself, with amplification inside the model
# (`mode="activations"`: the residual at the hook becomes `x_ft + α (x_ft − x_base)`). The
# organism's fine-tune already gives its refusal most of the probability, so there is little
# room above α = 0: large α pushes the activations off-distribution and the log-probability
# falls again. Amplification pays off for behaviours the fine-tune shows rarely.

# %%
tok = org.tokenizer
refusals = org.chat_conversations("test", n=3, behaviour="refusal")
prompts = [torch.tensor(tok(tok.apply_chat_template(c["messages"][:1], tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]) for c in refusals]
print(tok.decode(prompts[0]))
sorry = tok("sorry", add_special_tokens=False)["input_ids"]
end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
amp = amplification_sweep(pair, prompts, [-1.0, -0.75, -0.5, -0.25, 0.0, 1.0], contains_tokens(sorry), n_samples=8,
                          max_new_tokens=8, stop_token_ids=[end_of_turn], seed=0)
print(amp.to_string(index=False))

ref = [c for c in convs if c.behaviour == "refusal"]
r_tokens, r_valid, _ = pad_conversations(ref, tok.pad_token_id or 0)
r_resp = org.response_masks(r_tokens)["refusal"] & r_valid
lp = response_logprob(pair, r_tokens, r_resp, [-1.0, 0.0, 1.0, 2.0], mode="activations", layer=HOOK)
print(lp[["alpha", "logprob_per_token", "prob"]].round(3).to_string(index=False))

# %%
elapsed = time.perf_counter() - t_start
print(f"tutorial complete: 03_diff_sae_kl_dashboards closed_reconstruction={closed_recon:.3f} "
      f"kl_all={s['all']:.3f} in {elapsed:.0f} s")
