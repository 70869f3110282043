"""EVA calibration: lora_jax (scatter + eigh, JAX CPU) against PEFT (incremental PCA, torch CPU).

Same toy residual MLP language model in both frameworks, same padded batches. Prints the
wall time of each (lora_jax twice: with and without compilation), the rank each layer
gets and the smallest |cos| between matching A rows.

    PYTHONPATH=$PWD python benchmarks/eva_vs_peft.py --d 256 --blocks 4 --batches 40
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import get_eva_state_dict

import lora_jax as lj

NAMES = ("q", "up", "down")


class TorchBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.up, self.down = torch.nn.Linear(d, d), torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + torch.tanh(self.q(x))
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class TorchLM(torch.nn.Module):
    def __init__(self, vocab, d, blocks):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(TorchBlock(d) for _ in range(blocks))

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return x


def _linear(t: torch.nn.Linear) -> nnx.Linear:
    layer = nnx.Linear(t.in_features, t.out_features, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(t.weight.detach().numpy().T)
    layer.bias[...] = jnp.asarray(t.bias.detach().numpy())
    return layer


class Block(nnx.Module):
    def __init__(self, t: TorchBlock):
        self.q, self.up, self.down = (_linear(getattr(t, n)) for n in NAMES)

    def __call__(self, x):
        x = x + jnp.tanh(self.q(x))
        return x + self.down(jax.nn.gelu(self.up(x), approximate=False))


class LM(nnx.Module):
    def __init__(self, t: TorchLM):
        self.embed = nnx.Embed(*t.embed.weight.shape, rngs=nnx.Rngs(0))
        self.embed.embedding[...] = jnp.asarray(t.embed.weight.detach().numpy())
        self.blocks = nnx.List([Block(b) for b in t.blocks])

    def __call__(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch_model = TorchLM(args.vocab, args.d, args.blocks)
    with torch.no_grad():  # an anisotropic embedding, like trained ones
        torch_model.embed.weight.mul_(2 * 0.97 ** torch.arange(args.d))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(args.batches):
        lengths = rng.integers(args.seq // 4, args.seq + 1, args.batch)
        mask = (np.arange(args.seq)[None] < lengths[:, None]).astype(np.int64)
        batches.append({"input_ids": rng.integers(0, args.vocab, (args.batch, args.seq)), "attention_mask": mask})

    peft_cfg = LoraConfig(r=args.r, target_modules=list(NAMES), init_lora_weights="eva", eva_config=EvaConfig())
    torch_batches = [{k: torch.tensor(v) for k, v in b.items()} for b in batches]
    start = time.perf_counter()
    reference = get_eva_state_dict(torch_model, torch_batches, peft_config=peft_cfg, show_progress_bar=False)
    peft_s = time.perf_counter() - start

    model = LM(torch_model)
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern=r"\.(q|up|down)$", variant=lj.EVAConfig(r=args.r)),))
    times = []

    def forward(m, b):  # one function object: the second call reuses the compiled step
        return m(jnp.asarray(b["input_ids"]))

    for _ in range(2):
        start = time.perf_counter()
        plan = lj.eva_plan(model, cfg, batches, forward=forward, mask=lambda b: b["attention_mask"])
        times.append(time.perf_counter() - start)
    # The noise floor: the same estimator on two disjoint halves of the data.
    halves = [
        lj.eva_plan(model, cfg, batches[i::2], forward=forward, mask=lambda b: b["attention_mask"]) for i in (0, 1)
    ]
    print(f"PEFT get_eva_state_dict: {peft_s:.1f} s (cycles the data until converged)")
    print(f"lora_jax eva_plan: {times[0]:.1f} s first call, {times[1]:.1f} s second; {plan.n_batches} batches")
    # min |cos| over the components both got; gap: relative distance of the worst one's
    # eigenvalue to its nearest neighbour (small gaps are ill-conditioned for any estimator);
    # halves: min |cos| between lora_jax runs on the even and the odd batches.
    print(f"{'layer':16} {'peft r':>6} {'ours r':>6} {'min |cos|':>9} {'gap':>6} {'halves':>6}")
    for path in reference:
        ours = np.asarray(plan.components.get(path, np.zeros((args.d, 0))))
        ref = reference[path].numpy().T
        k = min(ours.shape[1], ref.shape[1])
        cos = _min_abs_cos(ours, ref)
        ratio, worst = plan.ratios[path], int(cos.argmin())
        gap = min(abs(ratio[worst] - ratio[j]) for j in (worst - 1, worst + 1) if 0 <= j < len(ratio)) / ratio[worst]
        split = _min_abs_cos(*(np.asarray(h.components[path])[:, :k] for h in halves)).min()
        print(f"{path:16} {ref.shape[1]:6d} {ours.shape[1]:6d} {cos.min():9.4f} {gap:6.3f} {split:6.3f}")


def _min_abs_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    k = min(a.shape[1], b.shape[1])
    a, b = a[:, :k], b[:, :k]
    return np.abs(np.sum(a * b, 0)) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))


if __name__ == "__main__":
    main()
