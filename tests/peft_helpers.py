"""Shared by the PEFT parity tests: one tiny two-layer MLP in torch and in Flax NNX with
the same weights, so a PEFT adapter and ours can be compared on the same numbers."""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

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
