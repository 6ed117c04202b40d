"""Folding normalizers into the preceding convolution for inference.

At inference a batch-statistics layer is a per-channel affine map
``y = s * x + t`` (``docs/normalization.md``, sections 1 and 2), so
``norm(conv(x, W) + b)`` equals ``conv(x, W * s) + (b * s + t)``: the
normalizer costs nothing. Each method gives its map through the functional
interface (:meth:`~mabn_jax.functional.interface.Method.inference_affine`),
then ``gamma``, ``beta`` are applied: for BN, Batch Renorm and CBN
``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``; for MABN
``s = gamma / sqrt(chi_ema + eps)``, ``t = beta``.

A weight-centralized conv (:class:`mabn_jax.CenteredConv`, registry
``centered=True``) stores the raw kernel; it is centred before folding, so the
folded conv is a plain convolution with bias.

GroupNorm, LayerNorm and InstanceNorm normalize every sample with its own
statistics, also at inference: they are not affine maps of the conv output
and cannot be folded. They are left in place, and so are weight-standardized
GroupNorm (``'ws_gn'``) and filter response normalization (``'frn'``). The
standardization of ``'ws_gn'``'s kernels is a function of the weights alone:
:func:`precompute_standardized_kernels` computes it once for inference.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import FrozenDict, freeze, unfreeze

from mabn_jax import dataflow, discovery, registry
from mabn_jax.functional.centering import center_kernel
from mabn_jax.functional.standardization import standardize_kernel
from mabn_jax.nnx.centered import CenteredConv, CenteredDense

Path = Union[str, Sequence[str]]


def _as_path(path: Path) -> Tuple[str, ...]:
  return tuple(p for p in path.split("/") if p) if isinstance(path, str) else tuple(path)


def _subtree(tree: Mapping, path: Tuple[str, ...], what: str) -> Mapping:
  node = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(
        f"fold: {what} has no entry '{'/'.join(path[: i + 1])}' (available at "
        f"'{'/'.join(path[:i]) or '<root>'}': "
        f"{sorted(node) if isinstance(node, Mapping) else type(node).__name__})."
      )
    node = node[key]
  return node


def _delete(tree: dict, path: Tuple[str, ...]) -> None:
  """Removes ``path`` from a nested dict (if present) and empty parents."""
  if not path:
    return
  head, rest = path[0], path[1:]
  if head not in tree:
    return
  if rest:
    if isinstance(tree[head], dict):
      _delete(tree[head], rest)
      if not tree[head]:
        del tree[head]
  else:
    del tree[head]


def affine_of_normalizer(
  norm_params: Mapping,
  norm_state: Mapping,
  epsilon: float,
  where: str = "normalizer",
  method: Any = None,
) -> Tuple[np.ndarray, np.ndarray]:
  """The inference map ``(s, t)`` of one normalizer, float64 ``(C,)`` each.

  Args:
    norm_params: the layer's ``'params'`` (optional ``scale``, ``bias``).
    norm_state: the layer's ``'batch_stats'``.
    epsilon: the layer's ``epsilon`` (when ``method`` is not given).
    where: layer name for errors.
    method: the layer's functional method; default: the one whose state
      ``norm_state`` holds (:func:`mabn_jax.discovery.method_for_state`).
  """
  if method is None:
    method_class = discovery.method_for_state(norm_state)
    if method_class is None:
      raise ValueError(
        f"fold: {where} holds no statistics of a batch-statistics normalizer "
        f"(found {sorted(norm_state)}); it is not a foldable normalizer."
      )
    method = discovery.default_method(method_class, epsilon=epsilon)
  state = discovery.stored_state(
    {name: np.asarray(value, np.float64) for name, value in norm_state.items()}
  )
  inv, shift = method.inference_affine(state)
  gamma = np.asarray(norm_params.get("scale", np.ones_like(inv)), np.float64)
  beta = np.asarray(norm_params.get("bias", np.zeros_like(inv)), np.float64)
  return gamma * inv, gamma * shift + beta


def fold_conv(
  conv_params: Mapping,
  norm_params: Mapping,
  norm_state: Mapping,
  epsilon: float,
  centered: bool,
  where: str = "conv",
  method: Any = None,
) -> dict:
  """``{'kernel', 'bias'}`` of the conv equal to ``norm(conv(.))`` at inference.

  Computed in float64 and cast to the kernel's dtype. ``centered``: the conv
  centres its stored kernel (weight centralization) before convolving.
  """
  kernel = np.asarray(conv_params["kernel"], np.float64)
  if centered:
    kernel = np.asarray(center_kernel(kernel))
  scale, shift = affine_of_normalizer(norm_params, norm_state, epsilon, where, method)
  if scale.shape != (kernel.shape[-1],):
    raise ValueError(
      f"fold: {where}: the normalizer has {scale.shape[0]} channels but the "
      f"conv kernel {kernel.shape} has {kernel.shape[-1]} outputs."
    )
  bias = np.asarray(conv_params.get("bias", np.zeros_like(scale)), np.float64)
  dtype = conv_params["kernel"].dtype
  return {
    "kernel": jnp.asarray(kernel * scale, dtype),
    "bias": jnp.asarray(bias * scale + shift, conv_params.get("bias", conv_params["kernel"]).dtype),
  }


def _conv_norm_paths(params: Mapping) -> list:
  """``(module path, 'conv' or 'dense')`` of registry conv_norm/dense_norm modules."""
  flat = traverse_util.flatten_dict(params)
  paths = []
  for path in flat:
    if len(path) >= 3 and path[-2] in ("conv", "dense") and path[-1] == "kernel":
      module = path[:-2]
      has_norm = any(p[: len(module) + 1] == module + ("norm",) for p in flat)
      if has_norm and (module, path[-2]) not in paths:
        paths.append((module, path[-2]))
  return paths


def _fold_registry(variables: dict, normalizer, epsilon: Optional[float]):
  method = normalizer.method(**({} if epsilon is None else {"epsilon": epsilon}))
  if method is None:  # per-sample statistics, or no normalization: nothing folds
    return variables, normalizer
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  folded_params = unfreeze(params)
  modules = _conv_norm_paths(params)
  for module, child in modules:
    where = f"{child}_norm '{'/'.join(module)}'"
    new_conv = fold_conv(
      _subtree(params, module + (child,), "params"),
      _subtree(params, module + ("norm",), "params"),
      _subtree(stats, module + ("norm",), "batch_stats"),
      method.config.epsilon,
      normalizer.centered,
      where,
      method,
    )
    _delete(folded_params, module)
    node = folded_params
    for key in module:
      node = node.setdefault(key, {})
    node[child] = new_conv
  out = {"params": folded_params}
  for collection, tree in variables.items():
    if collection != "params":
      tree = _without_modules(unfreeze(tree), modules, collection == "batch_stats")
      if tree:
        out[collection] = tree
  return out, registry.make_normalizer("none")


def _without_modules(tree: dict, modules, check_left: bool) -> dict:
  """``tree`` without the folded modules; with ``check_left``, raises if a
  normalizer's statistics remain (a norm without a preceding conv)."""
  for module, _ in modules:
    _delete(tree, module)
  if check_left:
    flat = traverse_util.flatten_dict(tree)
    layers = {path[:-1] for path in flat}
    left = sorted(
      "/".join(layer)
      for layer in layers
      if discovery.method_for_state([path[-1] for path in flat if path[:-1] == layer]) is not None
    )
    if left:
      raise ValueError(
        f"fold: normalizers without a preceding conv cannot be folded: {left}; "
        "only conv_norm modules fold (build standalone norms as conv_norm "
        "or keep the unfolded model)."
      )
  return tree


