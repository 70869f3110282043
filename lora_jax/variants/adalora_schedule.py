"""AdaLoRA's rank allocation, called by the training loop after each optimizer step (PEFT's
``RankAllocator`` and ``AdaLoraModel.update_and_allocate``, same inputs, same choices).

    allocator = adalora_allocator(model)   # static: the AdaLoRA layers, the budget of every step
    alloc = allocator.init()               # the EMAs: an explicit pytree, carried by the loop
    ...inside the jitted train step, after optimizer.update(model, grads):
    alloc, budget = allocator.update_and_allocate(model, grads, step, alloc)

For every element w of a triplet's ``P`` column, ``E`` entry and ``Q`` row (adalora.py):

    I = |w dL/dw|,   Ibar <- b1 Ibar + (1 - b1) I,   U <- b2 U + (1 - b2) |I - Ibar|
    score = S(E_i) + (mean_j S(P_ji) + mean_o S(Q_io)),   S = Ibar U

Budget b(t) (triplets over all matrices; b0 the initial count, bT = target_r per matrix):
b0 for t <= tinit, then ``int((b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))^3 + bT)``.
Steps t < T - tfinal update the EMAs, and those past tinit with t % delta_t == 0 zero E
outside the top-b(t) scores (a tie at the threshold is dropped, as PEFT's kthvalue) and
record the kept set in each adapter's ``rank_mask``; t = T - tfinal allocates bT and
resets the EMAs; later steps zero E outside the recorded mask. Between allocations a
zeroed E trains like any other (as in PEFT); after T - tfinal it stays zero.

Jit: the step may be traced. The budgets are PEFT's float64 formula tabulated on the
host at construction (a float32 cubic could round across an integer), so one compiled
step serves every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Int

from lora_jax.paths import dotted, module_at
from lora_jax.variants.adalora import SCHEDULE, AdaLoRA, AdaLoRAConfig

__all__ = ["AdaLoRAAllocatorState", "AdaLoRAAllocator", "adalora_allocator"]

FACTORS = ("lora_a", "lora_e", "lora_b")  # P (d_in, r), E (r,), Q (r, d_out) of each layer
Triplets = dict[str, tuple[Array, Array, Array]]  # {adapter path: (P, E, Q)-shaped arrays}


class AdaLoRAAllocatorState(NamedTuple):
    """The EMAs of sensitivity (``ipt``) and uncertainty (``unc``), shaped like the factors."""

    ipt: Triplets
    unc: Triplets


def _value(leaf: Any) -> Array:
    return leaf[...] if isinstance(leaf, nnx.Variable) else leaf


def peft_budget(step: int, init: int, target: int, cfg: AdaLoRAConfig) -> int:
    """PEFT's ``budget_schedule`` in Python floats (the table entries)."""
    if step <= cfg.tinit:
        return init
    if step > cfg.total_step - cfg.tfinal:
        return target
    mul_coeff = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
    return int((init - target) * (mul_coeff**3) + target)


