"""LoRA on nnx.Conv (1-D / 2-D / 3-D) and nnx.Embed equals PEFT's Conv / Embedding LoRA
(PyTorch, CPU, fp32) on the same weights, forward and merged; merge is exact for every
padding mode; alpha steers; bad input is refused by name."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from helpers import Wrap
from peft import LoraConfig, get_peft_model
from peft_helpers import assert_rel_close

import lora_jax as lj
from lora_jax.layer_kinds import conv_with_kernel

R, C_IN, C_OUT = 3, 4, 5


def _lora(pattern="layer", **kw):
    return lj.AdapterConfig(rules=(lj.Rule(pattern=pattern, variant=lj.LoRAConfig(**kw)),))


def _nudge(model, scale=0.3, seed=1):
    """Move every adapter weight off its init, so the delta is not zero."""
    state = nnx.state(model, lj.AdapterParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [v + scale * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, moved))


# -- PEFT parity ---------------------------------------------------------------------------
CONVS = {
    1: (torch.nn.Conv1d, (3,), (9,)),
    2: (torch.nn.Conv2d, (3, 2), (7, 6)),
    3: (torch.nn.Conv3d, (2, 3, 2), (5, 4, 5)),
}


class TorchConvNet(torch.nn.Module):
    def __init__(self, ndim: int, stride: int):
        super().__init__()
        conv, kernel, _ = CONVS[ndim]
        self.conv = conv(C_IN, C_OUT, kernel, stride=stride, padding=1)

    def forward(self, x):
        return self.conv(x)


def _flax_conv(torch_conv: torch.nn.Module, ndim: int, stride: int) -> nnx.Conv:
    _, kernel, _ = CONVS[ndim]
    conv = nnx.Conv(C_IN, C_OUT, kernel, strides=stride, padding=1, rngs=nnx.Rngs(0))
    weight = torch_conv.weight.detach().numpy()  # (out, in, *window)
    conv.kernel.value = jnp.asarray(np.moveaxis(weight, (0, 1), (-1, -2)))
    conv.bias.value = jnp.asarray(torch_conv.bias.detach().numpy())
    return conv


def _channels_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


@pytest.mark.parametrize(("ndim", "stride", "rslora"), [(1, 1, False), (2, 2, True), (3, 2, False)])
def test_conv_lora_matches_peft(ndim, stride, rslora):
    torch.manual_seed(ndim)
    base = TorchConvNet(ndim, stride)
    ours = lj.apply_adapters(Wrap(_flax_conv(base.conv, ndim, stride)), _lora(r=R, lora_alpha=7, rslora=rslora))
    peft_model = get_peft_model(
        base, LoraConfig(r=R, lora_alpha=7, use_rslora=rslora, target_modules=["conv"], init_lora_weights=False)
    ).eval()
    layer = peft_model.base_model.model.conv
    a = layer.lora_A["default"].weight.detach().numpy()  # (r, in, *window)
    b = layer.lora_B["default"].weight.detach().numpy()  # (out, r, 1, ...)
    assert np.abs(b).max() > 0  # a non-identity adapter
    ours.layer.lora_a.value = jnp.asarray(np.moveaxis(a, (0, 1), (-1, -2)).reshape(-1, R))
    ours.layer.lora_b.value = jnp.asarray(b.reshape(C_OUT, R).T)

    x = np.random.default_rng(ndim).standard_normal((2, C_IN, *CONVS[ndim][2])).astype(np.float32)
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(x)).numpy()
        base_out = peft_model.get_base_model().conv.base_layer(torch.from_numpy(x)).numpy()
    assert np.abs(expected - base_out).max() > 1e-2
    got = ours(jnp.asarray(_channels_last(x)))
    assert_rel_close(got, _channels_last(expected))

    merged_torch = peft_model.merge_and_unload()
    merged = lj.merge_adapters(ours)
    assert type(merged.layer) is nnx.Conv
    assert_rel_close(merged.layer.kernel[...], np.moveaxis(merged_torch.conv.weight.detach().numpy(), (0, 1), (-1, -2)))
    assert_rel_close(merged(jnp.asarray(_channels_last(x))), _channels_last(expected))


class TorchEmbedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)

    def forward(self, ids):
        return self.embed(ids)


@pytest.mark.parametrize("rslora", [False, True])
def test_embed_lora_matches_peft(rslora):
    torch.manual_seed(0)
    base = TorchEmbedNet()
    embed = nnx.Embed(11, 6, rngs=nnx.Rngs(0))
    embed.embedding.value = jnp.asarray(base.embed.weight.detach().numpy())
    ours = lj.apply_adapters(Wrap(embed), _lora(r=R, lora_alpha=5, rslora=rslora))
    peft_model = get_peft_model(
        base, LoraConfig(r=R, lora_alpha=5, use_rslora=rslora, target_modules=["embed"], init_lora_weights=False)
    ).eval()
    layer = peft_model.base_model.model.embed
    a = layer.lora_embedding_A["default"].detach().numpy()  # (r, vocab)
    b = layer.lora_embedding_B["default"].detach().numpy()  # (features, r)
    ours.layer.lora_a.value, ours.layer.lora_b.value = jnp.asarray(a.T), jnp.asarray(b.T)

    ids = np.random.default_rng(0).integers(0, 11, (3, 7))
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(ids)).numpy()
    assert np.abs(expected - base.embed.weight.detach().numpy()[ids]).max() > 1e-2
    assert_rel_close(ours(jnp.asarray(ids)), expected)

    merged_torch = peft_model.merge_and_unload()
    merged = lj.merge_adapters(ours)
    assert type(merged.layer) is nnx.Embed
    assert_rel_close(merged.layer.embedding[...], merged_torch.embed.weight.detach().numpy())


def test_init_as_peft():
    """Conv: A ~ U(+-1/sqrt(window * c_in)) (kaiming-uniform over the conv's fan-in), B = 0.
    Embed: A = 0, B ~ N(0, 1). Both: the adapted layer is the base layer at init."""
    rngs = nnx.Rngs(0)
    conv = Wrap(nnx.Conv(16, 32, (3, 3), rngs=rngs))
    adapted = lj.apply_adapters(conv, _lora(r=8))
    a, b = np.asarray(adapted.layer.lora_a[...]), np.asarray(adapted.layer.lora_b[...])
    bound = 1 / np.sqrt(3 * 3 * 16)
    assert a.shape == (144, 8) and np.abs(a).max() <= bound and a.std() > 0.5 * bound
    assert b.shape == (8, 32) and not b.any()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 16))
    np.testing.assert_array_equal(adapted(x), conv(x))

    embed = Wrap(nnx.Embed(500, 40, rngs=rngs))
    adapted = lj.apply_adapters(embed, _lora(r=8))
    a, b = np.asarray(adapted.layer.lora_a[...]), np.asarray(adapted.layer.lora_b[...])
    assert a.shape == (500, 8) and not a.any()
    assert b.shape == (8, 40) and abs(b.std() - 1) < 0.15 and abs(b.mean()) < 0.15
    ids = jnp.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(adapted(ids), embed(ids))


# -- merge is exact for every way nnx.Conv can be called -----------------------------------
CONV_CASES = {
    "same": (dict(kernel_size=(3, 3)), (2, 7, 6)),
    "valid_stride": (dict(kernel_size=(3, 2), strides=2, padding="VALID"), (2, 9, 8)),
    "int_pad_dilated": (dict(kernel_size=(3, 3), padding=2, kernel_dilation=2), (2, 8, 8)),
    "explicit_pairs": (dict(kernel_size=(2, 3), padding=((1, 0), (2, 1))), (2, 6, 7)),
    "input_dilation": (dict(kernel_size=(2, 2), input_dilation=2, padding=1), (2, 5, 5)),
    "circular": (dict(kernel_size=(3, 3), padding="CIRCULAR"), (2, 6, 6)),
    "reflect": (dict(kernel_size=(3, 3), padding="REFLECT"), (2, 6, 6)),
    "causal_1d": (dict(kernel_size=(3,), padding="CAUSAL"), (2, 9)),
    "two_batch_axes": (dict(kernel_size=(3,)), (2, 3, 8)),
    "unbatched": (dict(kernel_size=(3, 3)), (6, 6)),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_merge_equals_forward(case):
    options, spatial = CONV_CASES[case]
    conv = nnx.Conv(C_IN, C_OUT, rngs=nnx.Rngs(1), **options)
    x = jax.random.normal(jax.random.key(2), (*spatial, C_IN))
    # the stand-in convolution is the base's own: with the base kernel it is the base minus its bias
    without_bias = conv_with_kernel(conv, x, conv.kernel[...])
    np.testing.assert_allclose(without_bias + conv.bias[...].reshape((1,) * (x.ndim - 1) + (-1,)), conv(x), atol=1e-6)
    adapted = lj.apply_adapters(Wrap(conv), _lora(r=2))
    _nudge(adapted)
    y = adapted(x)
    assert np.abs(y - conv(x)).max() > 1e-2
    assert_rel_close(lj.merge_adapters(adapted)(x), y)


def test_embed_alpha_attend_and_merge():
    """alpha = 0 is the base, -1 negates the delta, one alpha per row sweeps in one call;
    ``attend`` (a tied output head) uses the adapted table, so the merged model agrees."""
    embed = nnx.Embed(13, 6, rngs=nnx.Rngs(0))
    adapted = lj.apply_adapters(Wrap(embed), _lora(r=2, lora_alpha=4))
    _nudge(adapted)
    ids = jnp.asarray([[1, 5, 12], [0, 3, 3]])
    q = jax.random.normal(jax.random.key(3), (2, 3, 6))
    delta = adapted(ids) - embed(ids)
    delta_attend = adapted.layer.attend(q) - embed.attend(q)
    assert np.abs(delta).max() > 1e-2 and np.abs(delta_attend).max() > 1e-2
    merged = lj.merge_adapters(adapted)
    assert_rel_close(merged.layer.attend(q), adapted.layer.attend(q))
    assert_rel_close(merged(ids), adapted(ids))

    lj.set_alpha(adapted, jnp.asarray([0.0, -1.0]))
    rows = adapted(ids)
    np.testing.assert_array_equal(rows[0], embed(ids)[0])
    assert_rel_close(rows[1] - embed(ids)[1], -delta[1])
    rows_attend = adapted.layer.attend(q) - embed.attend(q)
    assert_rel_close(rows_attend[1], -delta_attend[1])
    np.testing.assert_array_equal(rows_attend[0], 0)


def test_conv_alpha_per_row_and_training_under_jit():
    conv = nnx.Conv(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, C_IN))
    target = nnx.Conv(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(9))(x)
    model = lj.apply_adapters(Wrap(conv), _lora(r=4, lora_alpha=8))
    kernel_before = np.asarray(model.layer.base.kernel[...])
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=lj.AdapterParam)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return jnp.mean((m(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.AdapterParam))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]
    np.testing.assert_array_equal(model.layer.base.kernel[...], kernel_before)

    y = model(x)
    lj.set_alpha(model, jnp.asarray([1.0, 0.0, -1.0, 0.5]))
    rows = model(x)
    assert_rel_close(rows[0], y[0])
    np.testing.assert_array_equal(rows[1], conv(x)[1])
    assert_rel_close(rows[2] - conv(x)[2], -(y[2] - conv(x)[2]))


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layer", "variant", "match"),
    [
        (lambda r: nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=r), lj.LoRAConfig(r=2), "feature_group_count=2"),
        (lambda r: nnx.Conv(4, 4, (3,), mask=jnp.ones((3, 4, 4)), rngs=r), lj.LoRAConfig(r=2), "mask"),
        (lambda r: nnx.Conv(4, 4, (3,), rngs=r), lj.DoRAConfig(r=2), r"a Conv \(conv layer\), to dora.*\['lora'\]"),
        (lambda r: nnx.Embed(9, 4, rngs=r), lj.PiSSAConfig(r=2), r"to pissa, which adapts only \['einsum'\]"),
        (lambda r: nnx.Embed(9, 4, rngs=r), lj.EVAConfig(r=2), "to eva"),
        (lambda r: nnx.Embed(9, 4, rngs=r), lj.LoRAConfig(r=2, dropout=0.1), "dropout=0.1 at 'layer', an embedding"),
    ],
)
def test_refusals_name_the_layer(layer, variant, match):
    model = Wrap(layer(nnx.Rngs(0)))
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(ValueError, match=match):
        lj.apply_adapters(model, lj.AdapterConfig(rules=(lj.Rule(pattern="layer", variant=variant),)))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)


# -- PEFT files ---------------------------------------------------------------------------------
class TorchConvEmbed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, C_IN)
        self.conv = torch.nn.Conv1d(C_IN, C_OUT, 3, padding=1)

    def forward(self, ids):
        return self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2)


class ConvEmbed(nnx.Module):
    def __init__(self, torch_model: TorchConvEmbed):
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(11, C_IN, rngs=rngs)
        self.embed.embedding.value = jnp.asarray(torch_model.embed.weight.detach().numpy())
        self.conv = _flax_conv(torch_model.conv, 1, 1)

    def __call__(self, ids):
        return self.conv(self.embed(ids))


def test_conv_and_embed_peft_files_both_ways(tmp_path):
    from peft import PeftModel

    from lora_jax.peft import export_peft, import_peft

    torch.manual_seed(0)
    torch_base = TorchConvEmbed()
    ids = np.random.default_rng(0).integers(0, 11, (2, 7))
    ours = lj.apply_adapters(ConvEmbed(torch_base), _lora(pattern="conv|embed", r=R, lora_alpha=6))
    _nudge(ours)
    lj.set_alpha(ours, 0.5)  # PEFT has no alpha: exported into B
    export_peft(tmp_path / "out", ours, hf_name=lambda path: path)
    loaded = PeftModel.from_pretrained(torch_base, tmp_path / "out").eval()
    with torch.no_grad():
        expected = loaded(torch.from_numpy(ids)).numpy()
    assert np.abs(expected - np.asarray(ConvEmbed(torch_base)(jnp.asarray(ids)))).max() > 1e-2
    assert_rel_close(ours(jnp.asarray(ids)), expected)

    loaded.save_pretrained(tmp_path / "back")
    config_file = tmp_path / "back" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "lora_dropout": 0.1}))  # PEFT applies it to the conv only
    back = import_peft(tmp_path / "back", ConvEmbed(torch_base), hf_name=lambda path: path)
    adapters = {type(a).__name__: a for _, a in lj.iter_adapters(back)}
    assert adapters["ConvLoRA"].config.dropout == 0.1 and adapters["EmbedLoRA"].config.dropout == 0.0
    back.eval()
    assert_rel_close(back(jnp.asarray(ids)), expected)


def test_registered_view_cannot_claim_the_conv_kind(register_view):
    class FakeConv(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((3, 4, 5)))

    register_view(FakeConv, lambda m: lj.ViewInfo("...ai,aio->...o", kernel="w", kind="conv"))
    with pytest.raises(ValueError, match="'layer' is a FakeConv whose view says kind 'conv'"):
        lj.apply_adapters(Wrap(FakeConv()), _lora(r=2))
