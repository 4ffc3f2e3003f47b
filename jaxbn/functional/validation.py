"""Trace-time validation of batch-norm inputs.

Shapes and dtypes are static under ``jax.jit``, so every check here runs once per trace and
raises before any computation, with torch's wording where torch has one. All checks live here so
the core stays a straight line of math.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .reductions import count_per_channel
from .types import UNSET, BatchNormFlags, BatchNormParams, BatchNormState

ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)
"""What jaxbn takes as an array: JAX arrays (and tracers), NumPy arrays and scalars."""

_ORDER = "the order is batch_norm(x, state, params, flags) / instance_norm(x, state, params, flags)"


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def check_array(name: str, value: Any) -> None:
    """``value`` must be a JAX or NumPy array; a torch tensor gets the conversion spelled out."""
    if isinstance(value, ARRAY_TYPES):
        return
    hint = ""
    if type(value).__module__.startswith("torch"):
        hint = (": convert a torch tensor with jnp.asarray(t.detach().cpu().numpy()), or a whole "
                "state_dict with jaxbn.porting.torch_to_flax")
    raise TypeError(f"{name} must be a JAX or NumPy array, got {_type_name(value)}{hint}")


def as_jax(value: Any) -> jax.Array:
    """A JAX array (or tracer) as it is -- converting it would copy it, and under ``jax.vjp`` the
    copy would be kept for the backward pass -- and a NumPy array converted (dtype canonicalized,
    as ``jax.jit`` does to its arguments)."""
    return value if isinstance(value, jax.Array) else jnp.asarray(value)


def check_fields(name: str, value: Any, cls: type, build: str) -> None:
    """``value`` is None or a ``cls`` (a NamedTuple of arrays); say how to build one otherwise."""
    if value is None:
        return
    if not isinstance(value, cls):
        swapped = {BatchNormState: BatchNormParams, BatchNormParams: BatchNormState}[cls]
        if isinstance(value, swapped):
            raise TypeError(f"{name} is a jaxbn.{swapped.__name__}: arguments swapped? {_ORDER}")
        raise TypeError(
            f"{name} must be a jaxbn.{cls.__name__} or None, got {_type_name(value)}; build it "
            f"with {build}, or jaxbn.{cls.__name__}(**fields) from a mapping with torch's names "
            f"{cls._fields}"
        )
    for field, array in zip(cls._fields, value):
        if array is not None:  # a None field is reported with its shape check
            check_array(f"{name}.{field}", array)


def check_argument_types(x: Any, state: Any, params: Any, flags: Any) -> None:
    """The types of a pure function's arguments, before anything reads their shapes."""
    check_array("x", x)
    check_fields("state", state, BatchNormState,
                 "jaxbn.init_state(num_features, dtype) (None: built with track_running_stats=False)")
    check_fields("params", params, BatchNormParams,
                 "jaxbn.init_params(num_features, dtype) (None: built with affine=False)")
    if not isinstance(flags, BatchNormFlags):
        raise TypeError(f"flags must be a jaxbn.BatchNormFlags, got {_type_name(flags)}; {_ORDER}")


def split_overrides(flags: BatchNormFlags, momentum: Any, eps: Any) -> tuple[BatchNormFlags, Any, Any]:
    """``(flags, traced momentum, traced eps)``: Python values (and ``momentum=None``) are folded
    into the static flags; array values stay traced (:data:`UNSET` where not given or folded)."""
    static, traced = {}, {"momentum": UNSET, "eps": UNSET}
    for name, value in (("momentum", momentum), ("eps", eps)):
        if value is UNSET:
            continue
        if isinstance(value, ARRAY_TYPES):
            shape = tuple(np.shape(value))
            if shape != ():
                raise ValueError(f"{name} must be a scalar, got an array of shape {shape}")
            if not jnp.issubdtype(value.dtype, jnp.floating):
                raise TypeError(f"{name} must be a floating-point scalar, got dtype {jnp.dtype(value.dtype).name}")
            traced[name] = value
        else:
            static[name] = value
    return (flags.replace(**static) if static else flags), traced["momentum"], traced["eps"]


