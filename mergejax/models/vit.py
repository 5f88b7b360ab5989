"""Vision Transformer (Dosovitskiy et al., 2021) in timm's pre-norm layout, q/k/v kept separate.

Patch embedding (a `patch` x `patch` convolution with stride `patch`), a class token (pooling
"cls") or none (pooling "mean"), learned position embeddings, `depth` pre-norm blocks

    x = x + attn(norm1(x)),   attn = proj(softmax(q k^T / sqrt(head_dim)) v)   (`heads` heads)
    x = x + fc2(gelu(fc1(norm2(x))))

and a final LayerNorm `norm` before the head. With "cls" pooling `norm` acts on every token and
the head reads the class token (timm's default); with "mean" pooling there is no class token and
`norm` acts on the token average (timm's `global_pool="avg"` `fc_norm`). LayerNorm epsilon 1e-6 and
exact-erf GELU as timm and torch, so converted checkpoints give the torch logits. No dropout.

Options for the other published layouts (defaults are timm's; `mergejax.models` registers
torchvision's and open_clip's named sizes):
- `ln_eps`: LayerNorm epsilon (open_clip 1e-5);
- `ln_pre`: a LayerNorm `ln_pre` on the tokens after adding the positions, before the blocks
  (open_clip / OpenAI CLIP);
- `patch_bias`: the patch convolution has a bias (open_clip's `conv1` has none);
- `head_bias`: the head has a bias (open_clip's `proj` is a bare (D, out) matrix);
- `act`: the MLP nonlinearity, "gelu" (exact erf) or "quick_gelu" x * sigmoid(1.702 x)
  (OpenAI's CLIP weights).

Parameter names follow timm (`patch_embed`, `cls_token` (1, 1, D), `pos_embed` (1, T, D),
`blocks_{i}/norm1`, `blocks_{i}/attn/{q,k,v,proj}`, `blocks_{i}/norm2`, `blocks_{i}/mlp/{fc1,fc2}`,
`norm`, `head`), with timm's fused `qkv` split into `q`, `k`, `v`: a fused kernel would produce
two feature spaces (query/key and value/output) on one axis, which a merge spec cannot express.
Head h owns the contiguous channels h*head_dim:(h+1)*head_dim of q, k, v and proj's input.

Taps (see `mergejax.specs.architectures.vit_spec` for why these):
- `stream` (B, T*(depth+1), D): the residual stream after the embedding (after `ln_pre` if
  set: what the first block reads) and after every block, all tokens, concatenated along the
  token axis;
- `blocks_{i}/attn/qko` (B, 3T, D): the queries, the keys and the attention output (heads
  concatenated, proj's input), concatenated along the token axis: the block's one attention space
  is produced by q, k and v and consumed by proj, so its statistics see every role;
- `blocks_{i}/mlp/hidden` (B, T, mlp) post-GELU and `blocks_{i}/mlp/pre_hidden` fc1's output;
- `head_input` (B, D): the pooled, normalised features the head reads (MuDSC's stream tap).

`stream` and `qko` are sown as row parts (`mergejax.models.base.sow_rows`): `Model.features`
returns the concatenations above, `Model.feature_parts` the parts, which statistics fold one by
one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mergejax.models.base import BN_KWARGS, sow_rows

POOLS = ("cls", "mean")
LN_EPS = 1e-6  # timm's and torchvision's LayerNorm epsilon (open_clip: 1e-5)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2))), elementwise (any shape).

    torch's formula (`F.gelu`'s CPU kernel computes exactly this), rather than `nn.gelu`'s
    `0.5 x erfc(-x / sqrt(2))`: XLA:CPU evaluates erfc with both of its branches (an exp and a
    division each), erf with one polynomial, so this form is 2.5x faster on a 128 x 49 x 64
    block (0.41 -> 0.16 ms, one core). Against float64 it is within 1.1e-6 absolute everywhere
    (`nn.gelu`: 4e-7); for x < -3, where 1 + erf cancels, its relative error reaches 3e-4 of
    values of ~1e-3 (absolute error below 8e-7), as in torch."""
    # a Python (weakly typed) constant: the result keeps x's dtype, as nn.gelu's does
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


