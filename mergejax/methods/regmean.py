"""RegMean (Jin et al., ICLR 2023): per linear map, the weights that best reproduce every
endpoint's outputs on its own task's inputs, in closed form.

For a linear map y = x W (W: (d_in, d_out)) and N endpoints, with G_i = X_i^T X_i / n_i the
Gram matrix of the layer's inputs on task i's images through model i,

    W* = argmin_W  sum_i ||X_i W - X_i W_i||^2 / n_i  =  (sum_i G~_i)^-1  sum_i G~_i W_i,

where G~_i = a G_i + (1 - a) diag(G_i) shrinks the off-diagonal entries by `reg_coef` a (the
published default 0.7 for merging across initialisations; a = 0 makes W* a per-input-feature
weighted average of the rows, weights diag(G_i)). The linear maps are every `nn.Dense` (a row
of X is an input vector: an image of an MLP, a token of a ViT) and every plain 2-D `nn.Conv`,
a linear map on its input patches (a row is one kh*kw*C patch, W the HWIO kernel flattened;
the published code merges Linear layers only). Every other leaf (biases, norms, BatchNorm
statistics, grouped convs) is the plain average; each endpoint keeps its own head.

Models from different initialisations are first aligned: endpoints 2..N are permuted onto
endpoint 1's features by a matching method (`align`: "permute" on the correlation of the
features at the spec's taps on the pooled task images, "weight_matching" data-free, or "none"),
which leaves each model's function unchanged, and RegMean runs on the aligned models. Only
permutation alignments are offered: a ZipIt! merge folds features of one model together, so it
defines no single aligned copy of each endpoint.

A dead input feature (zero on every image of every task) makes sum_i G~_i singular; a tiny
ridge `1e-8 * mean diagonal` pulls those rows to the plain average and leaves identical
endpoints exactly unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax.linen.linear import canonicalize_padding

from mergejax.kernels.statistics import FeatureStats
from mergejax.methods import registry
from mergejax.methods.learned import LearnedMerge
from mergejax.models import Model, Variables
from mergejax.specs import MergeSpec, apply_merge, flatten, unflatten

ALIGNMENTS = ("permute", "weight_matching", "none")
RIDGE = 1e-8  # relative to the mean diagonal of sum_i G~_i


def batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x (B, ...), mask (B,) bool) over `images` in order, the last batch zero-padded to the
    same size B = min(batch_size, len(images)) so every batch has one shape (one compile)."""
    n = len(images)
    size = max(1, min(batch_size, n))
    for start in range(0, n, size):
        x = np.asarray(images[start:start + size], np.float32)
        mask = np.ones(size, bool)
        if len(x) < size:
            mask[len(x):] = False
            x = np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])
        yield x, mask


def conv_patches(module: nn.Conv, x: jax.Array) -> jax.Array | None:
    """The input patches (B, H', W', kh*kw*C) a 2-D `nn.Conv` multiplies by its kernel
    reshaped to (kh*kw*C, out) (HWIO order: row (i, j, c)), so conv(x) = patches @ kernel;
    None for convs this does not cover (grouped, circular / reflect / causal padding, not
    2-D), which RegMean then averages."""
    ks = tuple(module.kernel_size)
    if type(module) is not nn.Conv or len(ks) != 2 or x.ndim != 4 or \
            module.feature_group_count != 1:
        return None
    padding = canonicalize_padding(module.padding, 2)
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        return None

    def pair(v):
        return (1, 1) if v is None else (v, v) if isinstance(v, int) else tuple(v)

    patches = jax.lax.conv_general_dilated_patches(
        x, ks, pair(module.strides), padding, lhs_dilation=pair(module.input_dilation),
        rhs_dilation=pair(module.kernel_dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)  # exact copies of the inputs
    # lax orders a patch's features (c, i, j); the HWIO kernel flattens as (i, j, c)
    patches = patches.reshape(patches.shape[:-1] + (x.shape[-1],) + ks)
    patches = jnp.moveaxis(patches, -3, -1)
    return patches.reshape(patches.shape[:-3] + (-1,))


def linear_inputs(model: Model, variables: Variables, x: jax.Array) -> dict[str, list]:
    """`{module path 'a/b': [rows (B, ..., d_in) of each call]}` of every linear map of
    `model` on `x` (eval mode): an `nn.Dense`'s input, or a 2-D `nn.Conv`'s input patches
    (`conv_patches`), recorded by intercepting the modules' `__call__`."""
    captured: dict[str, list] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense | nn.Conv):
            inputs = args[0] if args else kwargs["inputs"]
            rows = (inputs if isinstance(context.module, nn.Dense)
                    else conv_patches(context.module, inputs))
            if rows is not None:
                captured.setdefault("/".join(context.module.path), []).append(rows)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, x)
    return captured