def check_eps(eps: Any, uses_input_stats: bool) -> None:
    """torch's batch-norm check: eps must be positive with batch statistics, non-negative with
    running ones (a traced eps is not checked). torch's instance norm has no such check."""
    if isinstance(eps, ARRAY_TYPES):
        return
    if uses_input_stats and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def canonical_axis(axis: int, ndim: int, shape: tuple[int, ...]) -> int:
    """Map a possibly negative feature axis to ``0 <= axis < ndim`` or raise ``ValueError``."""
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"feature axis {axis} is out of bounds for input of rank {ndim} (input shape {shape})"
        )
    return axis % ndim


def check_input(x: Any, axis: int) -> int:
    """Validate ``x`` and return the canonical feature axis."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    shape = tuple(x.shape)
    if x.ndim < 2:
        raise ValueError(
            f"expected at least 2D input (got {x.ndim}D input): batch norm needs a batch axis "
            f"and a feature axis (input shape {shape})"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f'"batch_norm" not implemented for \'{jnp.dtype(x.dtype).name}\': x must have a '
            f"floating-point dtype (input shape {shape})"
        )
    return canonical_axis(axis, x.ndim, shape)


DTYPE_FIX = (
    "To fix: create state and params in the input's dtype (jaxbn.init_state(C, dtype), "
    "jaxbn.init_params(C, dtype); Flax adapters: param_dtype=...), or cast the input "
    "(x.astype(...); Flax adapters: dtype=...). With jax_enable_x64 on, jnp arrays default to "
    "float64 while the adapters' param_dtype defaults to float32."
)


def allowed_dtypes(x_dtype: Any) -> tuple[jnp.dtype, ...]:
    """Dtypes state and params may have for an input of ``x_dtype``.

    torch accepts parameters and buffers of the input's dtype, and float32 ones for a bf16/fp16
    input (mixed precision); anything else is its "mixed dtype" error.
    """
    x_dtype = jnp.dtype(x_dtype)
    if x_dtype.itemsize < 4:
        return (x_dtype, jnp.dtype(jnp.float32))
    return (x_dtype,)


def check_channel_vector(
    owner: str, name: str, value: Any, x_shape: tuple[int, ...], axis: int, x_dtype: Any
) -> None:
    """Check that ``owner.name`` is a ``(C,)`` vector of an allowed dtype for the input."""
    num_features = x_shape[axis]
    where = f"input shape {x_shape}, feature axis {axis}"
    if value is None:
        raise ValueError(f"{owner}.{name} is None; pass {owner}=None instead ({where})")
    shape = tuple(getattr(value, "shape", ()))
    if len(shape) == 1 and shape[0] != num_features:
        # torch: "running_mean should contain 5 elements not 3"
        raise ValueError(
            f"{name} should contain {num_features} elements not {shape[0]}: "
            f"{owner}.{name} has shape {shape}, the input has {num_features} features ({where})"
        )
    if shape != (num_features,):
        raise ValueError(
            f"{owner}.{name} has shape {shape}; expected ({num_features},) ({where})"
        )
    dtype = jnp.dtype(value.dtype)
    allowed = allowed_dtypes(x_dtype)
    if dtype not in allowed:
        names = " or ".join(d.name for d in allowed)
        raise TypeError(
            f"mixed dtype: {owner}.{name} has dtype {dtype.name} but the input has dtype "
            f"{jnp.dtype(x_dtype).name}; expected {names}. {DTYPE_FIX}"
        )


def check_counter(value: Any) -> None:
    """``num_batches_tracked`` must be an integer scalar array."""
    shape = tuple(getattr(value, "shape", (None,)))
    if shape != ():
        raise ValueError(f"state.num_batches_tracked has shape {shape}; expected () (a scalar)")
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(
            f"state.num_batches_tracked has dtype {jnp.dtype(value.dtype).name}; expected an "
            "integer dtype (torch stores int64)"
        )


def check_one_dtype(state: Any, params: Any) -> None:
    """torch keeps weight, bias, running_mean and running_var in one dtype and rejects a mixture,
    even of dtypes each allowed alone (float32 buffers with bf16 parameters for a bf16 input).
    """
    fields = {}
    if state is not None:
        fields.update({"state.running_mean": state.running_mean, "state.running_var": state.running_var})
    if params is not None:
        fields.update({"params.weight": params.weight, "params.bias": params.bias})
    dtypes = {name: jnp.dtype(value.dtype) for name, value in fields.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name} has dtype {dtype.name}" for name, dtype in dtypes.items())
        raise TypeError(
            "mixed dtype: state and params must share one dtype (the input's, or float32 for a "
            f"bf16/fp16 input), but {listing}. {DTYPE_FIX}"
        )


def check_state_and_params(x: Any, state: Any, params: Any, axis: int) -> None:
    """Check every field of ``state`` and ``params`` against the input."""
    shape = tuple(x.shape)
    if state is not None:
        check_channel_vector("state", "running_mean", state.running_mean, shape, axis, x.dtype)
        check_channel_vector("state", "running_var", state.running_var, shape, axis, x.dtype)
        check_counter(state.num_batches_tracked)
    if params is not None:
        check_channel_vector("params", "weight", params.weight, shape, axis, x.dtype)
        check_channel_vector("params", "bias", params.bias, shape, axis, x.dtype)
    check_one_dtype(state, params)


def check_batch_size(shape: tuple[int, ...], axis: int) -> None:
    """torch's check whenever batch statistics are used: more than one value per channel."""
    if count_per_channel(shape, axis) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {shape}"
        )


