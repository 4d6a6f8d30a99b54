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
# # 01 · Quickstart: diffing a chat fine-tune on the bundled organism
#
# Model diffing asks *what did fine-tuning change inside the model?* This tutorial runs the
# whole loop on the bundled **organism**: a tiny base model and its chat fine-tune whose
# differences were planted on purpose (refusals, a persona, a knowledge edit, false-premise
# corrections, the chat template) and are labelled token by token. Because we know the answer,
# we can check whether the method found it.
#
# 1. load the pair and look at where the two models' next-token distributions diverge;
# 2. harvest a small paired activation cache (both models, same tokens, one hook);
# 3. train a BatchTopK **crosscoder** and a BatchTopK **diff-SAE** with SAELens's `SAETrainer`,
#    save them and reload them with `SAE.load_from_disk`;
# 4. build the **latent table**: relative decoder norm Δ (0 = ft-only, 1 = base-only) and
#    **Latent Scaling** ν (near 0 = genuinely ft-specific);
# 5. read max-activating examples of the top ft-only latents and score one against the
#    organism's behaviour labels (AUROC).
#
# Everything runs on a CPU in about a minute; the sizes are small on purpose. Conventions and
# maths: `METHODS.md` (Δ, ν) and `docs/architecture.md`.

# %%
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

import sae_diff  # noqa: F401  (registers the crosscoder / diff-SAE architectures with SAELens)
from sae_diff.analysis import cache_batches, latent_table, max_activating_examples
from sae_diff.data import ActivationCache, PairedActivationsStore, TokenSource, harvest_cache
from sae_diff.dictionaries.normalisation import prepare_crosscoder
from sae_diff.dictionaries.registry import training_config, training_sae
from sae_diff.evaluation import kl_dashboard
from sae_diff.organisms import load_organism
from sae_diff.report.scoring import auroc_matrix  # AUROC of latents vs token labels

t_start = time.perf_counter()
torch.manual_seed(0)
WORK = Path(tempfile.mkdtemp(prefix="sae_diff_quickstart_"))  # cache + dictionaries go here

# %% [markdown]
# ## 1. The model pair
#
# `load_organism()` reads the shipped weights (offline, sha256-verified). `org.paired()` wraps
# the two TransformerLens models in a `PairedModel`, the one place in `sae_diff` that runs
# both models in lock-step on the *same* tokens. The organism also tells us where to look:
# `org.recommended_hook` is the residual stream in the middle of the network.

# %%
org = load_organism()
pair = org.paired()
HOOK = org.recommended_hook
print(f"{org.base_name} vs {org.ft_name}: {org.base.cfg.n_layers} layers, d_model {pair.d_model}")
print("hook:", HOOK, "| planted behaviours:", ", ".join(org.behaviours))

# %% [markdown]
# ### One chat, and where the models disagree
#
# A held-out refusal conversation, rendered with the Gemma-style chat template. The KL
# dashboard scores every assistant position by `KL(p_ft || p_base)`: how surprised the base
# model would be by the fine-tune's next-token distribution. High-KL tokens are where the
# fine-tune's behaviour lives (METHODS.md §4 reports them for the first 10 assistant tokens
# and the rest separately).

# %%
convs, eval_tokens, eval_valid, eval_assistant = org.eval_batch(n=4)  # 4 held-out conversations per behaviour

refusal = next(c for c in convs if c.behaviour == "refusal")
print(org.tokenizer.decode(refusal.tokens))

dash = kl_dashboard(pair, eval_tokens, eval_assistant, top_n=8, context=8,
                    attention_mask=eval_valid.long())
print({k: round(v, 3) if isinstance(v, float) else v for k, v in dash.summary.items()})
print(dash.table[["token", "next_token", "kl", "top_base", "top_ft", "context"]].to_string())
dash.save_html(WORK / "kl_dashboard.html")  # context coloured by per-token KL

# %% [markdown]
# ## 2. A paired activation cache
#
# Dictionaries are trained on activations of *both* models at one hook, on a mixture of
# pretraining text and chat transcripts (so that latents for the base model's world survive
# next to the chat-specific ones). `TokenSource` packs documents into fixed-length rows;
# `harvest_cache` runs the pair once and writes a sharded, checksummed cache of
# `(tokens, 2, d_model)` activations (index 0 = base, 1 = ft) with the masks (BOS, template
# tokens, ...) that training and analysis use. For a real model this is the expensive step,
# done once and shared by every dictionary (see tutorial 02).

# %%
texts = org.pretraining_dataset("train", n=300, seed=0)
chats = org.chat_dataset("train", n=300, seed=0)
source = TokenSource([texts, chats], org.tokenizer, context_size=64, proportions=[0.5, 0.5],
                     max_rows=256)
harvest_cache(pair, source, WORK / "cache", HOOK, batch_size=32, rows_per_shard=64,
              progress=False, verbose=False)
cache = ActivationCache(WORK / "cache")
print(f"cache: {cache.n_tokens} tokens, {cache.n_shards} shards, {cache.nbytes / 2**20:.1f} MiB")