def fold(
  variables: Any,
  normalizer: Any = None,
  *,
  pairs: Optional[Sequence[Tuple[Path, Path]]] = None,
  centered: Union[bool, Sequence[Path]] = False,
  epsilon: Union[None, float, Mapping[str, float]] = None,
  x: Any = None,
):
  """Merges BN, BRN, MABN and CBN layers into their preceding convolutions.

  Two ways to say which layers fold:

  * Registry models (``normalizer`` given, a :func:`mabn_jax.make_normalizer`
    result): every ``conv_norm`` module (params ``{NAME: {'conv': ...,
    'norm': ...}}``) and ``dense_norm`` module (``'dense'``) is replaced by
    the variables of the same module built with the ``'none'`` normalizer
    (a conv with bias, no state). Returns ``(folded_variables,
    mj.make_normalizer('none'))``: build the same model with that normalizer
    and apply it with ``train=False``. The kernel is
    centred first if the normalizer's conv is centred (``centered`` kwarg,
    default True for ``'mabn'``). ``epsilon`` defaults to the normalizer's.
    GroupNorm, LayerNorm, InstanceNorm (``'gn'``, ``'ln'``, ``'in'``) cannot
    fold (per-sample statistics at inference): the variables and normalizer
    are returned unchanged. A standalone ``norm.norm(...)`` layer (no conv
    before it) raises.
  * Plain models (``pairs`` given): ``[(conv_path, norm_path), ...]`` with
    Flax paths like ``'block1/Conv_0'`` (or tuples); the conv is
    ``flax.linen.Conv`` or :class:`mabn_jax.CenteredConv` (list the latter's
    paths in ``centered``, or ``centered=True`` for all) and the norm
    ``flax.linen.BatchNorm``, :class:`mabn_jax.BatchNorm` or
    :class:`mabn_jax.MABN`. Returns the folded variables: each conv gets the
    folded ``kernel`` and a ``bias``, every collection's entry for the norm is
    removed. Build the twin model with ``nn.Conv(..., use_bias=True)`` in
    place of each pair (and no norm); other layers keep their variables.

  * Flax NNX models (``fold(model)``): in place, every child ``norm`` that
    is a batch-statistics normalizer (:mod:`mabn_jax.nnx` or
    ``flax.nnx.BatchNorm``) next to a child ``conv`` (or ``dense``), as in
    the registry's NNX modules, or the ``pairs`` of attribute paths
    ``(conv_path, norm_path)`` (``'block/conv'``; list items by index) of a
    plain model, or, with an example input ``x``, every normalizer with the
    convolution (or linear layer) that feeds it, found from the model's data
    flow (:func:`mabn_jax.dataflow.nnx_norm_producers`; only casts and
    reshapes may stand between them). The conv gets the folded kernel and a
    bias, the norm is replaced by :class:`Folded` (the identity); returns the
    model.

  Args:
    variables: the trained model's variables (``'params'``, ``'batch_stats'``,
      others passed through), or an NNX model.
    normalizer: the registry normalizer the model was built with.
    pairs: for plain models, the (conv, norm) pairs to fold.
    x: an NNX model's example input (shapes only), to pair by data flow.
    centered: plain models: True (all convs are centred), False, or the
      centred conv paths.
    epsilon: each norm's ``epsilon``; a float for all, or ``{norm_path: eps}``
      (default 1e-5, the default of every normalizer here).

  Returns:
    ``(variables, normalizer)`` for registry models, ``variables`` for plain
    ones; same container type as the input. Computed in float64, stored in
    the kernel's dtype.
  """
  if isinstance(variables, nnx.Module):
    if normalizer is not None:
      raise ValueError("fold: an NNX model is folded by type; give no normalizer.")
    return _fold_nnx(variables, pairs if x is None else _data_flow_pairs(variables, x))
  frozen = isinstance(variables, FrozenDict)
  variables = unfreeze(variables)
  if "params" not in variables:
    raise ValueError(f"fold: the variables have no 'params' (found {sorted(variables)}).")
  if (normalizer is None) == (pairs is None):
    raise ValueError(
      "fold: give exactly one of `normalizer` (registry models) or `pairs` "
      "(plain models: [(conv_path, norm_path), ...])."
    )
  if normalizer is not None:
    out, new_normalizer = _fold_registry(
      variables, normalizer, epsilon if not isinstance(epsilon, Mapping) else None
    )
    return (freeze(out) if frozen else out), new_normalizer

  params = variables["params"]
  stats = variables.get("batch_stats", {})
  centered_paths = None if isinstance(centered, bool) else {_as_path(p) for p in centered}
  new_params = unfreeze(params)
  norm_paths = []
  for conv_path, norm_path in pairs or ():
    conv_path, norm_path = _as_path(conv_path), _as_path(norm_path)
    key = "/".join(norm_path)
    if isinstance(epsilon, Mapping):
      eps = epsilon.get(key, 1e-5)
    else:
      eps = 1e-5 if epsilon is None else epsilon
    is_centered = bool(centered) if centered_paths is None else conv_path in centered_paths
    conv_params = _subtree(params, conv_path, "params")
    if "kernel" not in conv_params:
      raise ValueError(f"fold: params '{'/'.join(conv_path)}' is not a conv (no 'kernel').")
    new_conv = fold_conv(
      conv_params,
      _subtree(params, norm_path, "params"),
      _subtree(stats, norm_path, "batch_stats"),
      eps,
      is_centered,
      f"pair ({'/'.join(conv_path)}, {key})",
    )
    node = new_params
    for k in conv_path:
      node = node[k]
    node.update(new_conv)
    norm_paths.append(norm_path)
  out = {}
  for collection, tree in variables.items():
    tree = new_params if collection == "params" else unfreeze(tree)
    for norm_path in norm_paths:
      _delete(tree, norm_path)
    if tree or collection == "params":
      out[collection] = tree
  return freeze(out) if frozen else out