def check_mask(mask: Any, shape: tuple[int, ...], axis: int) -> None:
    """A row mask must be a bool ``(N,)`` array over axis 0, which must not be the feature axis."""
    if mask is None:
        return
    mask_shape = tuple(getattr(mask, "shape", (None,)))
    if axis == 0:
        raise ValueError(f"a row mask needs the batch on axis 0, but axis 0 is the feature axis (input shape {shape})")
    if mask_shape != (shape[0],):
        raise ValueError(f"mask has shape {mask_shape}; expected ({shape[0]},) for input shape {shape}")
    if jnp.dtype(mask.dtype) != jnp.dtype(bool):
        raise TypeError(f"mask has dtype {jnp.dtype(mask.dtype).name}; expected bool")


def check_instance_input(shape: tuple[int, ...], axis: int, axis_name: Any) -> None:
    """Instance norm needs a batched input ``(N, C, *spatial)`` and statistics per instance."""
    if len(shape) < 3:
        raise ValueError(
            f"expected at least 3D input (got {len(shape)}D input): instance norm needs a batch "
            f"axis, a feature axis and spatial axes (input shape {shape}); for torch's unbatched "
            "(C, *spatial) input pass x[None] and take y[0]"
        )
    if axis == 0:
        raise ValueError(f"instance norm needs the batch on axis 0, but axis 0 is the feature axis (input shape {shape})")
    if axis_name is not None:
        raise ValueError(
            f"instance norm computes its statistics per instance; flags.axis_name={axis_name!r} "
            "has nothing to synchronize (torch has no SyncInstanceNorm): pass axis_name=None"
        )


def check_spatial_size(shape: tuple[int, ...], axis: int) -> None:
    """torch's ``_verify_spatial_size`` whenever instance norm uses input statistics."""
    if count_per_channel(shape[1:], axis - 1) == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {shape}"
        )


def check_running_stats_exist(uses_input_stats: bool, state: Any) -> None:
    """Normalizing with running statistics needs them (torch's instance norm in eval with
    ``track_running_stats=True`` on a layer built without buffers)."""
    if not uses_input_stats and state is None:
        raise ValueError(
            "Expected running_mean and running_var to be defined when use_input_stats is false: "
            "eval with track_running_stats=True needs state (the layer has no buffers)"
        )
