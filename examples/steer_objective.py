"""AntiPaSTO's steering objective (arXiv 2601.07473), compact, with a fast training step.

Each pair is one question asked under a positive (chosen) and a negative (rejected)
persona, followed by the same short assistant continuation. Rows: the batch's chosen rows,
then its rejected rows. Losses, at alpha = +1 and alpha = -1 against the base (alpha = 0):

- anti-parallel projection: at the hidden layer, over each row's last 3 tokens, the change
  that +1 and -1 make to the chosen-minus-rejected hidden difference should point in
  opposite directions along the reference difference (product of the two cosines -> -1);
- coherence barrier: per answer token, total variation from the reference distribution
  above ``coh_frac * sqrt(entropy + 0.02)`` is penalised with ``log1p(50 v)^2 + v``;
- monotonic ordering: the chosen-minus-rejected log-prob gap of the answer must rise by
  ``margin`` at +1 and fall by ``margin`` at -1 (a hinge on both, weight ``mono_weight``).

Why the step is fast: everything the base model contributes is the same at every step, so
:func:`reference` computes it once per data set, outside any gradient: the residual stream
entering the first adapted block (no adapter below it changes it), the reference hidden
difference and the reference answer distributions. A step then runs only the adapted
blocks and those above them, twice (alpha = +1 and -1, each a scalar alpha, so AntiPaSTO
folds its rotations into one (r, r) matrix per layer), and computes logits only at the
answer positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax import set_alpha

SIDES = (1.0, -1.0)


def chat_prompt(tokenizer, system: str | None, question: str) -> str:
    """The model's chat template where it has one; a plain transcript for the byte tokenizer."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"system: {system}\n" if system else "") + f"user: {question}\nassistant: "


def encode_pairs(tokenizer, data: dict, items: list[dict]) -> dict[str, np.ndarray]:
    """Right-padded rows (all chosen, then all rejected) with the answer's positions:
    ``ans_pos[i, j]`` is the position whose logits predict answer token ``ans_tok[i, j]``."""
    prompts = [chat_prompt(tokenizer, data["positive_system"], it["question"]) for it in items]
    prompts += [chat_prompt(tokenizer, data["negative_system"], it["question"]) for it in items]
    answers = [it["continuation"] for it in items] * 2
    texts = [p + a for p, a in zip(prompts, answers, strict=True)]
    enc = tokenizer(texts, padding=True, padding_side="right", return_tensors="np")  # positions below assume it
    mask = np.asarray(enc["attention_mask"], bool)
    tokens = np.asarray(enc["input_ids"], np.int32)
    n_prompt = np.array([len(tokenizer(p, return_tensors="np")["input_ids"][0]) for p in prompts])
    length = mask.sum(1)
    n_answer = length - n_prompt
    if (n_answer < 1).any():
        raise ValueError("every continuation must add at least one token after its prompt")
    width = int(n_answer.max())
    j = np.arange(width)[None]
    ans_mask = j < n_answer[:, None]
    ans_pos = np.where(ans_mask, n_prompt[:, None] - 1 + j, 0).astype(np.int32)
    ans_tok = np.take_along_axis(tokens, np.minimum(ans_pos + 1, tokens.shape[1] - 1), axis=1)
    return {
        "tokens": tokens,
        "mask": mask,
        "ans_pos": ans_pos,
        "ans_tok": ans_tok,
        "ans_mask": ans_mask,
        "last3": (length[:, None] - 3 + np.arange(3)[None]).astype(np.int32),
    }


def _take(x, idx):
    """Rows' positions: x (rows, T, ...) at idx (rows, k) -> (rows, k, ...)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _answer_logp(model, stream, batch):
    """Log-softmax at the answer positions only: (rows, A, V)."""
    return jax.nn.log_softmax(model.head(_take(stream, batch["ans_pos"])).astype(jnp.float32), axis=-1)


def _upper(model, prefix, batch, first: int, hidden_layer: int):
    """Blocks ``first ..`` on the cached prefix: the stream after ``hidden_layer`` and the answer log-probs."""
    hidden = model.blocks(prefix, batch["mask"], first, hidden_layer + 1)
    top = model.blocks(hidden, batch["mask"], hidden_layer + 1)
    return _take(hidden, batch["last3"]).astype(jnp.float32), _answer_logp(model, top, batch)


def reference(model, batch, *, first: int, hidden_layer: int) -> dict:
    """The base model's share of the objective, computed once (call under ``nnx.jit``)."""
    set_alpha(model, 0.0)
    prefix = model.blocks(model.embed(batch["tokens"]), batch["mask"], 0, first)
    hidden, logp = _upper(model, prefix, batch, first, hidden_layer)
    set_alpha(model, 1.0)
    return {"prefix": prefix, "ref_hidden": hidden, "ref_logp": logp}


def _cos(a, b, eps=1e-6):
    # eps inside the square roots: the +-1 changes start at exactly zero, where a norm's gradient is NaN
    return (a * b).sum(-1) / jnp.sqrt(((a * a).sum(-1) + eps) * ((b * b).sum(-1) + eps))


def _answer_mean(x, batch):
    m = batch["ans_mask"]
    return (x * m).sum(-1) / m.sum(-1)


def steering_loss(model, batch, *, first: int, hidden_layer: int, margin: float, coh_frac: float, mono_weight: float):
    """The loss on a batch that carries :func:`reference`'s outputs; returns (loss, parts)."""
    n = batch["tokens"].shape[0] // 2
    ref_h, ref_logp = batch["ref_hidden"], batch["ref_logp"]
    ref_diff = ref_h[:n] - ref_h[n:]
    p_ref = jnp.exp(ref_logp)
    threshold = coh_frac * jnp.sqrt(-(p_ref * ref_logp).sum(-1) + 0.02)
    ref_lp = _answer_mean(jnp.take_along_axis(ref_logp, batch["ans_tok"][..., None], -1)[..., 0], batch)
    ref_gap = ref_lp[:n] - ref_lp[n:]
    cosines, coherence, gaps, tvs = [], 0.0, [], []
    for alpha in SIDES:
        set_alpha(model, alpha)
        hidden, logp = _upper(model, batch["prefix"], batch, first, hidden_layer)
        cosines.append(_cos(hidden[:n] - hidden[n:] - ref_diff, ref_diff))
        tv = 0.5 * jnp.abs(jnp.exp(logp) - p_ref).sum(-1)  # (rows, A)
        v = jax.nn.relu(tv - threshold)
        coherence += _answer_mean(jnp.log1p(50.0 * v) ** 2 + v, batch).mean() / len(SIDES)
        lp = _answer_mean(jnp.take_along_axis(logp, batch["ans_tok"][..., None], -1)[..., 0], batch)
        gaps.append(lp[:n] - lp[n:] - ref_gap)
        tvs.append(_answer_mean(tv, batch).mean())
    set_alpha(model, 1.0)
    proj = (cosines[0] * cosines[1]).mean()
    up, down = gaps
    mono = (jax.nn.relu(margin - up) + jax.nn.relu(margin + down)).mean()
    loss = proj + coherence + mono_weight * mono
    parts = {"proj": proj, "coh": coherence, "mono": mono, "tv": sum(tvs) / 2, "gap+": up.mean(), "gap-": down.mean()}
    return loss, parts


def make_step(loss_fn, wrt):
    @nnx.jit
    def step(model, optimizer, batch):
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)
        (loss, parts), grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        return loss, parts

    return step
