"""Parity with a PEFT tuner on the tiny MLP of peft_helpers: the same trained (random,
non-identity) weights in both, then forward, gradients of every adapter weight, and the
merged kernels, each within a relative error (max |diff| / max |reference|).

``names`` maps our Variable to PEFT's parameter of the same layer; ``to_ours`` turns a
PEFT tensor into our layout (default: a matrix transposed, anything else reshaped), and
is applied to the gradients too (it is linear)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from peft import get_peft_model
from peft_helpers import FlaxMLP, TorchMLP, inputs

from lora_jax import AdapterConfig, AdapterParam, Rule, apply_adapters, merge_adapters

LAYERS = ("up", "down")


def default_to_ours(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return value.T if value.ndim == 2 and value.T.shape == shape else value.reshape(shape)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def build(peft_config, variant, *, pattern: str = "up|down"):
    """``(peft_model, ours)`` on the same base weights."""
    torch_model = TorchMLP()
    ours = apply_adapters(FlaxMLP(torch_model), AdapterConfig(rules=(Rule(pattern=pattern, variant=variant),)))
    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(torch_model), peft_config), ours


def peft_tensor(peft_model, layer: str, name: str) -> torch.Tensor:
    module = peft_model.base_model.model.get_submodule(layer)
    value = getattr(module, name)
    return value["default"] if isinstance(value, torch.nn.ParameterDict | torch.nn.ModuleDict | dict) else value


def present(ours, layer: str, names: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``names`` this layer's adapter has (LoKr's factors vary by shape)."""
    adapter = getattr(ours, layer)
    return {k: v for k, v in names.items() if k in vars(adapter)}


def copy_vera_projection(peft_model, ours) -> None:
    """PEFT draws VeRA's shared projection from torch's PRNG: give ours the same matrices
    (one write: every adapter of ``ours`` holds the same projection module)."""
    theirs = peft_model.base_model
    projection = ours.up.vera_projection
    projection.vera_A.value = jnp.asarray(theirs.vera_A["default"].numpy().T)
    projection.vera_B.value = jnp.asarray(theirs.vera_B["default"].numpy().T)


def randomize(
    peft_model,
    ours,
    names: Mapping[str, str],
    *,
    seed: int = 3,
    size: float = 0.4,
    offset: Mapping[str, float] | None = None,
    to_ours: Callable = default_to_ours,
) -> None:
    """The same random values into both (``offset`` adds a constant, e.g. 1 for a gate)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in LAYERS:
        for ours_name, peft_name in present(ours, layer, names).items():
            tensor = peft_tensor(peft_model, layer, peft_name)
            with torch.no_grad():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * size + (offset or {}).get(ours_name, 0.0))
            var = getattr(getattr(ours, layer), ours_name)
            var.value = jnp.asarray(to_ours(tensor.detach().numpy(), tuple(var.shape)))


def errors(peft_model, ours, names: Mapping[str, str], *, to_ours: Callable = default_to_ours) -> dict[str, float]:
    """Relative errors: ``forward``, ``grad`` (worst adapter weight) and ``merge`` (worst
    kernel / bias). Merges ``peft_model`` in place, so call it last."""
    x = inputs()
    g = np.random.default_rng(1).standard_normal((x.shape[0], 8)).astype(np.float32)
    out = {"forward": rel(ours(jnp.asarray(x)), peft_model(torch.from_numpy(x)).detach().numpy())}
    base = TorchMLP()(torch.from_numpy(x)).detach().numpy()
    assert rel(peft_model(torch.from_numpy(x)).detach().numpy(), base) > 1e-2, "adapter still the identity"

    grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x)) * g), argnums=nnx.DiffState(0, AdapterParam))(ours)
    peft_model.zero_grad()
    (peft_model(torch.from_numpy(x)) * torch.from_numpy(g)).sum().backward()
    worst = 0.0
    for layer in LAYERS:
        for ours_name, peft_name in present(ours, layer, names).items():
            got = np.asarray(getattr(getattr(grads, layer), ours_name)[...])
            want = to_ours(peft_tensor(peft_model, layer, peft_name).grad.numpy(), got.shape)
            assert np.isfinite(got).all() and np.abs(want).max() > 0, (layer, ours_name)
            worst = max(worst, rel(got, want))
    out["grad"] = worst

    merged_torch, merged = peft_model.merge_and_unload(), merge_adapters(ours)
    out["merge"] = max(
        max(
            rel(getattr(merged, layer).kernel[...], merged_torch.get_submodule(layer).weight.detach().numpy().T),
            rel(getattr(merged, layer).bias[...], merged_torch.get_submodule(layer).bias.detach().numpy()),
        )
        for layer in LAYERS
    )
    return out


def assert_parity(peft_model, ours, names: Mapping[str, str], *, tol: float = 1e-5, **kwargs) -> dict[str, float]:
    measured = errors(peft_model, ours, names, **kwargs)
    assert all(v < tol for v in measured.values()), measured
    return measured


def perturbed_copy(model, seed: int = 9, size: float = 0.3):
    """``model`` with every adapter weight moved (for round trips)."""
    state = nnx.state(model, AdapterParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [v + size * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, moved))
    return model


def peft_saved(peft_config, path, *, edit: Mapping | None = None):
    """PEFT's own files for ``peft_config`` on the MLP (``edit`` overrides config entries)."""
    import json

    torch.manual_seed(0)
    get_peft_model(TorchMLP(), peft_config).save_pretrained(str(path))
    if edit:
        config_file = path / "adapter_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **edit}))
    return path