def precompute_standardized_kernels(variables: Any, normalizer: Any):
  """A ``'ws_gn'`` registry model's variables with its standardized kernels
  stored, for inference: ``(variables, gn_normalizer)``.

  Every ``conv_norm`` module's ``conv`` kernel ``W`` becomes
  ``standardize_kernel(W)`` (what :class:`mabn_jax.StandardizedConv`
  convolves with), so the same model built with the returned
  ``make_normalizer('gn', ...)`` (plain convolutions, the same GroupNorm
  options) computes the same outputs without standardizing at every call.
  The GroupNorm stays: it cannot fold (see :func:`fold`). Other collections
  and ``dense_norm`` modules (not standardized) are unchanged.

  Raises:
    ValueError: for a normalizer other than ``'ws_gn'``.
  """
  if getattr(normalizer, "name", None) != "ws_gn":
    raise ValueError(
      "precompute_standardized_kernels: expected the 'ws_gn' normalizer the model "
      f"was built with, got {getattr(normalizer, 'name', normalizer)!r}."
    )
  frozen = isinstance(variables, FrozenDict)
  out = unfreeze(variables)
  for module, child in _conv_norm_paths(out["params"]):
    if child == "conv":
      node = out["params"]
      for key in module + (child,):
        node = node[key]
      node["kernel"] = standardize_kernel(node["kernel"])
  gn = registry.make_normalizer("gn", **normalizer.options)
  return (freeze(out) if frozen else out), gn