# MLP nonlinearities by name: exact GELU (timm, torchvision, open_clip) and OpenAI CLIP's
# QuickGELU, which its published weights were trained with.
ACTIVATIONS = {
    "gelu": gelu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def layer_norm(name: str, eps: float = LN_EPS) -> nn.LayerNorm:
    """torch-equivalent LayerNorm (epsilon `eps`, two-pass variance)."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Scaled dot-product attention of `heads` heads on (B, T, D) queries, keys and values;
    head h owns channels h*D/heads:(h+1)*D/heads. Returns the heads' outputs (B, T, D)."""
    b, t, d = q.shape
    hd = d // heads
    split = lambda y: y.reshape(b, t, heads, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    # the scale on q (B x T x D numbers) rather than on the scores (B x H x T x T)
    out = _attention(split(q * hd ** -0.5), split(k), split(v))
    return out.transpose(0, 2, 1, 3).reshape(b, t, d)


# Attention on heads-first (B, H, T, hd) arrays with a hand-written backward. Why: on XLA:CPU
# (YNNPACK) a batched dot is fast when its left operand contracts its last axis; autodiff's
# transposes of the forward dots contract the token axis of the (T, T) weights instead, ~2x
# slower at the tiny ViT's shapes, and the softmax backward makes more passes over (T, T).
# `_attention_bwd` writes every dot with the left operand contracting its last axis (the small
# (T, hd) operands transposed, never the (T, T) ones) and uses sum_k P dP = sum_d dO O (O = P V)
# for the softmax. At the tiny ViT's shapes the attention's forward + backward is 1.7x faster
# than autodiff of two einsums (bench/RESULTS.md, FS-Merge step section). Equal to autodiff to
# float32 rounding (1e-14 in float64); reverse mode only: jax.jvp through it is not supported.


def _bdot(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    """Batched (over the leading B, H axes) product contracting a's `a_axis` with b's `b_axis`."""
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((0, 1), (0, 1))))


@jax.custom_vjp
def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v over (B, H, T, hd) arrays, q already scaled: (B, H, T, hd).

    Without differentiation the softmax is normalised after the product with v: the division
    then acts on (T, hd) numbers instead of (T, T). The same function to float32 rounding; at
    the tiny ViT's shapes it makes the attention ~10% faster and a one-core statistics
    collection 7% faster (bench/RESULTS.md). Under `jax.grad` `_attention_fwd` runs instead,
    since the backward needs the normalised weights."""
    scores = _bdot(q, k, 3, 3)  # (B, H, Tq, Tk)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    return _bdot(weights, v, 3, 2) / jnp.sum(weights, axis=-1, keepdims=True)


def _attention_fwd(q, k, v):
    p = jax.nn.softmax(_bdot(q, k, 3, 3), axis=-1)  # (B, H, Tq, Tk)
    out = _bdot(p, v, 3, 2)
    return out, (q, k, v, out, p)


def _attention_bwd(res, d_out):
    q, k, v, out, p = res
    d_scores = p * (_bdot(d_out, v, 3, 3) - jnp.sum(d_out * out, axis=-1, keepdims=True))
    dq = _bdot(d_scores, k, 3, 2)
    dk = _bdot(q.swapaxes(2, 3), d_scores, 3, 2).swapaxes(2, 3)  # (hd, Tk), then (Tk, hd)
    dv = _bdot(d_out.swapaxes(2, 3), p, 3, 2).swapaxes(2, 3)
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections and the output `proj`."""

    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        q, k, v = (nn.Dense(d, name=n)(x) for n in ("q", "k", "v"))
        out = attend(q, k, v, self.heads)
        sow_rows(self, "qko", (q, k, out))
        return nn.Dense(d, name="proj")(out)


class Mlp(nn.Module):
    """fc1 - `act` (an ACTIVATIONS name; exact-erf GELU by default) - fc2."""

    hidden: int
    act: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.hidden, name="fc1")(x)
        self.sow("intermediates", "pre_hidden", h)
        h = ACTIVATIONS[self.act](h)
        self.sow("intermediates", "hidden", h)
        return nn.Dense(x.shape[-1], name="fc2")(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    heads: int
    mlp_hidden: int
    act: str = "gelu"
    ln_eps: float = LN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.heads, name="attn")(layer_norm("norm1", self.ln_eps)(x))
        mlp = Mlp(self.mlp_hidden, self.act, name="mlp")
        return x + mlp(layer_norm("norm2", self.ln_eps)(x))


class ViT(nn.Module):
    """ViT of embedding width `width`, `depth` blocks of `heads` heads, `patch` x `patch`
    patches, MLP width `width * mlp_ratio`, pooling "cls" or "mean"; `ln_eps`, `ln_pre`,
    `patch_bias`, `head_bias`, `act` as in the module docstring."""

    num_classes: int = 10
    width: int = 64
    depth: int = 4
    heads: int = 4
    patch: int = 4
    mlp_ratio: float = 4.0
    pool: str = "cls"
    ln_eps: float = LN_EPS
    ln_pre: bool = False
    patch_bias: bool = True
    head_bias: bool = True
    act: str = "gelu"
    bn_momentum: float = BN_KWARGS["momentum"]  # unused (no BatchNorm); uniform Model surface

    @property
    def mlp_hidden(self) -> int:
        """Width of every block's MLP hidden layer."""
        return int(self.width * self.mlp_ratio)

    def __post_init__(self):
        super().__post_init__()
        self.check()

    def check(self) -> None:
        """Raises ValueError for inconsistent sizes (at construction, before any parameter)."""
        if self.pool not in POOLS:
            raise ValueError(f"ViT pool must be one of {POOLS}, got {self.pool!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"ViT act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        if not self.ln_eps > 0:
            raise ValueError(f"ViT ln_eps must be > 0, got {self.ln_eps!r}")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"ViT width {self.width} must be a multiple of heads {self.heads}")
        if self.depth < 1 or self.patch < 1 or self.mlp_hidden < 1:
            raise ValueError(f"ViT needs depth, patch and width * mlp_ratio >= 1, got depth "
                             f"{self.depth}, patch {self.patch}, mlp width {self.mlp_hidden}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout, no BatchNorm: train and eval compute the same
        if x.shape[1] % self.patch or x.shape[2] % self.patch:
            raise ValueError(f"ViT: image size {x.shape[1:3]} is not a multiple of the patch "
                             f"size {self.patch}")
        x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                    padding="VALID", use_bias=self.patch_bias, name="patch_embed")(x)
        x = x.reshape(x.shape[0], -1, self.width)  # (B, H/p * W/p, D), row-major like timm
        if self.pool == "cls":
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
        x = x + pos
        if self.ln_pre:  # open_clip: the blocks read the normalised embedding
            x = layer_norm("ln_pre", self.ln_eps)(x)
        stream = [x]
        for i in range(self.depth):
            x = Block(self.heads, self.mlp_hidden, self.act, self.ln_eps, name=f"blocks_{i}")(x)
            stream.append(x)
        sow_rows(self, "stream", stream)
        if self.pool == "cls":
            x = layer_norm("norm", self.ln_eps)(x)[:, 0]
        else:
            x = layer_norm("norm", self.ln_eps)(x.mean(axis=1))
        self.sow("intermediates", "head_input", x)
        return nn.Dense(self.num_classes, use_bias=self.head_bias, name="head")(x)
