"""Compact Convolutional Transformer (Hassani et al., 2021), as in SHI-Labs/Compact-Transformers.

The layout of that repository's `CCT` (`src/cct.py`, `src/utils/tokenizer.py`,
`src/utils/transformers.py`), in eval mode (no dropout, no stochastic depth):

- tokenizer: `conv_layers` x [Conv2d(k x k, `stride`, `padding`, no bias) - ReLU -
  MaxPool(3, 2, 1)]; the intermediate convolutions have `conv_width` channels (the repository's
  `in_planes`, 64), the last one `width` (the embedding dimension); the map is flattened
  row-major into T tokens;
- positions added to the tokens: "learnable" (a parameter), "sine" (the repository's fixed
  sinusoidal table) or "none";
- `depth` encoder layers, each (note the post-attention norm that replaces the stream):

      x = x + attn(pre_norm(x));   x = norm1(x);   x = x + fc2(gelu(fc1(x)))

  with multi-head attention `proj(softmax(q k^T / sqrt(head_dim)) v)` whose q, k, v carry no
  bias (the repository's fused `qkv` is `Linear(D, 3D, bias=False)`);
- a final LayerNorm `norm`, sequence pooling `softmax_T(attention_pool(x))^T x` with
  `attention_pool` a Linear(D, 1), and the classifier `fc`.

LayerNorm epsilon 1e-5 (torch's default), exact-erf GELU (`F.gelu`), so converted checkpoints
give the torch logits. Initialisation as the repository: convolutions He-normal, Linear kernels
truncated normal (std 0.02) with zero biases, learnable positions normal (std 0.2).

Parameter names (torch's in brackets; `mergejax.converters.cct_layout` maps them):
`tokenizer/conv_{j}` [`tokenizer.conv_layers.{j}.0`], `positional_emb` (1, T, D)
[`classifier.positional_emb`], `blocks_{i}/pre_norm`, `blocks_{i}/attn/{q,k,v}` (kernels only)
and `blocks_{i}/attn/proj` [`classifier.blocks.{i}.self_attn.qkv` / `.proj`], `blocks_{i}/norm1`,
`blocks_{i}/mlp/{fc1,fc2}` [`linear1`, `linear2`], `norm`, `attention_pool`, `fc`. The fused
`qkv` is split into q, k and v for the same reason as in the ViT: one fused kernel would produce
two feature spaces on one axis. Head h owns channels h*head_dim:(h+1)*head_dim of q, k, v and of
proj's input.

The "sine" table is a parameter here too (torch keeps it as a `Parameter` with
`requires_grad=False`, saved in the state_dict): a permutation or merge of the residual stream
must move it with the stream, or the merged model would add unpermuted positions to permuted
features. Its gradient is stopped, as torch never trains it (an optimizer's weight decay still
acts on it).

Taps (see `mergejax.specs.architectures.cct_spec` for why these):
- `tokenizer/act_{j}` (B, H_j, W_j, C_j): convolution j after its ReLU and max-pool, what
  convolution j+1 reads (the last one is the token map of the stream);
- `stream` (B, T*(2*depth+1), D): the residual stream as the layers read it: the tokens with
  positions (block 0's input), and per block norm1's output (fc1's input, the stream the MLP adds
  to) and the block's output, concatenated along the token axis;
- `blocks_{i}/attn/qko` (B, 3T, D): queries, keys and the attention output (proj's input);
- `blocks_{i}/mlp/hidden` (B, T, mlp) post-GELU and `blocks_{i}/mlp/pre_hidden` fc1's output;
- `head_input` (B, D): the sequence-pooled features the classifier reads.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mergejax.models.base import BN_KWARGS, sow_rows
from mergejax.models.vit import attend, gelu

POSITIONAL = ("learnable", "sine", "none")
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which the repository keeps
_DENSE_INIT = nn.initializers.truncated_normal(0.02)


def layer_norm(name: str) -> nn.LayerNorm:
    """torch-equivalent LayerNorm (eps 1e-5, two-pass variance)."""
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


def dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
    """A Linear layer initialised as the repository's (truncated normal 0.02, zero bias)."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=_DENSE_INIT, name=name)