class Folded(nnx.Module):
  """A normalizer folded into its convolution: the identity on its first argument."""

  def __call__(self, x, *args, **kwargs):
    del args, kwargs
    return x


_FOLDS_THROUGH = frozenset(
  {"convert_element_type", "copy", "copy_p", "reshape", "squeeze", "expand_dims"}
)
"""Operations between a convolution and its norm that a fold may skip."""


def _data_flow_pairs(model: nnx.Module, x: Any) -> list:
  """``[(conv_path, norm_path)]`` of every normalizer of an NNX model and the
  layer feeding it, from one traced call on ``x``."""
  norms = [path for path, _, _ in discovery.nnx_normalizers(model)]
  pairs = []
  for norm_path, producer in dataflow.nnx_norm_producers(model, x, norms).items():
    other = sorted(set(producer.ops) - _FOLDS_THROUGH)
    if other:
      raise ValueError(
        f"fold: '{'/'.join(map(str, norm_path))}' is fed by "
        f"'{'/'.join(map(str, producer.path))}' through {other}, which a fold "
        "cannot move into the convolution."
      )
    pairs.append((producer.path, norm_path))
  return pairs


def _fold_nnx(model: nnx.Module, pairs) -> nnx.Module:
  for pair in discovery.nnx_conv_norm_pairs(model, pairs):
    conv, norm, where = pair.conv, pair.norm, pair.where
    method = discovery.method_of(norm)
    if method is None:
      raise ValueError(
        f"fold: '{where}' ({type(norm).__name__}) is not a foldable batch-statistics normalizer."
      )
    params = {
      name: getattr(norm, name)[...]
      for name in ("scale", "bias")
      if getattr(norm, name, None) is not None
    }
    stats = {
      name: value[...] for name, value in vars(norm).items() if isinstance(value, nnx.BatchStat)
    }
    conv_params = {"kernel": conv.kernel[...]}
    if conv.bias is not None:
      conv_params["bias"] = conv.bias[...]
    new = fold_conv(
      conv_params,
      params,
      stats,
      method.config.epsilon,
      isinstance(conv, (CenteredConv, CenteredDense)),
      where,
      method,
    )
    conv.kernel[...] = new["kernel"]
    conv.bias = nnx.Param(new["bias"])
    conv.use_bias = True
    pair.replace_norm(Folded())
  return model
