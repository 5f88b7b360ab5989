"""SLERP: spherical linear interpolation between two models, tensor by tensor (mergekit)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from mergejax.methods import task_vectors as tv
from mergejax.methods.registry import register

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _normalized(v, eps):
    n = jnp.linalg.norm(v)
    return jnp.where(n > eps, v / jnp.where(n > eps, n, 1), v)


def slerp_arrays(t, a, b, *, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS):
    """SLERP of two arrays treated as flat vectors (mergekit `slerp`, fusion_bench).

    dot = <a/|a|, b/|b|> (a vector with norm <= eps is left unnormalised); if |dot| >
    `dot_threshold` the vectors are (anti)parallel and the result is the lerp (1-t) a + t b,
    else with omega = arccos(dot): sin((1-t) omega)/sin(omega) a + sin(t omega)/sin(omega) b
    on the *unnormalised* arrays. t = 0 returns a and t = 1 returns b exactly.
    """
    dt = tv.compute_dtype(a.dtype)
    a32, b32 = a.astype(dt), b.astype(dt)
    t = jnp.asarray(t, dt)
    dot = jnp.sum(_normalized(a32.ravel(), eps) * _normalized(b32.ravel(), eps))
    lerp = (1 - t) * a32 + t * b32
    parallel = jnp.abs(dot) > dot_threshold
    omega = jnp.arccos(jnp.clip(jnp.where(parallel, 0, dot), -1, 1))
    sin_omega = jnp.sin(omega)
    s0 = jnp.sin(omega - omega * t) / sin_omega
    s1 = jnp.sin(omega * t) / sin_omega
    return jnp.where(parallel, lerp, s0 * a32 + s1 * b32).astype(a.dtype)


@partial(jax.jit, static_argnames=("dot_threshold", "eps"))
def _slerp_leaf(base, a, b, t, *, dot_threshold, eps):
    if base is None:
        return slerp_arrays(t, a, b, dot_threshold=dot_threshold, eps=eps)
    dt = tv.compute_dtype(base.dtype)
    mid = slerp_arrays(t, tv.tau(base, a), tv.tau(base, b), dot_threshold=dot_threshold,
                       eps=eps)
    return (base.astype(dt) + mid).astype(base.dtype)


@register("slerp", "weight_space",
          search={"t": tuple(round(0.1 * i, 1) for i in range(1, 10))},
          checks={"t": "[0, 1]", "of_task_vectors": (False, True), "dot_threshold": "[0, 1]",
                  "eps": "[0, inf)"})
def slerp(base, finetuned, *, key=None, t: float = 0.5, of_task_vectors: bool = False,
          dot_threshold: float = DOT_THRESHOLD, eps: float = EPS):
    """SLERP between exactly two fine-tuned models, per tensor: t = 0 -> finetuned[0],
    t = 1 -> finetuned[1].

    Args:
      base: **ignored by default** (mergekit's `slerp` interpolates its `base_model` with one
        other model; here both endpoints are the fine-tuned models, so the shared
        pre-trained base plays no role). May be None. With `of_task_vectors=True` the task
        vectors are interpolated instead and added back: theta_0 + slerp(t, tau_0, tau_1)
        (mergekit `nuslerp` with a base model).
      finetuned: exactly two trees.
      t: interpolation factor in [0, 1] (fusion_bench default 0.5).
      dot_threshold, eps: mergekit's constants (lerp fallback above |cos| 0.9995; vectors of
        norm <= 1e-8 are not normalised).
    """
    del key
    t = tv.check_range("t", t, 0, 1)
    tv.check_range("dot_threshold", dot_threshold, 0, 1)
    use_base = bool(of_task_vectors)
    if use_base and base is None:
        raise ValueError("slerp with of_task_vectors=True needs the base model")
    m = tv.prepare(base if use_base else None, finetuned, method="slerp", num_models=2)
    if base is not None and not use_base:
        # Ignored, but a mismatching base still signals a caller bug worth reporting.
        tv.prepare(base, finetuned, method="slerp", num_models=2, check_finite=False)
    tj = jnp.float32(t)
    return m.unflatten(tv.stream(lambda i: _slerp_leaf(
        *_leaf3(m, i), tj, dot_threshold=float(dot_threshold), eps=float(eps)), m.num_leaves))


def _leaf3(m, i):
    b, (x, y) = m.leaf(i)
    return b, x, y
