"""`mergejax.models.vit.attend` (custom backward) against torch autograd of the same attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.models.vit import attend


def torch_attention(q, k, v, heads, w):
    """Value and (dq, dk, dv) of sum(w * attention(q, k, v)) by torch autograd, float64."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    b, t, d = q.shape
    ts = [torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True) for a in (q, k, v)]
    split = lambda y: y.view(b, t, heads, d // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(*(split(y) for y in ts)).transpose(1, 2).reshape(b, t, d)
    loss = (out * torch.tensor(np.asarray(w), dtype=torch.float64)).sum()
    loss.backward()
    return out.detach().numpy(), [y.grad.numpy() for y in ts]


@pytest.mark.parametrize("shape, heads", [((2, 7, 12), 3), ((3, 5, 8), 1), ((2, 49, 32), 4)])
def test_attend_and_its_gradients_equal_torch_autograd(shape, heads):
    q, k, v, w = (np.asarray(jax.random.normal(jax.random.key(i), shape)) * 2 for i in range(4))
    want_out, want_grads = torch_attention(q, k, v, heads, w)
    out = jax.jit(attend, static_argnums=3)(q, k, v, heads)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * attend(q, k, v, heads)), (0, 1, 2)))(
        q, k, v)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_per_example_gradients_under_vmap_equal_one_example_at_a_time():
    q, k, v = (jax.random.normal(jax.random.key(i), (3, 6, 8)) for i in range(3))
    loss = lambda q, k, v: jnp.sum(attend(q[None], k[None], v[None], 2) ** 2)
    batched = jax.vmap(jax.grad(loss, (0, 1, 2)))(q, k, v)
    for i in range(3):
        one = jax.grad(loss, (0, 1, 2))(q[i], k[i], v[i])
        for got, want in zip(batched, one):
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_large_scores_neither_overflow_nor_lose_the_softmax():
    """Scores in the thousands: the primal (normalised after the product with v) still
    subtracts the row maximum, so it stays finite and equals torch's."""
    shape, heads = (2, 9, 8), 2
    q, k, v, w = (np.asarray(jax.random.normal(jax.random.key(i), shape)) for i in range(4))
    q = q * 300.0
    want_out, _ = torch_attention(q, k, v, heads, w)
    out = np.asarray(jax.jit(attend, static_argnums=3)(q, k, v, heads))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-5)