# %% [markdown]
# ## 3. Train a BatchTopK crosscoder and a diff-SAE with SAELens
#
# Both are SAELens training SAEs (registered by `import sae_diff`), so SAELens's own
# `SAETrainer` trains them; `PairedActivationsStore` is the data provider.
#
# - **Crosscoder** (`batchtopk_crosscoder`, store mode `paired`): one shared code, one decoder
#   per model. `prepare_crosscoder` sets the per-model normalisation (centring, then scaling
#   to E‖x‖² = 1, as crosscoder_learning does) and the decoder-bias init from a few batches. BatchTopK (not L1) because L1 crosscoders invent
#   "ft-only" latents (Complete Shrinkage, Latent Decoupling; METHODS.md §5).
# - **Diff-SAE** (`batchtopk_diff_sae`, store mode `diff`): a BatchTopK SAE on `x_ft − x_base`;
#   it only spends capacity on what changed.
#
# `save_inference_model` exports the inference form (a JumpReLU with the BatchTopK threshold,
# normalisation folded into the weights) in SAELens's layout; `SAE.load_from_disk` reloads it.

# %%
D_SAE, K, STEPS, BATCH = 8 * pair.d_model, 16, 250, 256
meta = {"base_model_name": pair.base_name, "model_name": pair.ft_name, "hook_name": HOOK}


def train(architecture, mode, **kw):
    store = PairedActivationsStore.from_cache(cache, mode=mode, batch_size=BATCH, seed=0)
    torch.manual_seed(0)
    sae = training_sae(training_config(architecture, d_in=pair.d_model, d_sae=D_SAE, k=K, **kw))
    if mode == "paired":
        prepare_crosscoder(sae, store, n_batches=4)
    for key, value in meta.items():
        sae.cfg.metadata[key] = value
    trainer_cfg = SAETrainerConfig(
        total_training_samples=STEPS * BATCH, train_batch_size_samples=BATCH, lr=2e-3,
        lr_end=2e-4, lr_scheduler_name="cosineannealing", lr_warm_up_steps=STEPS // 20,
        dead_feature_window=50, feature_sampling_window=100, n_batches_for_norm_estimate=8)
    SAETrainer(trainer_cfg, sae, store).fit()
    path = WORK / "dictionaries" / architecture
    sae.save_inference_model(path)
    return SAE.load_from_disk(path)


t0 = time.perf_counter()
crosscoder = train("batchtopk_crosscoder", "paired", threshold_ema_decay=0.99)
diff_sae = train("batchtopk_diff_sae", "diff", normalize_activations="expected_average_only_in")
print(f"trained in {time.perf_counter() - t0:.0f} s:", type(crosscoder).__name__, type(diff_sae).__name__)
print("crosscoder W_dec", tuple(crosscoder.W_dec.shape), "| diff-SAE W_dec", tuple(diff_sae.W_dec.shape),
      "| diff sign:", diff_sae.cfg.diff_sign)

# %% [markdown]
# ## 4. The latent table: Δ tags and Latent Scaling
#
# `latent_table` makes one pass over the cache and returns one row per latent:
#
# - **Δ** (`delta`), the relative decoder norm: 0 = the latent only writes to the fine-tune
#   (**ft-only**), 1 = base-only, 0.5 = shared; `tag` bins it (`ft_only` Δ < 0.1, ...);
#   `dec_cos` is the cosine between the two decoder rows.
# - **Latent Scaling**: how much of latent j's decoder direction the *base* model's
#   reconstruction (ν_r, `nu_recon`) or error (ν_ε, `nu_error`) carries, relative to the
#   fine-tune's. A small Δ alone is not evidence: a latent can look ft-only because the base
#   reconstructs the same information with other latents (Latent Decoupling, high ν_r) or
#   because the sparsity penalty shrank its base decoder while the base still has the
#   information in its error (Complete Shrinkage, high ν_ε). **ν near 0 = genuinely
#   ft-specific.** Ratios need enough firing tokens (`min_count`); rarer latents get NaN.
#
# The table also has firing frequencies inside the cache's masks (e.g. `freq[special]` on
# template tokens) and saves next to the dictionary (`save_latent_table`).
#
# A BatchTopK crosscoder makes few latents ft-only by Δ (that is the point of it: the L1
# crosscoder's many "chat-only" latents are mostly artifacts), and a run this short may
# have none below Δ = 0.1. We therefore *rank* the latents that fired by Δ (most
# ft-leaning first) and read ν next to it.

# %%
table = latent_table(crosscoder, cache_batches(cache), min_count=20, progress=False)
print("tags of the latents that fired:", table[table["count_active"] > 0]["tag"].value_counts().to_dict())
# Rank the latents that fired by how ft-specific their decoder is: Δ ascending.
ranking = table[table["count_active"] > 0].sort_values(["delta", "count_active"], ascending=[True, False])
ft_only = ranking[ranking["tag"] == "ft_only"]
genuine = ft_only[(ft_only["nu_error"] < 0.3) & (ft_only["nu_recon"] < 0.6)]
print(f"{len(ft_only)} live ft-only latents (Δ < 0.1), {len(genuine)} of them pass the ν filter "
      "(ν_ε < 0.3 and ν_r < 0.6). The lowest Δ:")