def sine_positions(tokens: int, dim: int) -> np.ndarray:
    """The repository's fixed table (1, tokens, dim) float32: position p, channel i holds
    sin (i even) or cos (i odd) of p / 10000^(2*(i//2)/dim); the angle is rounded to float32
    before the sine, as torch builds it."""
    p = np.arange(tokens, dtype=np.float64)[:, None]
    i = np.arange(dim)[None, :]
    angle = (p / 10000.0 ** (2 * (i // 2) / dim)).astype(np.float32)
    table = np.where(i % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)
    return table[None]


class Attention(nn.Module):
    """Multi-head self-attention: q, k, v (no bias, as the repository's `qkv`) and `proj`."""

    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        q, k, v = (dense(d, n, use_bias=False)(x) for n in ("q", "k", "v"))
        out = attend(q, k, v, self.heads)  # ViT's, head h on channels h*hd:(h+1)*hd
        sow_rows(self, "qko", (q, k, out))
        return dense(d, "proj")(out)


class Mlp(nn.Module):
    """fc1 - GELU (exact erf) - fc2 (the repository's linear1, linear2)."""

    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(self.hidden, "fc1")(x)
        self.sow("intermediates", "pre_hidden", h)
        h = gelu(h)
        self.sow("intermediates", "hidden", h)
        return dense(x.shape[-1], "fc2")(h)


class Block(nn.Module):
    """The repository's TransformerEncoderLayer. Returns (norm1's output, the block's output)."""

    heads: int
    mlp_hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x + Attention(self.heads, name="attn")(layer_norm("pre_norm")(x))
        x = layer_norm("norm1")(x)
        return x, x + Mlp(self.mlp_hidden, name="mlp")(x)


class Tokenizer(nn.Module):
    """`len(channels)` x [conv (no bias) - ReLU - max-pool]; NHWC in, NHWC out."""

    channels: tuple[int, ...]
    kernel_size: int
    stride: int
    padding: int
    pool_kernel: int
    pool_stride: int
    pool_padding: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel_size, self.stride, self.padding
        pk, ps, pp = self.pool_kernel, self.pool_stride, self.pool_padding
        for j, c in enumerate(self.channels):
            x = nn.Conv(c, (k, k), strides=(s, s), padding=((p, p), (p, p)), use_bias=False,
                        kernel_init=nn.initializers.kaiming_normal(), name=f"conv_{j}")(x)
            # max_pool pads with -inf, as torch's MaxPool2d
            x = nn.max_pool(nn.relu(x), (pk, pk), strides=(ps, ps), padding=((pp, pp), (pp, pp)))
            self.sow("intermediates", f"act_{j}", x)
        return x


class CCT(nn.Module):
    """CCT with embedding width `width` (the repository's `embedding_dim`), `depth` encoder
    layers (`num_layers`) of `heads` heads, MLP width `int(width * mlp_ratio)`, and a tokenizer of
    `conv_layers` convolutions (`n_conv_layers`) of size `kernel_size`; intermediate convolutions
    have `conv_width` channels (`in_planes`). `stride` / `padding` None follow the repository:
    max(1, k//2 - 1) and max(1, k//2)."""

    num_classes: int = 10
    width: int = 128
    depth: int = 2
    heads: int = 2
    mlp_ratio: float = 1.0
    conv_layers: int = 2
    kernel_size: int = 3
    stride: int | None = None
    padding: int | None = None
    conv_width: int = 64
    pool_kernel: int = 3
    pool_stride: int = 2
    pool_padding: int = 1
    positional: str = "learnable"
    bn_momentum: float = BN_KWARGS["momentum"]  # unused (no BatchNorm); uniform Model surface

    @property
    def mlp_hidden(self) -> int:
        """Width of every block's MLP hidden layer."""
        return int(self.width * self.mlp_ratio)

    @property
    def conv_channels(self) -> tuple[int, ...]:
        """Output channels of each tokenizer convolution (the last is the embedding width)."""
        return (self.conv_width,) * (self.conv_layers - 1) + (self.width,)

    @property
    def conv_stride(self) -> int:
        """The tokenizer convolutions' stride (`stride`, or the repository's default)."""
        return self.stride if self.stride is not None else max(1, self.kernel_size // 2 - 1)

    @property
    def conv_padding(self) -> int:
        """The tokenizer convolutions' padding (`padding`, or the repository's default)."""
        return self.padding if self.padding is not None else max(1, self.kernel_size // 2)

    def grid(self, size: int) -> int:
        """Side of the token grid for an image side `size` (tokens: its square for a square
        image), through every convolution and max-pool (torch's floor arithmetic)."""
        k, s, p = self.kernel_size, self.conv_stride, self.conv_padding
        for _ in range(self.conv_layers):
            size = (size + 2 * p - k) // s + 1
            size = (size + 2 * self.pool_padding - self.pool_kernel) // self.pool_stride + 1
        return size

    def __post_init__(self):
        super().__post_init__()
        self.check()

    def check(self) -> None:
        """Raises ValueError for inconsistent sizes (at construction, before any parameter)."""
        if self.positional not in POSITIONAL:
            raise ValueError(f"CCT positional must be one of {POSITIONAL}, got "
                             f"{self.positional!r}")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"CCT width {self.width} must be a multiple of heads {self.heads}")
        if min(self.depth, self.conv_layers, self.kernel_size, self.mlp_hidden,
               self.conv_width) < 1:
            raise ValueError(f"CCT needs depth, conv_layers, kernel_size, conv_width and width * "
                             f"mlp_ratio >= 1, got depth {self.depth}, conv_layers "
                             f"{self.conv_layers}, kernel_size {self.kernel_size}, conv_width "
                             f"{self.conv_width}, mlp width {self.mlp_hidden}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout, no BatchNorm: train and eval compute the same
        x = Tokenizer(self.conv_channels, self.kernel_size, self.conv_stride, self.conv_padding,
                      self.pool_kernel, self.pool_stride, self.pool_padding, name="tokenizer")(x)
        x = x.reshape(x.shape[0], -1, self.width)  # (B, H*W, D), row-major like torch's flatten
        shape = (1, x.shape[1], self.width)
        if self.positional == "learnable":
            x = x + self.param("positional_emb", nn.initializers.normal(0.2), shape)
        elif self.positional == "sine":
            table = self.param("positional_emb", lambda _, s: jnp.asarray(sine_positions(*s[1:])),
                               shape)
            x = x + jax.lax.stop_gradient(table)  # fixed in torch (requires_grad=False)
        stream = [x]
        for i in range(self.depth):
            normed, x = Block(self.heads, self.mlp_hidden, name=f"blocks_{i}")(x)
            stream += [normed, x]
        sow_rows(self, "stream", stream)
        x = layer_norm("norm")(x)
        weights = jax.nn.softmax(dense(1, "attention_pool")(x), axis=1)  # (B, T, 1) over tokens
        x = jnp.einsum("bto,btd->bd", weights, x)
        self.sow("intermediates", "head_input", x)
        return dense(self.num_classes, "fc")(x)
