"""Merge execution: loads the inputs, plans, and maps each parameter group onto mergejax methods.

Semantics are mergekit's (per-tensor sparsification, `zero_sign="positive"`, weights applied
before the sign election, normalize = divide by the sum of the agreeing weights), computed by
mergejax's methods: each group of tensors is one call of `mergejax.methods` (ties, dare,
breadcrumbs, task_arithmetic, average, slerp) whenever the method can express the group's
values (one density for all models; for sign-election methods equal positive weights); else
each task vector is sparsified alone by mergejax's sparsifier (`trim_topk`, `dare_drop`,
`breadcrumbs_mask`) and combined by mergekit's formula (`_merge_per_model`). Differences from
mergekit: magnitude trims use mergejax's threshold (every |x| >= the (n - int(n density))-th
smallest is kept: int(n density) + 1 entries, ties included, not exactly int(n density)); DARE
draws from JAX keys (`--random-seed`); BatchNorm statistics are merged like any tensor.
`scope: global` (ties, mergejax's extension) trims each model over all its tensors (TIES
paper): exact thresholds first (`thresholds.global_thresholds`), then every fine-tuned tensor
is replaced by base where its task-vector entry is trimmed and the groups merge with density 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mergejax.recipe import checkpoint_io
from mergejax.recipe.checkpoint_io import Flat, check_same_trees
from mergejax.recipe.resolve import Group, plan
from mergejax.recipe.schema import DIV_EPS, Method, RecipeError
from mergejax.recipe.validate import Recipe
from mergejax.specs import flatten, unflatten


def _fn(name: str):
    from mergejax import methods

    return methods.get(name).fn("weight_space")


def _divisor(weights: Sequence[float]) -> float:
    s = float(sum(weights))
    return 1.0 if abs(s) < DIV_EPS else s


def merge_group(method: Method, base, members: list, g: Group, key):
    """One mergejax method call on the group's sub-trees (nested dicts); returns a tree.

    `base` (GTA methods; else None) and `members` are trees of one structure holding the
    group's tensors (the out-of-core path calls it on one tensor at a time); `key` seeds DARE.
    """
    p = g.params
    if method.name == "consensus":  # whole-model quantities first: `consensus_group`
        raise RecipeError("consensus merges through consensus_group, not merge_group")
    if method.kind == "slerp":
        return _fn("slerp")(None, members, t=p["t"])
    w = [m["weight"] for m in g.model_params]
    if method.kind == "linear":
        if p["normalize"]:
            return _fn("average")(None, members, weights=w)
        # task arithmetic without a base is lam * sum_t w_t theta_t.
        return _fn("task_arithmetic")(None, members, lam=1.0, weights=w)
    lam, norm = p["lambda"], p["normalize"]
    dens = {m.get("density") for m in g.model_params}
    gams = {m.get("gamma") for m in g.model_params}
    uniform = len(dens) == 1 and len(gams) == 1
    d, gamma, c = next(iter(dens)), next(iter(gams)), w[0]
    equal_w = len(set(w)) == 1
    rescale = "l1" if p.get("rescale") else "none"
    div = _divisor(w) if norm else 1.0
    if method.name == "task_arithmetic":
        return _fn("task_arithmetic")(base, members, lam=lam / div, weights=w)
    if method.name == "breadcrumbs" and uniform:
        return _fn("breadcrumbs")(base, members, lam=lam / div, density=d, gamma=gamma,
                                  scope="tensor", weights=w)
    if method.name == "dare_linear" and uniform and equal_w:
        return _fn("dare")(base, members, key=key, p=1 - d, lam=lam * c / div, rescale=rescale)
    ties = _ties_options(method, g)  # None unless TIES' election equals mergekit's here
    if ties is not None:
        if method.name == "ties":
            return _fn("ties")(base, members, density=d, scope="tensor", **ties)
        if method.name == "dare_ties":
            return _fn("dare")(base, members, key=key, p=1 - d, rescale=rescale, merge="ties",
                               density=1.0, scope="tensor", **ties)
        return _fn("breadcrumbs")(base, members, density=d, gamma=gamma, scope="tensor",
                                  merge="ties", **ties)
    return _merge_per_model(method, base, members, g, key)


def _ties_options(method: Method, g: Group) -> dict | None:
    """The keyword arguments (disjoint, zero_sign, lam) of mergejax's TIES election that
    `merge_group` uses for a sign-electing group, or None when it merges the group per model
    (several densities, or weights that are not one positive value)."""
    p, w = g.params, [m["weight"] for m in g.model_params]
    uniform = (len({m.get("density") for m in g.model_params}) == 1
               and len({m.get("gamma") for m in g.model_params}) == 1)
    if not (method.consensus and uniform and len(set(w)) == 1 and w[0] > 0):
        return None
    # Equal positive weights c: mergekit's weighted election equals TIES' and its divisor
    # (sum of agreeing weights) is c * count, so normalize is the disjoint mean.
    norm = p["normalize"]
    return dict(disjoint="mean" if norm else "sum", zero_sign="positive",
                lam=p["lambda"] if norm else p["lambda"] * w[0])


def ties_block(method: Method, base, members: Sequence, g: Group, thr, *,
               checked: bool = False):
    """One tensor (or row block) of a `ties` group with its trim thresholds given (`thr`: (T,)
    int32 bit patterns from a streamed select), merged by the same kernel and options as
    `merge_group` (`task_vectors.merge_block`): equal to trimming the members first and
    merging with density 1, bit for bit, without writing the trimmed members. None when
    `merge_group` would not call mergejax's `ties` on the group. Device arrays in, the merged
    block (the base's dtype) out; ValueError naming the input that has NaN/inf entries, unless
    `checked` (the threshold passes already proved these inputs finite:
    `thresholds.checked_global_thresholds`), which saves a read of every input."""
    from mergejax.methods import task_vectors as tv

    opts = _ties_options(method, g) if method.name == "ties" else None
    if opts is None:
        return None
    if not checked:
        named = [("the base", base)] + [(f"model {t}", m) for t, m in enumerate(members)]
        for who, ok in zip((n for n, _ in named), [tv.all_finite(x) for _, x in named]):
            if not bool(ok):
                raise ValueError(f"ties: {who} has non-finite values (NaN or inf)")
    return tv.merge_block(base, members, thresholds=thr, combine="ties-" + opts["disjoint"],
                          zero_sign=1.0, lam=opts["lam"], add_base=True, signs=False)[0]


def _merge_per_model(method: Method, base, members: list, g: Group, key):
    """mergekit's generalized task arithmetic where mergejax's methods take one density and no
    per-model weights: each task vector is sparsified alone with mergejax's sparsifier and its
    own density, then weighted, sign-elected on the weighted values (mergekit#474) and divided
    by the sum of the (agreeing) weights if `normalize`."""
    import jax

    from mergejax.methods import task_vectors as tv
    from mergejax.methods.breadcrumbs import breadcrumbs_mask
    from mergejax.methods.dare import dare_drop
    from mergejax.methods.ties import trim_topk

    sparse = []
    for i, (tau, mp) in enumerate(zip(tv.task_vectors(base, members), g.model_params)):
        if method.sparsify == "magnitude":
            tau = trim_topk([tau], mp["density"], scope="tensor")[0]
        elif method.sparsify == "random":
            # fold_in(key, i) is the key mergejax's dare gives model i: equal densities drop
            # the same entries on both code paths.
            tau = dare_drop([tau], p=1 - mp["density"], key=[jax.random.fold_in(key, i)],
                            rescale="l1" if g.params.get("rescale") else "none")[0]
        elif method.sparsify == "magnitude_outliers":
            tau = breadcrumbs_mask([tau], density=mp["density"], gamma=mp["gamma"],
                                   scope="tensor")[0]
        sparse.append(flatten(tau))
    w = [m["weight"] for m in g.model_params]
    out = {}
    for name, b in flatten(base).items():
        b = np.asarray(b)
        dt = np.dtype(tv.compute_dtype(b.dtype))
        xs = [np.asarray(s[name], dt) * dt.type(wi) for s, wi in zip(sparse, w)]
        if method.consensus:
            total = xs[0]
            for x in xs[1:]:
                total = total + x
            majority = np.where(total >= 0, 1, -1)  # mergekit: a zero sum elects +
            masks = [np.sign(x) == majority for x in xs]  # zeros never agree
            mixed = sum(np.where(m, x, dt.type(0)) for m, x in zip(masks, xs))
            divisor = sum(m * dt.type(wi) for m, wi in zip(masks, w)).astype(dt)
            divisor[divisor == 0] = 1
        else:
            mixed, divisor = sum(xs), dt.type(_divisor(w))
        if g.params["normalize"]:
            mixed = mixed / divisor
        out[name] = (b.astype(dt) + dt.type(g.params["lambda"]) * mixed).astype(b.dtype)
    return unflatten(out)


def _dtype(name: str | None):
    import jax.numpy as jnp

    # numpy alone has no bfloat16; jnp.dtype returns ml_dtypes' numpy dtype for it.
    return None if name is None else np.dtype(jnp.dtype(name))


def storage_dtype(recipe: Recipe, in_dtype) -> np.dtype:
    """The dtype a merged tensor is stored in: `out_dtype`, default the input's `in_dtype`."""
    return np.dtype(in_dtype) if recipe.out_dtype is None else _dtype(recipe.out_dtype)


def stored(value, recipe: Recipe, in_dtype):
    """A merged tensor as stored: in the compute dtype (`dtype`, as mergekit), then cast to
    `storage_dtype`. A jax array stays on its device (cast there: the caller checks and
    copies it once); anything else becomes a numpy array."""
    import jax

    if recipe.dtype:
        value = value.astype(_dtype(recipe.dtype))
    out = storage_dtype(recipe, in_dtype)
    if isinstance(value, jax.Array):
        return value.astype(out)
    with np.errstate(over="ignore"):  # an overflow is refused before writing
        return np.asarray(value).astype(out, copy=False)


def compute_dtype(recipe: Recipe, dtype) -> np.dtype:
    """The dtype `compute_cast` gives an array of `dtype`."""
    return np.dtype(dtype) if recipe.dtype is None else _dtype(recipe.dtype)


def compute_cast(recipe: Recipe, array):
    """`array` in the recipe's compute dtype (`dtype`), unchanged without one."""
    dt = _dtype(recipe.dtype)
    return array if dt is None else array.astype(dt)


def global_densities(recipe: Recipe, groups: Sequence[Group]) -> list[float] | None:
    """Per-member density of a `scope: global` trim (TIES paper), None for per-tensor trims.

    Also consensus with `merged: ties` (tall_masks' TIES trims the whole model). A whole-model
    top-k needs one density per model: RecipeError naming the model whose density varies over
    the tensors (gradient or filters)."""
    if not groups:
        return None
    if recipe.method.name == "consensus":
        if groups[0].params["merged"] != "ties":
            return None
    elif groups[0].params.get("scope", "tensor") != "global":
        return None
    elif len({g.params["scope"] for g in groups}) != 1:
        raise RecipeError("scope must be one value for the whole model (no filters)")
    out = []
    for i, m in enumerate(recipe.members):
        dens = sorted({g.model_params[i]["density"] for g in groups})
        if len(dens) != 1:
            raise RecipeError(f"scope: global trims each model over all its tensors, so it "
                              f"needs one density per model; {m.ref} has {len(dens)} "
                              f"({dens[0]} .. {dens[-1]}): drop the gradient/filters or use "
                              "scope: tensor")
        out.append(float(dens[0]))
    return out


def consensus_group(base: Mapping, members: Sequence[Mapping], g: Group, thr,
                    zero_sign: float) -> dict:
    """Consensus merging of one group's tensors ({name: array} of theta_0 and of each model)
    with the whole-model quantities given: `thr` the (T,) TIES trim thresholds of `merged:
    ties` (None for `sum`) and `zero_sign` TIES' whole-model majority sign (`majority_sign`).
    The kernels of `mergejax.methods.consensus`: equal to it bit for bit. Returns {name: leaf}
    in the base's dtypes (device arrays)."""
    import jax.numpy as jnp

    from mergejax.methods import task_vectors as tv
    from mergejax.methods.consensus import consensus_leaf

    p = g.params
    ties = p["merged"] == "ties"
    lams = jnp.asarray([mp["mask_lambda"] for mp in g.model_params], jnp.float32)
    out = {}
    for name, b in base.items():
        fs = tuple(m[name] for m in members)
        mtv = tv.merge_block(b, fs, thresholds=thr if ties else None,
                             combine="ties-sum" if ties else "sum", zero_sign=zero_sign,
                             add_base=False, signs=False)[0]
        out[name] = consensus_leaf(b, fs, mtv, lams, int(p["k"]), jnp.float32(p["lambda"]))
    return out


def sign_total(blocks, thr) -> np.ndarray:
    """[sum of positive, minus the sum of negative] elected-sign sums of TIES (trimmed with
    `thr`) over the (base, members) `blocks`: int64, summable over processes."""
    from mergejax.methods import task_vectors as tv

    pos = neg = 0
    for b, ms in blocks:
        s = int(tv.merge_block(b, ms, thresholds=thr, combine="ties-sum", add_base=False)[1])
        pos, neg = pos + max(s, 0), neg + max(-s, 0)
    return np.array([pos, neg], np.int64)


def majority_sign(total: np.ndarray) -> float:
    """TIES' zero-sign rule "majority" from `sign_total`: the sign of the summed signs."""
    return float(np.sign(int(total[0]) - int(total[1])))


def untrimmed(g: Group) -> Group:
    """`g` with density 1 for every member: the trim was already applied (`trim_to_base`)."""
    return Group(g.params, tuple({**mp, "density": 1.0} for mp in g.model_params), g.names)


def assign_tensors(recipes: Sequence[Recipe], names: Sequence[str]) -> list[list[str]]:
    """The tensor names each document merges: a tensor goes to the first document whose
    `tensors` substrings match it (no `tensors`: every tensor). RecipeError naming the tensors
    no document takes."""
    out: list[list[str]] = [[] for _ in recipes]
    missed = []
    for name in sorted(names):
        for i, r in enumerate(recipes):
            if r.tensors is None or any(t in name for t in r.tensors):
                out[i].append(name)
                break
        else:
            missed.append(name)
    if missed:
        raise RecipeError(f"no document's 'tensors' matches {len(missed)} tensor(s): "
                          f"{', '.join(missed[:10])}{' ...' if len(missed) > 10 else ''}; add "
                          "a last document without 'tensors' for the rest")
    return out


def merge_flats(recipes: Recipe | Sequence[Recipe], inputs: Mapping[Path, Flat], *,
                seed: int = 0) -> tuple[Flat, list[Group]]:
    """Merges in memory: `inputs` maps every model path the recipes read to its flat variables
    (identical trees). Returns (flat merged variables, the parameter groups in order).

    `seed` seeds DARE: group i (in `plan` order) of a one-document recipe uses
    `fold_in(jax.random.key(seed), i)`; document j of a multi-document recipe uses
    `fold_in(fold_in(key(seed), j), i)`.
    """
    import jax

    recipes = [recipes] if isinstance(recipes, Recipe) else list(recipes)
    entries = [e for r in recipes
               for e in ([r.base] if r.method.kind == "gta" else []) + r.members]
    check_same_trees([(e.ref, inputs[e.path]) for e in entries])
    in_dtypes = {k: v.dtype for k, v in inputs[entries[0].path].items()}
    root = jax.random.key(seed)
    out: Flat = {}
    all_groups: list[Group] = []
    for j, (recipe, names) in enumerate(zip(recipes, assign_tensors(recipes, sorted(in_dtypes)))):
        if not names:
            continue
        key = root if len(recipes) == 1 else jax.random.fold_in(root, j)

        def cast(flat: Flat, names=names, recipe=recipe) -> Flat:
            dt = _dtype(recipe.dtype)
            return {k: flat[k].astype(dt) if dt is not None else flat[k] for k in names}

        base = cast(inputs[recipe.base.path]) if recipe.method.kind == "gta" else None
        members = [cast(inputs[m.path]) for m in recipe.members]
        groups = plan(recipe, names)
        all_groups += groups
        dens = global_densities(recipe, groups)
        consensus = recipe.method.name == "consensus"
        thr, zero_sign = None, 1.0
        if dens is not None:  # whole-model trim: thresholds first
            from mergejax.recipe.thresholds import global_thresholds, trim_to_base

            def blocks(b=base, ms=members, ns=names):
                return ((b[n], [m[n] for m in ms]) for n in ns)

            thr = global_thresholds(blocks, dens, sum(int(np.size(base[n])) for n in names))
            if consensus:  # the masks need the untrimmed models
                zero_sign = majority_sign(sign_total(blocks(), thr))
            else:  # trimmed to base, then merged untrimmed
                members = [{n: np.asarray(trim_to_base(base[n], m[n], thr[t])) for n in names}
                           for t, m in enumerate(members)]
                groups = [untrimmed(g) for g in groups]
        for i, g in enumerate(groups):
            if consensus:
                merged = consensus_group({n: base[n] for n in g.names}, members, g, thr,
                                         zero_sign)
            else:
                def sub(flat, names=g.names):
                    return unflatten({n: flat[n] for n in names})

                merged = flatten(merge_group(recipe.method, None if base is None else sub(base),
                                             [sub(m) for m in members], g,
                                             jax.random.fold_in(key, i)))
            for name, value in merged.items():
                out[name] = np.asarray(stored(value, recipe, in_dtypes[name]))
    return out, all_groups


def merge(recipes: Recipe | Sequence[Recipe], *, seed: int = 0, allow_nonfinite: bool = False
          ) -> tuple[Flat, dict]:
    """Loads the inputs, plans and merges (`merge_flats`); returns (flat merged variables, info).

    `info` holds the plan summary and the input meta used for the output. Inputs must be
    floating point and finite unless `allow_nonfinite` (`checkpoint_io.read_model`).
    """
    recipes = [recipes] if isinstance(recipes, Recipe) else list(recipes)
    entries = [e for r in recipes
               for e in ([r.base] if r.method.kind == "gta" else []) + r.members]
    loaded: dict[Path, tuple[Flat, dict]] = {}
    for e in entries:
        if e.path not in loaded:
            loaded[e.path] = checkpoint_io.read_model(e.path, allow_nonfinite=allow_nonfinite)
    out, groups = merge_flats(recipes, {p: flat for p, (flat, _) in loaded.items()}, seed=seed)
    meta = loaded[entries[0].path][1]
    return out, {"groups": groups, "input_meta": meta, "seed": seed}
