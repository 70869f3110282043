"""The adapter contract: Variable types, the Adapter module and the variant config.

The Variable *type* is the switch that training, checkpoints and transforms filter on:

- :class:`AdapterParam` (a ``nnx.LoRAParam``, so a ``nnx.Param``): trainable adapter
  weights. ``nnx.Optimizer(model, tx, wrt=AdapterParam)`` trains only these.
- :class:`AdapterState`: frozen adapter state (SVD bases, norms, selected indices).
  Not a ``Param``: never differentiated, but saved with the adapter.
- :class:`Alpha`: the steering scalar of one adapter (or one value per input row).

An :class:`Adapter` wraps the original module unchanged (``adapter.base``) and adds its
contribution. Variants implement :meth:`Adapter.forward` and :meth:`Adapter.merged`;
the shared machinery (surgery, merge, transforms) never looks inside a variant.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Float

from lora_jax import projections, shardings
from lora_jax.einsum_spec import EinsumSpec
from lora_jax.views import ViewInfo

if TYPE_CHECKING:
    from lora_jax.peft_codec import PeftCodec

__all__ = [
    "ADAPTER_VARIABLES",
    "layer_kernel",
    "Adapter",
    "AdapterParam",
    "AdapterState",
    "Alpha",
    "VariantConfig",
    "Target",
    "as_alpha",
]


class AdapterParam(nnx.LoRAParam):
    """A trainable adapter weight. Subclass it to give a group its own learning rate."""


class AdapterState(nnx.Variable):
    """Frozen adapter state: part of the adapter, saved with it, never trained."""


class Alpha(nnx.Variable):
    """Steering coefficient: 0 is the base layer, 1 the trained adapter, -1 its inverse.

    A scalar, or one value per input row (shape ``(batch,)``) for a sweep in one pass.
    """


def as_alpha(value: ArrayLike, *, what: str = "alpha") -> Float[Array, "*rows"]:
    """``value`` as an alpha (float32): a scalar or one value per input row, finite.

    The finiteness check needs a concrete value: under ``jax.jit`` / ``jax.vmap`` the value
    is a tracer and passes unchecked (a NaN alpha then gives NaN outputs). A float64 value
    beyond float32's range becomes inf here and is refused too. ``what`` names the
    argument in the messages.
    """
    with np.errstate(over="ignore"):  # an out-of-range float64 becomes inf, refused below
        alpha = jnp.asarray(value, jnp.float32)
    if alpha.ndim > 1:
        raise ValueError(f"{what} must be a scalar or one value per row, got shape {alpha.shape}")
    if not isinstance(alpha, jax.core.Tracer):
        host = np.asarray(alpha)
        if not np.isfinite(host).all():
            raise ValueError(
                f"{what} must be finite, got {host.tolist()} (as float32); NaN or inf would make every "
                "adapted output NaN or inf. Pass finite values (alpha=0 is the base model)"
            )
    return alpha


# Everything that belongs to an adapter and nothing of the base: the filter that
# checkpoints and state transforms use (AdapterParam subclasses match too).
ADAPTER_VARIABLES = (AdapterParam, AdapterState, Alpha)


def layer_kernel(module: nnx.Module, info: ViewInfo, *, variant: str, path: str, use: str = "at init") -> Array:
    """The layer's kernel as a dense float array: the one place lora_jax reads a layer's
    weights (inits that decompose them, DoRA's norms, merges, dimension selection).

    A kernel that is not a plain float array (an int8 / packed quantized weight behind a
    registered view, or a custom container) is refused rather than used as if its raw
    storage were the weight. ``variant`` and ``path`` name the caller in the message,
    ``use`` says when it reads the weights.
    """
    var = getattr(module, info.kernel)
    try:
        kernel = var[...]
    except TypeError:  # not indexable with [...]: name the object itself in the message
        kernel = var
    if not isinstance(kernel, jax.Array | np.ndarray) or not jnp.issubdtype(kernel.dtype, jnp.floating):
        what = f"an array of dtype {kernel.dtype}" if hasattr(kernel, "dtype") else f"a {type(kernel).__name__}"
        where = f" of {path!r}" if path else ""
        instead = ", or use lora, which never reads the kernel at init" if use == "at init" else ""
        raise ValueError(
            f"{variant}: the kernel {info.kernel!r}{where} is {what}, not a dense float array, and {variant} "
            f"reads the dense weights {use}; dequantize the layer first (or register a view whose kernel "
            f"attribute is the float weight){instead}"
        )
    return kernel


@dataclasses.dataclass(frozen=True)
class Target:
    """Everything a variant needs to build an adapter for one layer."""

    path: str
    module: nnx.Module
    info: ViewInfo
    spec: EinsumSpec
    # What the variant's prepare made for every target of its config in this apply (VeRA's
    # shared projection); None for variants whose adapters share nothing.
    shared: Any = dataclasses.field(default=None, kw_only=True, compare=False, repr=False)

    @property
    def bias(self) -> Array | None:
        return None if self.info.bias is None else getattr(self.module, self.info.bias)[...]

    def kernel_matrix(self, variant: str, dtype: Any) -> Float[Array, "*batch d_in d_out"]:
        """The kernel as float matrices (:func:`layer_kernel`), whole on every device, in at
        least float32 (an init's decompositions); ``variant`` names the reader in errors."""
        kernel = layer_kernel(self.module, self.info, variant=variant, path=self.path)
        matrix = shardings.whole_matrices(self.spec.kernel_to_matrix(kernel))
        return matrix.astype(jnp.promote_types(dtype, jnp.float32))

    def key(self, seed: int) -> jax.Array:
        """A key that depends only on the seed and the layer's path, so re-applying a
        config to a fresh base model gives the same initial adapter."""
        return jax.random.fold_in(jax.random.key(seed), zlib.crc32(self.path.encode()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariantConfig(abc.ABC):
    """Hyperparameters of one variant: frozen, keyword-only, JSON-serializable.

    ``name`` is the variant's name in configs and checkpoints. ``dtype`` is the dtype of
    the adapter's weights and math; the base layer keeps its own. ``custom_vjp``: the
    adapter's factor products use lora_jax's hand-written backward pass (faster; reverse
    mode only), or with ``False`` JAX's own, which also supports ``jax.jvp`` /
    ``jax.hessian`` (:mod:`lora_jax.projections`; IA3, IA3-FF and ROAD have no factor
    products, so it changes nothing there).
    """

    name: ClassVar[str]
    # The layer kinds (views.ViewInfo.kind) this variant's math is written for; a rule
    # that gives it a layer of another kind is refused by name before anything is built.
    layer_kinds: ClassVar[frozenset[str]] = frozenset({"einsum"})
    # How PEFT's adapter files hold this variant (lora_jax.peft_format); None: they cannot.
    peft_codec: ClassVar[PeftCodec | None] = None
    dtype: str = "float32"
    custom_vjp: bool = True

    def __post_init__(self) -> None:
        try:
            jnp.dtype(self.dtype)
        except TypeError as err:
            raise ValueError(f"{self.name}: dtype={self.dtype!r} is not a dtype name like 'float32'") from err
        if not isinstance(self.custom_vjp, bool):
            raise ValueError(f"{self.name}: custom_vjp={self.custom_vjp!r} must be True or False")

    @abc.abstractmethod
    def build(self, target: Target, *, seed: int) -> Adapter:
        """Validate against ``target`` and return its adapter (identity at alpha=0)."""

    def prepare(self, targets: Sequence[Target], *, seed: int) -> Any:
        """State shared by the adapters of this config: called once per apply with every
        target an equal config adapts, before any ``build``; each of them then finds the
        result as ``target.shared``. Raise here to refuse the set of targets. Default:
        nothing is shared (None)."""
        return None


def shard_spec(spec: EinsumSpec, kernel_names: tuple[Any, ...], axes: str) -> tuple[Any, ...]:
    """Partition spec of an adapter array from the kernel's per-axis mesh-axis names.

    ``d_in`` is the flattening of the contracted kernel axes (``d_out`` of the output
    axes); it can keep their sharding only when the sharded axes come first (a sharded
    inner axis is not a contiguous block of the flat axis), else it is replicated.
    ``kernel_names`` may be shorter than the kernel's rank (JAX reads a short partition
    spec as replicated on the remaining axes, e.g. ``P(None, "model")`` on a 3-D kernel).
    """
    if len(kernel_names) > len(spec.kernel):
        raise ValueError(
            f"partition spec {kernel_names} has more entries than the kernel {spec.kernel_shape} has axes"
        )
    padded = tuple(kernel_names) + (None,) * (len(spec.kernel) - len(kernel_names))
    by_letter = dict(zip(spec.kernel, padded, strict=True))

    def flat(letters: str) -> Any:
        names = [by_letter[c] for c in letters]
        sharded = [n for n in names if n is not None]
        if not sharded or any(n is None for n in names[: len(sharded)]):
            return None
        flat_names = tuple(x for n in sharded for x in (n if isinstance(n, tuple) else (n,)))
        return flat_names[0] if len(flat_names) == 1 else flat_names

    roles = {"i": flat(spec.contracted), "o": flat(spec.output), "-": None}
    return tuple(by_letter[c] for c in spec.batch) + tuple(roles[a] for a in axes)


class Adapter(nnx.Module):
    """Base of every adapter module: ``base`` is the wrapped layer, unchanged."""

    def __init__(self, target: Target, config: VariantConfig):
        self.base = target.module
        self.info = target.info
        self.spec = target.spec
        self.config = config
        self.alpha = Alpha(jnp.ones((), jnp.float32))

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.config.dtype)

    def base_kernel(self, use: str) -> Array:
        """The wrapped layer's kernel in its own layout (:func:`layer_kernel`); ``use`` says
        what reads it, for the error on a kernel that is not dense."""
        return layer_kernel(self.base, self.info, variant=self.config.name, path="", use=use)

    def __getattr__(self, name: str) -> Any:
        """Read through to the wrapped layer: model code that inspects its layers
        (``self.o_proj.kernel.shape``, ``.in_features``) keeps working after surgery.

        Python calls this only for names the adapter itself lacks, so the adapter's own
        attributes (``base``, ``config``, ``alpha``, ``dtype``, the variant's weights)
        win. Names starting with ``_`` are never forwarded (copy, pickle and NNX's graph
        code probe those), nor is anything while ``base`` is not set yet (an adapter
        being rebuilt by ``nnx.merge``). The wrapped layer's methods are refused, since
        calling one would run the layer without its adapter. Reads only: assigning
        ``adapter.kernel = ...`` sets an attribute on the adapter, not on the layer.
        """
        base = None if name.startswith("_") else vars(self).get("base")
        if base is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            value = getattr(base, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}, nor has the "
                f"{type(base).__name__} it wraps"
            ) from None
        if inspect.ismethod(value) and value.__self__ is base:
            raise AttributeError(
                f"{name!r} is a method of the wrapped {type(base).__name__}; through the "
                f"{type(self).__name__} adapter it would run the layer without the adapter. Call "
                f"adapter.base.{name} for the bare layer, or merge_adapters first"
            )
        return value

    def variable(self, var_type: type[nnx.Variable], value: Array, axes: str) -> nnx.Variable:
        """A new adapter Variable laid out like the base kernel, for sharded models.

        ``value`` has the kernel-batch axes first, then one axis per letter of ``axes``:
        ``i`` (d_in), ``o`` (d_out) or ``-`` (rank and other small axes: replicated). When
        the base kernel carries ``out_sharding`` metadata, the new Variable gets the
        matching partition spec and is placed on the kernel's mesh; otherwise it is plain.
        """
        kernel = getattr(self.base, self.info.kernel)
        names = kernel.get_metadata().get("out_sharding")
        if names is None:
            return var_type(value)
        spec = shard_spec(self.spec, tuple(names), axes)
        mesh = getattr(getattr(kernel[...], "sharding", None), "mesh", None)
        if mesh is None:
            with nnx.use_eager_sharding(False):
                return var_type(value, out_sharding=spec)
        return var_type(
            jax.device_put(value, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))),
            out_sharding=spec,
            mesh=mesh,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Array:
        i = self.info.input_arg
        x = args[i]
        self._check_alpha_rows(x)

        def call_base(new_x: Array) -> Array:
            return self.base(*args[:i], new_x, *args[i + 1 :], **kwargs)

        return self.forward(x, call_base)

    def _check_alpha_rows(self, x: Array) -> None:
        """A per-row alpha needs exactly one value per input row (axis 0). Shapes are
        static, so this runs once per trace; without it a wrong length fails deep in a
        variant's math, or a batch of one silently broadcasts to ``len(alpha)`` rows."""
        a = self.alpha[...]
        if a.ndim != 1 or self.spec.layout(x.ndim).lhs[0] in self.spec.kernel:
            return  # a scalar; or no row axis, which alpha_for reports
        if a.shape[0] != x.shape[0]:
            raise ValueError(
                f"alpha has {a.shape[0]} values but the input has {x.shape[0]} rows (input shape "
                f"{tuple(x.shape)}, einsum {self.spec.equation!r}); a per-row alpha needs one value per "
                "row of axis 0: set_alpha with a scalar, or with a vector as long as the batch"
            )

    @abc.abstractmethod
    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        """The adapted layer. ``call_base(x)`` runs the original layer on ``x``."""

    @abc.abstractmethod
    def merged(
        self, kernel: Float[Array, "*batch d_in d_out"], bias: Float[Array, "*batch d_out"] | None
    ) -> tuple[Array, Array | None]:
        """The dense kernel (and bias) equal to this adapter at its current scalar alpha."""

    # Whether transforms.cat can join adapters of this type into one (see concatenate).
    concatenable: ClassVar[bool] = False

    def concatenate(self, group: Sequence[Adapter], weights: Sequence[ArrayLike]) -> None:
        """Become, in place, one adapter whose delta is ``sum_i weights[i] * delta_i``, each
        delta at its adapter's current scalar alpha (``group[0]`` is this adapter; all of
        ``group`` sit on the same layer). Variants that set ``concatenable`` implement it;
        the config (e.g. its rank) may change with the arrays."""
        raise NotImplementedError(f"{type(self).__name__} adapters have no concatenation rule")

    # -- helpers shared by variants ----------------------------------------------------
    def project_in(self, x: Array, matrix: Float[Array, "*batch d_in k"]) -> Array:
        """``x @ matrix`` in the rank-space layout (:func:`lora_jax.projections.project_in`)."""
        return projections.project_in(self.spec, x, matrix, custom_vjp=self.config.custom_vjp)

    def project_out(self, h: Array, matrix: Float[Array, "*batch k d_out"], ndim: int) -> Array:
        """``h @ matrix`` in the layer's output layout; ``ndim`` is the layer input's."""
        return projections.project_out(self.spec, h, matrix, ndim, custom_vjp=self.config.custom_vjp)

    def project_back(self, h: Array, matrix: Float[Array, "*batch d_in k"], ndim: int) -> Array:
        """``h @ matrix^T`` back in the layer's input layout."""
        return projections.project_back(self.spec, h, matrix, ndim, custom_vjp=self.config.custom_vjp)

    def alpha_for(self, target: str, ndim: int) -> Array:
        """Alpha in the adapter dtype, broadcast to a layout ("out" or "hidden")."""
        a = self.alpha[...].astype(self.dtype)
        if a.ndim == 0:
            return a
        if a.ndim != 1:
            raise ValueError(f"alpha must be a scalar or one value per input row, got shape {a.shape}")
        return self.spec.rows(a, target, ndim)

    def scalar_alpha(self) -> Array:
        a = self.alpha[...]
        if a.ndim != 0:
            raise ValueError(
                f"merging needs a scalar alpha, this adapter holds one per row (shape {a.shape}); "
                "set a scalar with set_alpha first"
            )
        return a.astype(self.dtype)