def exported_matches_peft(model, path, *, alpha: float) -> None:
    """``model`` exported at ``alpha`` loads in PEFT and computes what ours does at it."""
    from peft import PeftModel

    from lora_jax import set_alpha
    from lora_jax.peft_format import export_peft

    set_alpha(model, alpha)
    export_peft(path, model, hf_name=lambda p: p)
    theirs = PeftModel.from_pretrained(TorchMLP(), str(path))
    x = inputs()
    assert rel(model(jnp.asarray(x)), theirs(torch.from_numpy(x)).detach().numpy()) < 1e-5


class _Wrap(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


def assert_one_alpha_per_row_is_separate_calls(variant, layout) -> None:
    """``set_alpha`` with one value per input row gives, row by row, what a scalar alpha
    of that value gives (0 the base bit for bit), on a layer of ``layout``."""
    from lora_jax import set_alpha

    layer, x = layout.build()
    y_base = layer(x)
    model = apply_adapters(_Wrap(layer), AdapterConfig(rules=(Rule(pattern="layer", variant=variant),)))
    perturbed_copy(model, size=0.2)
    alphas = (0.0, 1.0, -0.7)
    singles = []
    for a in alphas:
        set_alpha(model, a)
        singles.append(model(x))
    set_alpha(model, jnp.asarray(alphas))
    lay = model.layer.spec.layout(x.ndim)
    row_axis = lay.out.index(lay.lhs[0])
    swept = jnp.moveaxis(model(x), row_axis, 0)
    assert jnp.array_equal(swept[0], jnp.moveaxis(y_base, row_axis, 0)[0])
    for i in (1, 2):
        assert rel(swept[i], jnp.moveaxis(singles[i], row_axis, 0)[i]) < 1e-5
    assert rel(singles[1], y_base) > 1e-3


class TorchBlockDiag:
    """Stands in for PEFT's BOFT CUDA extension ``fbd_cuda`` (without it PEFT keeps one
    butterfly factor): it only assembles the block-diagonal matrices of an ``(N, n, b, b)``
    stack, which ``torch.block_diag`` does on the CPU. Patch it in with
    ``peft.tuners.boft.layer.get_fbd_cuda = lambda: TorchBlockDiag``."""

    @staticmethod
    def forward(stack: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*blocks) for blocks in stack])]

    @staticmethod
    def backward(grad: torch.Tensor, stack: torch.Tensor) -> list[torch.Tensor]:
        b = stack.shape[-1]
        cut = [[g[j * b : (j + 1) * b, j * b : (j + 1) * b] for j in range(stack.shape[1])] for g in grad]
        return [torch.stack([torch.stack(blocks) for blocks in cut])]
