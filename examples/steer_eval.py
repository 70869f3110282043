"""Judge steering on the text it generates, with the same prompts and scorer for every method.

For each method and coefficient the held-out prompts are answered by greedy decoding; then

- effect: the mean VADER compound sentiment of the answers (a lexicon scorer from the
  package registry, independent of the model: -1 very negative .. +1 very positive);
- coherence: the per-token KL(steered || base) over the generated tokens, the base model's
  distribution taken with the plain prompt, and the base model's perplexity of the text;
- over coefficients in [-1, 1]: Spearman of effect against the coefficient, and the
  largest |coefficient| whose KL at both signs stays inside the budget.

The steering-vector baseline lives here too: a mean-difference vector of the residual
stream (positive persona minus negative persona at the hidden layer, the method of
repeng / steering-vectors), added with a per-row coefficient at that layer's output.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.stats import spearmanr

from lora_jax.models.scored import generate_scored


class AddVector(nnx.Module):
    """``layer(x) + coef * vector``: wraps the layer whose output joins the residual stream
    (the block's ``down_proj``), so the vector is added to the stream after that block.
    ``coef`` is a scalar or one value per row, like an adapter's alpha."""

    def __init__(self, layer: nnx.Module, vector):
        self.layer = layer
        self.vector = nnx.Variable(jnp.asarray(vector, jnp.float32))
        self.coef = nnx.Variable(jnp.zeros((), jnp.float32))

    def __call__(self, x):
        y = self.layer(x)
        coef = self.coef[...]
        coef = coef.reshape(coef.shape + (1,) * (y.ndim - coef.ndim))  # scalar, or one value per row
        return y + (coef * self.vector[...].reshape((1,) * (y.ndim - 1) + (-1,))).astype(y.dtype)


@dataclasses.dataclass
class Rows:
    """One batch of generations: a context and per-row coefficients for each row."""

    method: list[str]
    coef: np.ndarray  # the method's coefficient of each row (0 = the base model)
    prompt: list[int]  # index of the held-out prompt
    context: list[str]  # the text the model is conditioned on
    settings: dict[str, np.ndarray]  # name -> per-row value to set on the model before generating


def left_pad(tokenizer, texts: list[str]):
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="np")
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], bool)


def generate_rows(model, base, tokenizer, rows: Rows, base_prompts: list[str], apply_settings, *, max_new_tokens: int):
    """ONE batched, scored generation for all rows. ``base`` is ``model`` with every setting
    at 0 (the base model); it reads row ``b``'s plain prompt ``base_prompts[rows.prompt[b]]``.
    Returns the generated ids, which of them are real, and per row the mean per-token
    KL(steered || base) and the base model's mean NLL per token of the text."""
    ids, mask = left_pad(tokenizer, rows.context)
    ref_ids, ref_mask = left_pad(tokenizer, base_prompts)
    apply_settings(model, rows.settings)
    out, kl, ref_lp, live = (
        np.asarray(a)
        for a in generate_scored(
            model,
            ids,
            mask,
            reference=base,
            reference_tokens=ref_ids,
            reference_mask=ref_mask,
            reference_rows=np.asarray(rows.prompt),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    n = np.maximum(live.sum(1), 1)
    return out, live, (kl * live).sum(1) / n, -(ref_lp * live).sum(1) / n


@dataclasses.dataclass
class MethodScore:
    name: str
    coefs: np.ndarray
    effect: np.ndarray  # mean sentiment per coefficient
    kl: np.ndarray  # mean per-token KL to the base per coefficient
    ppl: np.ndarray  # base model's perplexity of the text per coefficient
    spearman: float  # effect against coefficient, over [-1, 1]
    max_coef_in_budget: float

    def row(self) -> str:
        at = {float(c): i for i, c in enumerate(self.coefs)}
        cell = lambda c: f"{self.effect[at[c]]:+.3f}" if c in at else "   -  "
        lo, hi = at.get(-1.0), at.get(1.0)
        span = f"{self.effect[hi] - self.effect[lo]:+.3f}" if lo is not None and hi is not None else "-"
        kl1 = f"{max(self.kl[lo], self.kl[hi]):.3f}" if lo is not None and hi is not None else "-"
        ppl1 = f"{max(self.ppl[lo], self.ppl[hi]):.1f}" if lo is not None and hi is not None else "-"
        return (
            f"| {self.name} | {cell(-1.0)} | {cell(0.0)} | {cell(1.0)} | {span} | {self.spearman:+.2f} "
            f"| {kl1} | {ppl1} | {self.max_coef_in_budget:g} |"
        )


TABLE_HEAD = (
    "| method | effect at -1 | at 0 | at +1 | +1 minus -1 | Spearman [-1, 1] | KL/token at +-1 (max) "
    "| base ppl at +-1 (max) | largest |coef| in KL budget |\n|---|---|---|---|---|---|---|---|---|"
)


def score_method(name, coefs, sentiment, kl, nll, *, kl_budget: float) -> MethodScore:
    """Aggregate per-row scores (rows with the same coefficient pooled)."""
    levels = np.unique(coefs)
    effect = np.array([sentiment[coefs == c].mean() for c in levels])
    mean_kl = np.array([kl[coefs == c].mean() for c in levels])
    ppl = np.array([np.exp(nll[coefs == c].mean()) for c in levels])
    inside = np.abs(levels) <= 1.0
    rho = float(spearmanr(levels[inside], effect[inside]).statistic) if inside.sum() > 2 else float("nan")
    ok = 0.0
    for mag in sorted({abs(float(c)) for c in levels if c != 0}):
        if all(mean_kl[levels == s * mag].max(initial=0.0) <= kl_budget for s in (-1, 1)):
            ok = mag
        else:
            break
    return MethodScore(name, levels, effect, mean_kl, ppl, rho, ok)


def plot_methods(scores: list[MethodScore], path: str, *, kl_budget: float, title: str) -> str:
    """Effect against coherence cost (KL per token) for every method, points labelled by coefficient."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for s in scores:
        ax.plot(s.kl, s.effect, marker="o", label=s.name)
        for c, x, y in zip(s.coefs, s.kl, s.effect, strict=True):
            ax.annotate(f"{c:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axvline(kl_budget, color="grey", linestyle="--", label=f"KL budget ({kl_budget:g} nats/token)")
    ax.set_xlabel("coherence cost: KL(steered || base) per generated token (nats)")
    ax.set_ylabel("effect: mean VADER sentiment of the answers (-1 .. +1)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