@functools.lru_cache(maxsize=16)
def _gram_step(model: Model, layers: tuple[str, ...]):
    """jit step(grams, variables, x, mask) -> grams + X^T X of each layer's masked inputs."""

    def step(grams, variables, x, mask):
        inputs = linear_inputs(model, variables, x)
        out = dict(grams)
        for path in layers:
            for a in inputs[path]:
                rows = a.reshape(a.shape[0], -1, a.shape[-1]) * mask[:, None, None]
                rows = rows.reshape(-1, a.shape[-1]).astype(jnp.float32)
                out[path] = out[path] + jnp.matmul(rows.T, rows, precision="highest")
        return out

    return jax.jit(step, donate_argnums=0)


def gram_matrices(model: Model, variables: Variables, images: np.ndarray,
                  layers: Sequence[str], batch_size: int = 256) -> dict[str, np.ndarray]:
    """`{layer: G (d_in, d_in) float32}`, the mean over input rows of x x^T of each linear map
    in `layers` (module paths of Dense or 2-D Conv layers) on `images` (n, H, W, C) through
    `variables`.

    A row is one input vector: an image for a flat MLP layer, a token for a ViT layer
    (n * tokens rows), an input patch for a conv (n * H' * W' rows, d_in = kh * kw * C).
    Accumulated in float32 at highest matmul precision, one jitted step per batch, padded
    rows masked out.
    """
    if not len(images):
        raise ValueError("RegMean needs at least one image per task")
    layers = tuple(layers)
    shapes = jax.eval_shape(lambda v, x: linear_inputs(model, v, x), variables,
                            jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32))
    missing = [p for p in layers if p not in shapes]
    if missing:
        raise ValueError(f"layers {missing} are not linear maps of model {model.name!r}; "
                         f"its Dense and Conv layers: {sorted(shapes)}")
    grams = {p: jnp.zeros((shapes[p][0].shape[-1],) * 2, jnp.float32) for p in layers}
    rows_per_image = {p: sum(int(np.prod(s.shape[1:-1])) for s in shapes[p]) for p in layers}
    step = _gram_step(model, layers)
    for x, mask in batches(images, batch_size):
        grams = step(grams, variables, x, mask)
    return {p: np.asarray(g) / (len(images) * rows_per_image[p]) for p, g in grams.items()}


def regmean_solve(grams: Sequence[np.ndarray], kernels: Sequence[np.ndarray],
                  reg_coef: float) -> np.ndarray:
    """W* = (sum_i G~_i + eps N I)^-1 (sum_i G~_i W_i + eps sum_i W_i), in float64.

    Args:
      grams: N Gram matrices (d_in, d_in).
      kernels: N kernels (d_in, d_out).
      reg_coef: a in G~ = a G + (1 - a) diag(G).

    Returns:
      (d_in, d_out) float32. eps = RIDGE * mean diagonal of sum_i G~_i (1 if that is 0).
    """
    g = np.stack([np.asarray(x, np.float64) for x in grams])
    w = np.stack([np.asarray(x, np.float64) for x in kernels])
    diag = np.einsum("nii->ni", g)
    g_reg = reg_coef * g
    idx = np.arange(g.shape[-1])
    g_reg[:, idx, idx] = diag  # (1 - a) diag + a diag
    lhs, rhs = g_reg.sum(0), np.matmul(g_reg, w).sum(0)
    scale = float(np.trace(lhs)) / lhs.shape[0]
    eps = RIDGE * scale if scale > 0 else 1.0
    lhs[idx, idx] += eps * len(w)
    rhs += eps * w.sum(0)
    try:  # positive definite with the ridge: Cholesky, half the cost of LU
        out = scipy.linalg.solve(lhs, rhs, assume_a="pos", check_finite=False)
    except np.linalg.LinAlgError:  # rounding left it indefinite
        out = np.linalg.solve(lhs, rhs)
    return out.astype(np.float32)


def _feature_moments(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
                     images: np.ndarray, batch_size: int) -> dict:
    """`{space: Moments}` of the N models' concatenated features at every tapped space (what
    a matching method reads), on `images`."""
    spaces = [s for s in spec.spaces if s.tap is not None]
    fn = _taps_fn(model, tuple(sorted({s.tap for s in spaces})))
    states = {s.name: FeatureStats.init(len(endpoints) * s.width) for s in spaces}
    for x, mask in batches(images, batch_size):
        taps = fn(list(endpoints), x)
        for s in spaces:
            states[s.name] = states[s.name].update(taps[s.tap], mask=mask)
    # host arrays: the matchers then solve on the host instead of compiling a jax path
    return {s.name: jax.tree.map(np.asarray, states[s.name].finalize(
        name=s.tap, widths=[s.width] * len(endpoints))) for s in spaces}


@functools.lru_cache(maxsize=16)
def _taps_fn(model: Model, taps: tuple[str, ...]):
    """jit fn(endpoints, x) -> {tap: [model i's activation]} (`mergejax.statistics` has the
    same, but sits in the run layer, above the methods)."""

    def taps_of_all(endpoints, x):
        outs = [model.features(v, x)[1] for v in endpoints]
        return {t: [o[t] for o in outs] for t in taps}

    return jax.jit(taps_of_all)


