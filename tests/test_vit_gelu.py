"""`mergejax.models.vit.gelu` (exact GELU in torch's erf form) against float64 and torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from mergejax.models.vit import ACTIVATIONS, gelu

X = np.linspace(-12.0, 12.0, 24001).astype(np.float32)


def test_gelu_equals_float64_and_its_gradient_is_phi_plus_x_pdf():
    x64 = X.astype(np.float64)
    cdf = 0.5 * (1.0 + erf(x64 / np.sqrt(2.0)))
    pdf = np.exp(-0.5 * x64 ** 2) / np.sqrt(2.0 * np.pi)
    np.testing.assert_allclose(np.asarray(jax.jit(gelu)(X)), x64 * cdf, rtol=0, atol=1.2e-6)
    grad = jax.jit(jax.vmap(jax.grad(gelu)))(X)
    np.testing.assert_allclose(np.asarray(grad), cdf + x64 * pdf, rtol=0, atol=2e-6)
    assert ACTIVATIONS["gelu"] is gelu
    # elementwise in the input's dtype, as flax's nn.gelu (no promotion of bf16 to float32)
    assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_gelu_equals_torch():
    torch = pytest.importorskip("torch")
    want = torch.nn.functional.gelu(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(X))), want, rtol=0, atol=1.2e-6)
