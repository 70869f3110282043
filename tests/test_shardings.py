"""The sharding rules of lora_jax.shardings as pure functions of mesh-axis names (the
arrays themselves are exercised on 8 simulated devices by tests/explicit_mesh_checks.py)."""

import jax.numpy as jnp
import numpy as np

from lora_jax import shardings

MESH = {"data": 4, "tp": 2, "fsdp": 8}


def test_merged_names_keep_mesh_axes_only_for_contiguous_blocks():
    # heads over tp, then an unsharded head_dim: each device holds whole heads, one block
    assert shardings.merged_names(("tp", None), (4, 4), MESH) == (True, "tp")
    # a fully split leading axis may be followed by another sharded one
    assert shardings.merged_names(("tp", "data"), (2, 8), MESH) == (True, ("tp", "data"))
    # an inner sharded axis after an unsharded one strides across the flat axis
    assert shardings.merged_names((None, "tp"), (4, 4), MESH) == (False, None)
    # two sharded axes where the first is split into blocks longer than one
    assert shardings.merged_names(("tp", "data"), (4, 8), MESH) == (False, None)
    assert shardings.merged_names((None, None), (4, 4), MESH) == (True, None)


def test_split_names_put_mesh_axes_on_the_leading_axes():
    assert shardings.split_names("tp", (4, 4), MESH) == ("tp", None)
    assert shardings.split_names(("tp", "data"), (2, 8), MESH) == ("tp", "data")
    assert shardings.split_names(("fsdp", "tp"), (16, 4), MESH) == (("fsdp", "tp"), None)
    assert shardings.split_names(None, (4, 4), MESH) == (None, None)
    # broadcasting a vector: the length-one axes take no mesh axis, even a one-device one
    assert shardings.split_names("one", (1, 1, 4, 4), {"one": 1}) == (None, None, "one", None)
    # 8 shards cannot be blocks of a leading axis of 4: no layout without a gather
    assert shardings.split_names("fsdp", (4, 4), MESH) is None


def test_einsum_out_names_first_operand_wins_and_no_mesh_axis_twice():
    # adapter output product: tokens keep the input's batch axis, heads the factor's
    assert shardings.einsum_out_names("BTr,rNH->BTNH", ("data", None, None), (None, "tp", None)) == (
        "data",
        None,
        "tp",
        None,
    )
    # FSDP: batch and the factor's d_out on the same mesh axis; the activation keeps it
    assert shardings.einsum_out_names("BTr,rD->BTD", ("fsdp", None, None), (None, "fsdp")) == ("fsdp", None, None)
    # a sharded contraction leaves no mesh axis on the output (XLA sums across devices)
    assert shardings.einsum_out_names("BTNH,NHr->BTr", ("data", None, "tp", None), ("tp", None, None)) == (
        "data",
        None,
        None,
    )
    assert shardings.einsum_out_names("BTD,Dr->BTr", None, (None, None)) == (None, None, None)
    # '...' stands for the leading axes of each operand
    assert shardings.einsum_out_names("...dr,...ds->...rs", ("tp", "fsdp", None), ("tp", "fsdp", None)) == (
        "tp",
        None,
        None,
    )


def test_plain_arrays_pass_through_unchanged():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    assert shardings.explicit_names(x) is None
    np.testing.assert_array_equal(shardings.reshape(x, (6, -1)), np.arange(24.0).reshape(6, 4))
    np.testing.assert_array_equal(shardings.whole_matrices(x), x)
    y = jnp.ones((4, 5))
    np.testing.assert_allclose(shardings.einsum("abc,cd->abd", x, y), np.einsum("abc,cd->abd", x, y))