def _permutation_block(unmerge_block: np.ndarray, space: str, align: str) -> np.ndarray:
    u = np.asarray(unmerge_block, np.float32)
    ok = (u.shape[0] == u.shape[1] and np.all((u == 0) | (u == 1))
          and np.all(u.sum(0) == 1) and np.all(u.sum(1) == 1))
    if not ok:
        raise ValueError(f"align={align!r} gave a non-permutation at space {space!r}; "
                         f"alignment needs one of {ALIGNMENTS}")
    return u


def align_endpoints(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
                    images: np.ndarray, *, align: str = "permute", key: jax.Array | None = None,
                    batch_size: int = 256) -> list[Variables]:
    """Every endpoint with its features permuted onto endpoint 1's (functions unchanged).

    `align` names the matching method ("permute": exact assignment on the correlation of the
    features on `images`; "weight_matching": Git Re-Basin, data-free; "none": as given). The
    method's matching function runs with its default hyperparameters over every space of the
    spec; each endpoint i is then `apply_merge`d alone with its block (U_i^T, U_i).
    """
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    if align == "none" or len(endpoints) == 1:
        return list(endpoints)
    method = registry.get(align)
    hparams = method.defaults("matching")
    stats = (_feature_moments(model, spec, endpoints, images, batch_size)
             if method.needs_activations(hparams) else {})
    key = jax.random.key(0) if key is None else key
    transforms = method.fn("matching")(spec, list(endpoints), stats, key=key,
                                       spaces=spec.space_names, **hparams)
    aligned = []
    for i, v in enumerate(endpoints):
        own = {}
        for space, (_, unmerge) in transforms.items():
            n = spec.space(space).width
            u = _permutation_block(np.asarray(unmerge)[i * n:(i + 1) * n], space, align)
            own[space] = (u.T, u)
        aligned.append(apply_merge(spec, [v], own)[0])
    return aligned


@registry.register("regmean", "learned", checks={"reg_coef": "[0, 1]", "align": ALIGNMENTS,
                                                 "batch_size": "int [1, inf)"})
def regmean(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
            task_images: Sequence[np.ndarray], *, key: jax.Array | None = None,
            reg_coef: float = 0.7, align: str = "permute", convs: bool = True,
            batch_size: int = 256) -> LearnedMerge:
    """RegMean of every Dense and Conv kernel outside the head; other trunk leaves averaged.

    Args:
      model, spec: the endpoints' architecture and its merge spec.
      endpoints: N variable trees; endpoint i was trained on task i.
      task_images: N arrays (n_i, H, W, C); G_i is measured on task i's images through
        (aligned) model i only. Alignment reads all tasks' images pooled.
      key: seeds weight matching's sweep order.
      reg_coef: a in G~ = a G + (1 - a) diag(G), in [0, 1].
      align: "permute", "weight_matching" or "none" (module docstring).
      convs: solve conv kernels too (False: average them, as the published code does).
      batch_size: images per jitted Gram step.

    Returns:
      `LearnedMerge(model, [merged trunk + head i for each endpoint], {})`.
    """
    if len(task_images) != len(endpoints):
        raise ValueError(f"RegMean needs one image array per endpoint: {len(endpoints)} "
                         f"endpoints, {len(task_images)} arrays")
    pooled = np.concatenate([np.asarray(x, np.float32) for x in task_images])
    # one batch shape for every task (one compile): tasks smaller than it are padded
    batch_size = min(batch_size, max(len(x) for x in task_images))
    aligned = align_endpoints(model, spec, endpoints, pooled, align=align, key=key,
                              batch_size=batch_size)
    flats = [flatten(v) for v in aligned]

    def is_head(path: str) -> bool:
        return path.split("/")[1] == model.head

    trunk = {k: np.mean([np.asarray(f[k], np.float64) for f in flats], 0).astype(
        np.asarray(flats[0][k]).dtype) for k in flats[0] if not is_head(k)}
    layers = [k.removeprefix("params/").removesuffix("/kernel") for k in flats[0]
              if k.startswith("params/") and k.endswith("/kernel") and not is_head(k)]
    shapes = jax.eval_shape(lambda v, x: linear_inputs(model, v, x), aligned[0],
                            jax.ShapeDtypeStruct((1,) + pooled.shape[1:], jnp.float32))
    # linear maps (Dense, and Conv unless `convs` is False); other kernels are averaged
    layers = [p for p in layers if p in shapes and (convs or np.ndim(flats[0][
        f"params/{p}/kernel"]) == 2)]
    grams = [gram_matrices(model, v, np.asarray(x, np.float32), layers, batch_size)
             if layers else {} for v, x in zip(aligned, task_images)]
    for p in layers:
        k = f"params/{p}/kernel"
        shape = np.shape(flats[0][k])  # (d_in, out) or HWIO (kh, kw, C, out)
        kernels = [np.reshape(f[k], (-1, shape[-1])) for f in flats]
        trunk[k] = regmean_solve([g[p] for g in grams], kernels, reg_coef).reshape(shape)
    variables = [unflatten({**trunk, **{k: v for k, v in f.items() if is_head(k)}})
                 for f in flats]
    return LearnedMerge(model, variables, {})