@dataclasses.dataclass(frozen=True, eq=False)
class AdaLoRAAllocator:
    """The static half of the allocation: which adapters, their shapes, the budget table.
    Build it with :func:`adalora_allocator`; capture it in the jitted step (not an argument)."""

    config: AdaLoRAConfig
    parts: dict[str, tuple[Any, ...]]
    shapes: dict[str, tuple[tuple[int, ...], ...]]
    init_budget: int
    target_budget: int
    budgets: np.ndarray  # budget at steps 0 .. total_step - tfinal

    def init(self) -> AdaLoRAAllocatorState:
        zeros = lambda: {p: tuple(jnp.zeros(s, jnp.float32) for s in shapes) for p, shapes in self.shapes.items()}
        return AdaLoRAAllocatorState(zeros(), zeros())

    def budget(self, step: Int[ArrayLike, ""]) -> Int[Array, ""]:
        """The budget at ``step`` (``bT`` after the schedule's end)."""
        step = jnp.asarray(step, jnp.int32)
        table = jnp.asarray(self.budgets)[jnp.clip(step, 0, len(self.budgets) - 1)]
        return jnp.where(step > len(self.budgets) - 1, self.target_budget, table)

    def allocate(
        self,
        factors: Triplets,
        grads: Triplets,
        masks: dict[str, Array],
        step: Int[ArrayLike, ""],
        state: AdaLoRAAllocatorState,
    ) -> tuple[AdaLoRAAllocatorState, dict[str, Array], dict[str, Array], Int[Array, ""]]:
        """The pure step: ``(state, new E, new masks, budget)`` from the factors after the
        optimizer step, their gradients, the masks and the step."""
        cfg, step = self.config, jnp.asarray(step, jnp.int32)
        end = cfg.total_step - cfg.tfinal
        update = step < end
        ipt, unc = {}, {}
        for path, ws in factors.items():
            new = []
            for w, g, i_bar, u in zip(ws, grads[path], state.ipt[path], state.unc[path], strict=True):
                sens = jnp.abs(w * g).astype(jnp.float32)
                i_new = cfg.beta1 * i_bar + (1 - cfg.beta1) * sens
                u_new = cfg.beta2 * u + (1 - cfg.beta2) * jnp.abs(sens - i_new)
                new.append((jnp.where(update, i_new, i_bar), jnp.where(update, u_new, u)))
            ipt[path], unc[path] = (tuple(pair[k] for pair in new) for k in (0, 1))
        scores = {}
        for path in factors:
            s_a, s_e, s_b = (i * u for i, u in zip(ipt[path], unc[path], strict=True))
            scores[path] = s_e + (jnp.mean(s_a, axis=-2) + jnp.mean(s_b, axis=-1))
        flat = jnp.concatenate([s.reshape(-1) for s in scores.values()])
        budget = self.budget(step)
        drop = self.init_budget - budget  # PEFT's kthvalue k: drop the k lowest (and ties)
        kth = jnp.sort(flat)[jnp.clip(drop - 1, 0, flat.size - 1)]
        threshold = jnp.where(drop > 0, kth, -jnp.inf)
        allocate_now = (update & (step > cfg.tinit) & (step % cfg.delta_t == 0)) | (step == end)
        zero_now = allocate_now | (step > end)
        new_masks, new_e = {}, {}
        for path, (_, e, _) in factors.items():
            new_masks[path] = jnp.where(allocate_now, scores[path] > threshold, masks[path])
            new_e[path] = jnp.where(zero_now & ~new_masks[path], jnp.zeros_like(e), e)
        reset = lambda tree: {p: tuple(jnp.where(step == end, 0.0, x) for x in xs) for p, xs in tree.items()}
        return AdaLoRAAllocatorState(reset(ipt), reset(unc)), new_e, new_masks, budget

    def update_and_allocate(
        self, model: nnx.Module, grads: nnx.State, step: Int[ArrayLike, ""], state: AdaLoRAAllocatorState
    ) -> tuple[AdaLoRAAllocatorState, Int[Array, ""]]:
        """:meth:`allocate` on ``model`` (after the optimizer step; E and ``rank_mask`` are
        set in place, so call it inside the same ``nnx.jit`` as the step or eagerly) with
        ``grads`` the ``nnx.State`` the step applied. Returns the new state and the budget."""
        adapters = {path: module_at(model, parts) for path, parts in self.parts.items()}
        factors = {p: tuple(getattr(a, n)[...] for n in FACTORS) for p, a in adapters.items()}
        masks = {p: a.rank_mask[...] for p, a in adapters.items()}
        g = {}
        for path, parts in self.parts.items():
            node = grads
            for part in parts:
                node = node[part]
            g[path] = tuple(_value(node[n]) for n in FACTORS)
        state, new_e, new_masks, budget = self.allocate(factors, g, masks, step, state)
        for path, adapter in adapters.items():
            adapter.lora_e.value = new_e[path]
            adapter.rank_mask.value = new_masks[path]
        return state, budget


def adalora_allocator(model: nnx.Module) -> AdaLoRAAllocator:
    """The allocator of ``model``'s AdaLoRA adapters, which share one schedule (PEFT has one
    per model): ``total_step`` must be set."""
    found = {dotted(parts): m for parts, m in nnx.iter_modules(model) if isinstance(m, AdaLoRA)}
    if not found:
        raise ValueError("adalora_allocator: the model holds no AdaLoRA adapter; apply an AdaLoRAConfig first")
    values = {f: {p: getattr(a.config, f) for p, a in found.items()} for f in SCHEDULE}
    differ = {f: by_path for f, by_path in values.items() if len(set(by_path.values())) > 1}
    if differ:
        raise ValueError(
            f"adalora_allocator: the AdaLoRA adapters disagree on {differ}; one schedule allocates one budget, "
            "so give every AdaLoRA rule the same values"
        )
    cfg = next(iter(found.values())).config
    if cfg.total_step is None:
        raise ValueError("adalora_allocator: AdaLoRAConfig(total_step=None); set total_step, the schedule's length")
    too_few = sorted(p for p, a in found.items() if a.config.r < cfg.target_r)
    if too_few:
        raise ValueError(
            f"adalora_allocator: target_r={cfg.target_r} exceeds r at {too_few}; the budget only shrinks, so "
            "lower target_r or raise r"
        )
    init = sum(a.lora_e.size for a in found.values())
    # one matrix per kernel-batch index (and per layer of a stacked, scanned module)
    target = cfg.target_r * sum(a.lora_e.size // a.config.r for a in found.values())
    budgets = np.array([peft_budget(t, init, target, cfg) for t in range(cfg.total_step - cfg.tfinal + 1)], np.int32)
    return AdaLoRAAllocator(
        config=cfg,
        parts={dotted(parts): parts for parts, m in nnx.iter_modules(model) if isinstance(m, AdaLoRA)},
        shapes={p: tuple(tuple(getattr(a, n).shape) for n in FACTORS) for p, a in found.items()},
        init_budget=init,
        target_budget=target,
        budgets=budgets,
    )
