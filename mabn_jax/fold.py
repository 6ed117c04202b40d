"""Folding normalizers into the preceding convolution for inference.

At inference a BN-type layer is a per-channel affine map ``y = s * x + t``
(spec, sections 1 and 2), so ``norm(conv(x, W) + b)`` equals
``conv(x, W * s) + (b * s + t)``: the normalizer costs nothing. The maps are

* BN, SyncBN, Batch Renorm and CBN (running ``mean``/``var``):
  ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``;
* MABN (running ``chi_ema``): ``s = gamma / sqrt(chi_ema + eps)``, ``t = beta``.

A weight-centralized conv (:class:`mabn_jax.CenteredConv`, registry
``centered=True``) stores the raw kernel; it is centred before folding, so the
folded conv is a plain convolution with bias.

GroupNorm, LayerNorm and InstanceNorm normalize every sample with its own
statistics, also at inference: they are not affine maps of the conv output
and cannot be folded. They are left in place.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict, freeze, unfreeze

from mabn_jax.functional.centering import center_kernel

FOLDABLE = ("bn", "syncbn", "brn", "mabn", "cbn", "cbn_naive")
"""Registry normalizers that fold into the preceding conv."""
UNFOLDABLE = ("gn", "ln", "in")
"""Registry normalizers with per-sample statistics: left in place."""

Path = Union[str, Sequence[str]]


def _as_path(path: Path) -> Tuple[str, ...]:
  return tuple(p for p in path.split("/") if p) if isinstance(path, str) else tuple(path)


def _subtree(tree: Mapping, path: Tuple[str, ...], what: str) -> Mapping:
  node = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(
          f"fold: {what} has no entry '{'/'.join(path[:i + 1])}' (available at "
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
    norm_params: Mapping, norm_state: Mapping, epsilon: float, where: str = "normalizer"
) -> Tuple[np.ndarray, np.ndarray]:
  """The inference map ``(s, t)`` of one normalizer, float64 ``(C,)`` each.

  Args:
    norm_params: the layer's ``'params'`` (optional ``scale``, ``bias``).
    norm_state: the layer's ``'batch_stats'`` (``mean``/``var`` or ``chi_ema``).
    epsilon: the layer's ``epsilon``.
    where: layer name for errors.
  """
  if "chi_ema" in norm_state:
    inv = 1.0 / np.sqrt(np.asarray(norm_state["chi_ema"], np.float64) + epsilon)
    mean = np.zeros_like(inv)
  elif "mean" in norm_state and "var" in norm_state:
    inv = 1.0 / np.sqrt(np.asarray(norm_state["var"], np.float64) + epsilon)
    mean = np.asarray(norm_state["mean"], np.float64)
  else:
    raise ValueError(
        f"fold: {where} has neither 'mean'/'var' nor 'chi_ema' statistics "
        f"(found {sorted(norm_state)}); it is not a foldable normalizer."
    )
  gamma = np.asarray(norm_params.get("scale", np.ones_like(inv)), np.float64)
  beta = np.asarray(norm_params.get("bias", np.zeros_like(inv)), np.float64)
  scale = gamma * inv
  return scale, beta - mean * scale


def fold_conv(
    conv_params: Mapping,
    norm_params: Mapping,
    norm_state: Mapping,
    epsilon: float,
    centered: bool,
    where: str = "conv",
) -> dict:
  """``{'kernel', 'bias'}`` of the conv equal to ``norm(conv(.))`` at inference.

  Computed in float64 and cast to the kernel's dtype. ``centered``: the conv
  centres its stored kernel (weight centralization) before convolving.
  """
  kernel = np.asarray(conv_params["kernel"], np.float64)
  if centered:
    kernel = np.asarray(center_kernel(kernel))
  scale, shift = affine_of_normalizer(norm_params, norm_state, epsilon, where)
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
      if any(p[: len(module) + 1] == module + ("norm",) for p in flat):
        if (module, path[-2]) not in paths:
          paths.append((module, path[-2]))
  return paths


def _fold_registry(variables: dict, normalizer, epsilon: Optional[float]):
  from mabn_jax import registry  # imported lazily: registry imports the layers

  name = normalizer.name
  kwargs = dict(normalizer.kwargs)
  if name in UNFOLDABLE or name == "none":
    return variables, normalizer
  if name not in FOLDABLE:
    raise ValueError(
        f"fold: normalizer '{name}' is not known; foldable: {FOLDABLE}, "
        f"left in place: {UNFOLDABLE + ('none',)}."
    )
  eps = kwargs.get("epsilon", 1e-5) if epsilon is None else epsilon
  centered = normalizer.centered
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  folded_params = unfreeze(params)
  modules = _conv_norm_paths(params)
  for module, child in modules:
    where = f"{child}_norm '{'/'.join(module)}'"
    conv_params = _subtree(params, module + (child,), "params")
    norm_params = _subtree(params, module + ("norm",), "params")
    norm_state = _subtree(stats, module + ("norm",), "batch_stats")
    new_conv = fold_conv(conv_params, norm_params, norm_state, eps, centered, where)
    _delete(folded_params, module)
    node = folded_params
    for key in module:
      node = node.setdefault(key, {})
    node[child] = new_conv
  out = {"params": folded_params}
  for collection, tree in variables.items():
    if collection == "params":
      continue
    tree = unfreeze(tree)
    for module, _ in modules:
      _delete(tree, module)
    if collection == "batch_stats":
      left = sorted(
          "/".join(p[:-1]) for p in traverse_util.flatten_dict(tree)
          if p[-1] in ("mean", "var", "chi_ema")
      )
      if left:
        raise ValueError(
            f"fold: normalizers without a preceding conv cannot be folded: {left}; "
            "only conv_norm modules fold (build standalone norms as conv_norm "
            "or keep the unfolded model)."
        )
    if tree:
      out[collection] = tree
  return out, registry.make_normalizer("none")


def fold(
    variables: Mapping,
    normalizer: Any = None,
    *,
    pairs: Optional[Sequence[Tuple[Path, Path]]] = None,
    centered: Union[bool, Sequence[Path]] = False,
    epsilon: Union[None, float, Mapping[str, float]] = None,
):
  """Merges BN, BRN, MABN and CBN layers into their preceding convolutions.

  Two ways to say which layers fold:

  * Registry models (``normalizer`` given, a :func:`mabn_jax.make_normalizer`
    result): every ``conv_norm`` module (params ``{NAME: {'conv': ...,
    'norm': ...}}``) and ``dense_norm`` module (``'dense'``) is replaced by the variables of the same module built
    with the ``'none'`` normalizer (a conv with bias, no state). Returns
    ``(folded_variables, mj.make_normalizer('none'))``: build the same model
    with that normalizer and apply it with ``train=False``. The kernel is
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

  Args:
    variables: the trained model's variables (``'params'``, ``'batch_stats'``,
      others passed through).
    normalizer: the registry normalizer the model was built with.
    pairs: for plain models, the (conv, norm) pairs to fold.
    centered: plain models: True (all convs are centred), False, or the
      centred conv paths.
    epsilon: each norm's ``epsilon``; a float for all, or ``{norm_path: eps}``
      (default 1e-5, the default of every normalizer here).

  Returns:
    ``(variables, normalizer)`` for registry models, ``variables`` for plain
    ones; same container type as the input. Computed in float64, stored in
    the kernel's dtype.
  """
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
  centered_paths = (
      None if isinstance(centered, bool) else {_as_path(p) for p in centered}
  )
  new_params = unfreeze(params)
  norm_paths = []
  for conv_path, norm_path in pairs:
    conv_path, norm_path = _as_path(conv_path), _as_path(norm_path)
    key = "/".join(norm_path)
    if isinstance(epsilon, Mapping):
      eps = epsilon.get(key, 1e-5)
    else:
      eps = 1e-5 if epsilon is None else epsilon
    is_centered = centered if centered_paths is None else conv_path in centered_paths
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