cols = ["delta", "tag", "dec_cos", "count_active", "freq", "nu_error", "nu_recon"]
print(ranking[cols].head(10).round(3).to_string())

# %% [markdown]
# ## 5. What do the most ft-specific latents fire on?
#
# Shortlist the 20 most ft-leaning latents by Δ, then keep those whose information the base
# model does *not* carry: both ν_ε and ν_r small (the larger of the two ascending).
# Max-activating examples come from the same cache (`cache.tokens()` is the token table its
# activations were computed on). The active token is marked `«like this»`; in a notebook the
# `LatentExamples` objects render as HTML. On the organism, expect latents on the chat
# template (the assistant turn's header, `<start_of_turn>`): tokens the base model never saw
# used, so their directions are new in the fine-tune.

# %%
shortlist = ranking.head(20)
nu_max = shortlist[["nu_error", "nu_recon"]].max(axis=1).sort_values()  # NaN (too rare) last
candidates = nu_max.index[:3].tolist()
print(shortlist.loc[candidates, cols].round(3).to_string())
examples = max_activating_examples(crosscoder, cache_batches(cache), cache.tokens(), candidates,
                                   k=4, n_quantiles=0, window=(10, 2), tokenizer=org.tokenizer,
                                   progress=False)
for ex in examples.values():
    print(ex.to_text(), "\n")

# %% [markdown]
# ### Check against the planted behaviours (AUROC)
#
# The organism labels every token: `behaviour_masks` marks where each behaviour's *trigger*
# is (the refusal trigger word, the persona question, the template tokens, ...) and
# `response_masks` the planted *response*. A latent that tracks a behaviour separates its
# labelled tokens from the rest: AUROC of the latent's activation against the labels, on the
# held-out conversations (BOS and padding excluded). 0.5 = chance, 1 = perfect.

# %%
with torch.no_grad():
    acts = pair.paired_activations(eval_tokens, [HOOK], attention_mask=eval_valid.long())[HOOK]
    codes = crosscoder.encode(acts)  # (batch, seq, d_sae), the inference (JumpReLU) encoder
scored = eval_valid.clone()
scored[:, 0] = False  # BOS
labels = {f"{b}:trigger": m[scored] for b, m in org.behaviour_masks(eval_tokens).items()}
labels |= {f"{b}:response": m[scored] for b, m in org.response_masks(eval_tokens).items()}
ranked = torch.tensor(shortlist.index.tolist())  # the 20 most ft-leaning latents
matrix = auroc_matrix(codes[scored], ranked, labels)  # candidates x labels
print(pd.DataFrame({"best latent": matrix.idxmax(), "AUROC": matrix.max().round(3)}).to_string())
best_latent, best_label = matrix.stack().idxmax()
best_auroc = float(matrix.loc[best_latent, best_label])
print(f"best match: latent {best_latent} ~ {best_label}, AUROC {best_auroc:.3f}, "
      f"Δ {table.loc[best_latent, 'delta']:.3f}, ν_ε {table.loc[best_latent, 'nu_error']:.3f}, "
      f"ν_r {table.loc[best_latent, 'nu_recon']:.3f}")
if best_latent not in examples:
    print(max_activating_examples(crosscoder, cache_batches(cache), cache.tokens(), [best_latent], k=4,
                                  n_quantiles=0, window=(10, 2), tokenizer=org.tokenizer,
                                  progress=False)[best_latent].to_text())

# %% [markdown]
# ## 6. The diff-SAE's view
#
# A diff-SAE has one decoder, so there is no Δ: every latent describes part of the change
# `x_ft − x_base`. Latent Scaling on *activation* targets asks how much of the latent's
# direction is in the base activations (ν_act = β_base / β_ft): near 0 means the direction is
# present in the fine-tune only.

# %%
diff_table = latent_table(diff_sae, cache_batches(cache), min_count=20, progress=False)
diff_alive = diff_table[diff_table["count_active"] > 0]
print(f"{len(diff_alive)} of {len(diff_table)} diff-SAE latents fired; ν_act closest to 0:")
closest = diff_alive.dropna(subset=["nu_act"]).sort_values("nu_act", key=abs)
print(closest[["count_active", "freq", "beta_act_base", "beta_act_ft", "nu_act"]].head(6).round(3).to_string())
with torch.no_grad():
    diff_codes = diff_sae.encode(acts)  # paired input: the difference is taken with cfg.diff_sign
diff_ranked = torch.tensor(diff_alive.sort_values("count_active", ascending=False).index[:20].tolist())
diff_matrix = auroc_matrix(diff_codes[scored], diff_ranked, labels)
print(pd.DataFrame({"crosscoder": matrix.max(), "diff-SAE": diff_matrix.max()}).round(3).to_string())

# %%
elapsed = time.perf_counter() - t_start
print(f"tutorial complete: 01_quickstart best_auroc={best_auroc:.3f} ({best_label}, latent {best_latent}) "
      f"in {elapsed:.0f} s")
