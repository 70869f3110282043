"""Shared by the PEFT parity tests: one tiny two-layer MLP in torch and in Flax NNX with
the same weights, and one nnx.Linear under PEFT and under ours, so a PEFT adapter and
ours can be compared on the same numbers."""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from helpers import Wrap, adapt, rel_err
from layers import LAYOUTS

import lora_jax as lj
from lora_jax.peft_format import import_peft

D_IN, D_HID = 8, 12


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(D_IN, D_HID)
        self.down = torch.nn.Linear(D_HID, D_IN)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class FlaxMLP(nnx.Module):
    def __init__(self, torch_model: TorchMLP):
        rngs = nnx.Rngs(0)
        self.up = nnx.Linear(D_IN, D_HID, rngs=rngs)
        self.down = nnx.Linear(D_HID, D_IN, rngs=rngs)
        for name in ("up", "down"):
            src, dst = getattr(torch_model, name), getattr(self, name)
            dst.kernel.value = jnp.asarray(src.weight.detach().numpy().T)
            dst.bias.value = jnp.asarray(src.bias.detach().numpy())

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def inputs(seed: int = 0, rows: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, D_IN)).astype(np.float32)


def torch_out(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def assert_rel_close(actual, expected, tol: float = 1e-5) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def assert_forward_matches(peft_model, ours) -> np.ndarray:
    """Same output as PEFT on fresh inputs, and visibly not the base model's; returns x."""
    x = inputs()
    expected = torch_out(peft_model, x)
    assert np.abs(expected - torch_out(TorchMLP(), x)).max() > 1e-2, "adapter weights are still the identity"
    assert_rel_close(ours(jnp.asarray(x)), expected)
    return x


def assert_merged_matches(merged_torch, merged) -> None:
    """Kernels and biases of both layers equal PEFT's ``merge_and_unload`` result."""
    for name in ("up", "down"):
        src, dst = merged_torch.get_submodule(name), getattr(merged, name)
        assert_rel_close(dst.kernel[...], src.weight.detach().numpy().T)
        assert_rel_close(dst.bias[...], src.bias.detach().numpy())


# -- one nnx.Linear(16, 12) with bias (tests/layers.py's "linear") under PEFT and under ours ---------
class TorchNet(torch.nn.Module):
    def __init__(self, layer: nnx.Linear):
        super().__init__()
        self.proj = torch.nn.Linear(16, 12)
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(np.asarray(layer.kernel[...]).T.copy()))
            self.proj.bias.copy_(torch.from_numpy(np.asarray(layer.bias[...]).copy()))

    def forward(self, x):
        return self.proj(x)


def t2j(t):
    return jnp.asarray(t.detach().numpy())


def j2t(a):
    return torch.from_numpy(np.array(a))


def base_linear():
    """The nnx.Linear(16, 12) of the PEFT pairs below, and an input for it."""
    return LAYOUTS[0].build(seed=3)


def peft_model_pair(peft_config, variant):
    """The same nnx.Linear under our adapter (at the path ``layer``) and in a PeftModel
    (at ``proj``); returns (ours, the PeftModel, x)."""
    import peft

    layer, x = base_linear()
    torch.manual_seed(0)
    return adapt(layer, variant), peft.get_peft_model(TorchNet(layer), peft_config), x


def peft_pair(peft_config, variant):
    """As :func:`peft_model_pair`, with PEFT's adapted layer in place of the PeftModel."""
    ours, peft_model, x = peft_model_pair(peft_config, variant)
    return ours, peft_model.base_model.model.proj, x


def import_into_base(path):
    """``import_peft`` of a PeftModel saved from :func:`peft_model_pair`, onto a fresh base."""
    return import_peft(path, Wrap(base_linear()[0]), hf_name=lambda p: "proj" if p == "layer" else None)


def randomize(theirs, names, seed=5):
    """Non-identity weights in PEFT's layer: ``names`` maps our Variable to PEFT's tensor."""
    gen = torch.Generator().manual_seed(seed)
    for ours_name, get in names.items():
        tensor = get(theirs)
        with torch.no_grad():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3 + (1.0 if "magnitude" in ours_name else 0.0))


def set_random(ours, theirs, names, seed=5):
    """The same non-identity weights in both, copied by hand (for variants PEFT files cannot carry)."""
    randomize(theirs, names, seed)
    for ours_name, get in names.items():
        value = t2j(get(theirs))
        var = getattr(ours, ours_name)
        var.value = value.T if value.ndim == 2 else value.reshape(var.shape)


def check_forward_and_merge(model, theirs, x):
    """Our output equals PEFT's; our merged kernel equals PEFT's merged weight."""
    y_theirs = theirs(j2t(x))
    assert rel_err(model(x), t2j(y_theirs)) < 1e-5
    merged = lj.merge_adapters(model).layer.kernel[...]
    theirs.merge()
    assert rel_err(merged, t2j(theirs.base_layer.weight).T) < 1e-5
    return y_theirs


def check_grads(model, theirs, names, x, g):
    """The gradients of <output, g> for each Variable in ``names`` equal PEFT's."""
    def loss(m):
        return jnp.sum(m(x) * g)

    ours = nnx.grad(loss, argnums=nnx.DiffState(0, lj.AdapterParam))(model)
    theirs.zero_grad()
    (theirs(j2t(x)) * j2t(g)).sum().backward()
    for name, get in names.items():
        want = t2j(get(theirs).grad)
        got = getattr(ours.layer, name)[...]
        assert np.all(np.isfinite(got)), name
        assert rel_err(got, want.T if want.ndim == 2 else want.reshape(got.shape)) < 1e-5, name


LORA_WEIGHTS = {"lora_a": lambda m: m.lora_A["default"].weight, "lora_b": lambda m: m.lora_B["default"].weight}


def check_residual_init_matches_peft(init: str, variant) -> None:
    """PiSSA / OLoRA (PEFT's ``init_lora_weights=init``): the same principal part and residual
    kernel at init, the same output; then, with the same trained factors, forward and merge."""
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=init)
    model, theirs, x = peft_pair(config, variant)
    adapter, s = model.layer, variant.scale
    w = model.layer.base.kernel[...]
    # Init: the same principal part (sign-free: compare products) and the same residual.
    their_top = s * (theirs.lora_B["default"].weight @ theirs.lora_A["default"].weight)
    assert rel_err(s * adapter.base_a[...] @ adapter.base_b[...], t2j(their_top).T) < 1e-5
    assert rel_err(w - s * adapter.base_a[...] @ adapter.base_b[...], t2j(theirs.base_layer.weight).T) < 1e-5
    assert rel_err(model(x), t2j(theirs(j2t(x)))) < 1e-5
    set_random(adapter, theirs, LORA_WEIGHTS)
    check_forward_and_merge(model, theirs, x)
