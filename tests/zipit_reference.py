"""ZipIt!'s merging pipeline written plainly in PyTorch, from the paper's definitions.

The reference that `tests/test_zipit_parity.py` compares mergejax against image for image, and
the baseline of `bench/bench_pipeline.py`. Test / bench code only. It calls nothing of mergejax
(the callers convert mergejax endpoints to torch state_dicts with `mergejax.converters.to_torch`
so that both sides merge the same weights); its ResNet-20 is the ZipIt! repository's layout from
`tests/converters/torch_models.py`, and its merge points are written out here from that layout.

The pipeline (ZipIt!, Stoica, Bolya et al., ICLR 2024; its evaluation scripts for the order):

1. `reset_bn`: optionally, the endpoints' BatchNorm statistics are recomputed first: every
   BatchNorm gets `momentum=None` and `reset_running_stats()`, the model runs in train mode over
   the batches (torch's cumulative average: every batch weighs the same, each with its unbiased
   variance).
2. `feature_statistics`: at every merge point the features of all models are concatenated along
   the channel axis (model m's channels are rows m*n:(m+1)*n); every spatial position of every
   image is one sample. Per batch, the sum of x and the sum of outer products x x^T are added to
   float64 accumulators; then cov = E[x x^T] - mu mu^T and corr = cov / clamp(sd sd^T, 1e-7)
   with sd = sqrt(diag(cov)) (`compute_correlation`), cast to float32 like ZipIt!'s tensors.
3. Matching, per merge point, from the float32 correlation:
   * `zipit_match`: the greedy zip. Repeatedly take the most correlated pair (i, j), i < j, of
     the remaining features (the first maximum of the flattened matrix, i.e. row-major order,
     diagonal excluded), merge j into i, and delete j's row and column. The merged feature's
     similarity to every other feature is alpha * min(S[i, k], S[j, k]). Pairs within one model
     are allowed: each model has a budget of int((O - n) // N * beta + 1e-4) such merges, and
     once a model's budget reaches 0 every similarity between two of its remaining features
     becomes -inf. A merged feature belongs to the model of its lower index. Stops at n
     features. Only alpha > 0 (the damping rule) is implemented.
   * `permute_match`: scipy's `linear_sum_assignment` of model 1 onto model 0 on the cross block
     corr[:n, n:] (maximised).
   * `identity_match`: feature k of every model averaged (plain weight averaging).
   All give an unmerge U (N*n, n) of 0/1 and merge M = (U / (colsum(U) + 1e-5)).T (n, N*n)
   (identity: U.T / N).
4. `merge_state_dicts`: every trunk tensor becomes W* = sum_i M_i W_i U_i (M_i on the output
   channels, U_i on the input channels; BatchNorm tensors are 1-D outputs); every model keeps
   its own head, which consumes the merged last stream through its unmerge block: W_i U_i.
5. `reset_bn` of the merged model (shared trunk, per-task heads).
6. `evaluate`: joint accuracy (softmax per head, argmax over all heads' classes), per-task
   accuracy (argmax over the task's classes) and their mean.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "converters"))
from torch_models import ZipItResNet  # noqa: E402

Transform = tuple[torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------ the model
def merge_points(blocks_per_stage: int = 3) -> list[str]:
    """Merge points of ZipIt!'s ResNet in depth order: per stage its blocks' inner channels,
    then the stage's residual stream (stem and every block of the stage write it)."""
    out = []
    for stage in (1, 2, 3):
        out += [f"layer{stage}_{b}/inner" for b in range(blocks_per_stage)]
        out.append(f"stream{stage}")
    return out


def tensor_spaces(blocks_per_stage: int = 3) -> dict[str, tuple[str | None, str | None]]:
    """Per trunk state_dict key, (space of dim 0 = output, space of dim 1 = input or None)."""
    out: dict[str, tuple[str | None, str | None]] = {"conv1.weight": ("stream1", None)}
    bn = ("weight", "bias", "running_mean", "running_var")
    out.update({f"bn1.{k}": ("stream1", None) for k in bn})
    for stage in (1, 2, 3):
        stream, prev = f"stream{stage}", f"stream{stage - 1}"
        for b in range(blocks_per_stage):
            t, inner = f"layer{stage}.{b}", f"layer{stage}_{b}/inner"
            src = prev if (stage > 1 and b == 0) else stream
            out[f"{t}.conv1.weight"] = (inner, src)
            out.update({f"{t}.bn1.{k}": (inner, None) for k in bn})
            out[f"{t}.conv2.weight"] = (stream, inner)
            out.update({f"{t}.bn2.{k}": (stream, None) for k in bn})
            if stage > 1 and b == 0:
                out[f"{t}.shortcut.0.weight"] = (stream, prev)
                out.update({f"{t}.shortcut.1.{k}": (stream, None) for k in bn})
    return out


class MultiHead(nn.Module):
    """A ZipIt! ResNet trunk with one linear head per task (a merged model)."""

    def __init__(self, depth: int, width: int, head_sizes: Sequence[int]):
        super().__init__()
        self.trunk = ZipItResNet(depth, width, 1)
        self.trunk.linear = nn.Identity()  # the trunk returns pooled features
        self.heads = nn.ModuleList(nn.Linear(64 * width, k) for k in head_sizes)

    def forward(self, x):
        feats = self.trunk(x)
        return [h(feats) for h in self.heads]


def endpoint(state_dict: dict, depth: int, width: int, num_classes: int) -> ZipItResNet:
    """A torch ResNet in eval mode with `state_dict` (numpy or torch tensors) loaded."""
    model = ZipItResNet(depth, width, num_classes)
    model.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state_dict.items()})
    return model.eval()


def _taps(trunk: ZipItResNet, store: dict) -> list:
    """Forward hooks writing every merge point's features (B, C, H, W) into `store`."""
    hooks = []
    for stage in (1, 2, 3):
        layer = getattr(trunk, f"layer{stage}")
        for b, block in enumerate(layer):
            def inner(_m, _inp, out, name=f"layer{stage}_{b}/inner"):
                store[name] = F.relu(out)  # the block applies relu(bn1(.)) functionally
            hooks.append(block.bn1.register_forward_hook(inner))

        def stream(_m, _inp, out, name=f"stream{stage}"):
            store[name] = out
        hooks.append(layer.register_forward_hook(stream))
    return hooks


def nchw(images: np.ndarray) -> torch.Tensor:
    """NHWC numpy images as an NCHW float32 torch tensor."""
    x = np.asarray(images, np.float32).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


# ------------------------------------------------------------------------------ 1. BN reset
@torch.no_grad()
def reset_bn(model: nn.Module, batches: Iterable[np.ndarray]) -> nn.Module:
    """ZipIt!'s `reset_bn_stats`: momentum=None, reset, train-mode passes; returns it in eval."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    for x in batches:
        model(nchw(x))
    return model.eval()


# ------------------------------------------------------------------------------ 2. statistics
@torch.no_grad()
def feature_statistics(models: Sequence[ZipItResNet], batches: Iterable[np.ndarray],
                       points: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Per merge point `{"mean", "cov" (float64), "corr" (float32)}` of the models' features."""
    stores = [{} for _ in models]
    hooks = [h for m, s in zip(models, stores) for h in _taps(m, s)]
    sums: dict[str, list] = {}
    try:
        for x in batches:
            x = nchw(x)
            for m in models:
                m(x)
            for p in points:
                f = torch.cat([s[p] for s in stores], dim=1)  # (B, N*n, H, W)
                f = f.transpose(0, 1).reshape(f.shape[1], -1).double()  # (N*n, B*H*W)
                s_x, s_xx, count = sums.get(p, (0.0, 0.0, 0))
                sums[p] = (s_x + f.sum(1), s_xx + f @ f.T, count + f.shape[1])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for p, (s_x, s_xx, count) in sums.items():
        mean = s_x / count
        cov = s_xx / count - torch.outer(mean, mean)
        cov = (cov + cov.T) / 2
        sd = torch.diagonal(cov).clamp(min=0).sqrt()
        corr = cov / torch.clamp(torch.outer(sd, sd), min=1e-7)
        out[p] = {"mean": mean, "cov": cov, "corr": corr.float()}
    return out


# ------------------------------------------------------------------------------ 3. matching
def _from_unmerge(unmerge: torch.Tensor) -> Transform:
    merge = (unmerge / (unmerge.sum(dim=0, keepdim=True) + 1e-5)).T
    return merge, unmerge


def zipit_match(corr: torch.Tensor, alpha: float, beta: float, num_models: int = 2
                ) -> Transform:
    """The greedy zip (module docstring, step 3) on a float32 (N*n, N*n) correlation."""
    if alpha <= 0:
        raise NotImplementedError("the reference implements the alpha > 0 (damping) rule only")
    sims = corr.clone().float()
    big_o = sims.shape[0]
    n = big_o // num_models
    sims.fill_diagonal_(-torch.inf)
    members = [[k] for k in range(big_o)]  # current features, each a list of original ones
    origin = [k // n for k in range(big_o)]
    budget = [int((big_o - n) // num_models * beta + 1e-4)] * num_models
    while len(members) > n:
        r, c = divmod(int(torch.argmax(sims)), sims.shape[1])  # first max, row-major
        i, j = min(r, c), max(r, c)
        keep = [k for k in range(len(members)) if k != j]
        row = torch.minimum(sims[i], sims[j]) * alpha
        col = torch.minimum(sims[:, i], sims[:, j]) * alpha
        sims[i], sims[:, i] = row, col
        sims[i, i] = -torch.inf
        sims = sims[keep][:, keep]
        members[i] = members[i] + members[j]
        same = origin[i] == origin[j]
        del members[j], origin[j]
        if same:
            o = origin[i]
            budget[o] -= 1
            if budget[o] <= 0:
                mine = torch.tensor([g == o for g in origin])
                sims[mine[:, None] & mine[None, :]] = -torch.inf
    unmerge = torch.zeros(big_o, n)
    for c, group in enumerate(members):
        unmerge[group, c] = 1.0
    return _from_unmerge(unmerge)


def permute_match(corr: torch.Tensor, num_models: int = 2) -> Transform:
    """Model 1 assigned onto model 0 by scipy on the cross-correlation block (maximised)."""
    if num_models != 2:
        raise NotImplementedError("the reference permutes two models")
    n = corr.shape[0] // 2
    rows, cols = scipy.optimize.linear_sum_assignment(corr[:n, n:].numpy(), maximize=True)
    eye = torch.eye(n)
    return _from_unmerge(torch.cat([eye, eye[torch.as_tensor(cols[np.argsort(rows)])].T]))


def identity_match(n: int, num_models: int = 2) -> Transform:
    """Plain averaging: U = [I; ...; I], M = U.T / N."""
    unmerge = torch.eye(n).repeat(num_models, 1)
    return unmerge.T / num_models, unmerge


# ------------------------------------------------------------------------------ 4. merge
def merge_state_dicts(state_dicts: Sequence[dict], transforms: dict[str, Transform],
                      blocks_per_stage: int = 3) -> tuple[dict, list[dict]]:
    """(trunk state_dict, per-model head state_dicts {weight, bias}) of the merged model."""
    n_models = len(state_dicts)
    sds = [{k: torch.as_tensor(v) for k, v in sd.items()} for sd in state_dicts]

    def block(space, i, unmerge):
        merge, un = transforms[space]
        n = un.shape[0] // n_models
        return un[i * n:(i + 1) * n] if unmerge else merge[:, i * n:(i + 1) * n]

    trunk = {}
    for key, (out_space, in_space) in tensor_spaces(blocks_per_stage).items():
        total = 0.0
        for i, sd in enumerate(sds):
            w = sd[key].double()
            w = torch.tensordot(block(out_space, i, False).double(), w, dims=1)
            if in_space is not None:  # (O, I, kh, kw): unmerge the input channels
                w = torch.einsum("oikl,ic->ockl", w, block(in_space, i, True).double())
            total = total + w
        trunk[key] = total.float()
    for key in sds[0]:
        if key.endswith("num_batches_tracked"):
            trunk[key] = torch.zeros((), dtype=torch.long)
    heads = [{"weight": (sd["linear.weight"].double()
                         @ block("stream3", i, True).double()).float(),
              "bias": sd["linear.bias"].clone()} for i, sd in enumerate(sds)]
    return trunk, heads


def merged_model(trunk: dict, heads: Sequence[dict], depth: int, width: int) -> MultiHead:
    """The merged trunk with its heads, in eval mode."""
    model = MultiHead(depth, width, [len(h["bias"]) for h in heads])
    model.trunk.load_state_dict(trunk)
    for module, h in zip(model.heads, heads):
        module.load_state_dict(h)
    return model.eval()


# ------------------------------------------------------------------------------ 6. evaluate
@torch.no_grad()
def head_logits(model: nn.Module, images: np.ndarray, batch_size: int = 256
                ) -> list[np.ndarray]:
    """Eval-mode logits of every head (a ZipItResNet is one head) on NHWC `images`."""
    outs = []
    for start in range(0, len(images), batch_size):
        out = model(nchw(images[start:start + batch_size]))
        outs.append([o.numpy() for o in (out if isinstance(out, list) else [out])])
    return [np.concatenate(parts) for parts in zip(*outs)]


def evaluate(logits: Sequence[np.ndarray], tasks: Sequence[Sequence[int]], labels: np.ndarray
             ) -> dict:
    """ZipIt!'s metrics for heads `logits[h]` (N, len(tasks[h])) on examples with `labels`.

    Returns accuracies and the predictions they count: `joint_pred` (global class, argmax of
    the concatenated per-head softmax) on every example, `task_pred[t]` on task t's examples.
    """
    probs = torch.cat([torch.softmax(torch.from_numpy(z), dim=1) for z in logits], dim=1)
    classes = np.concatenate([np.asarray(t) for t in tasks])
    joint_pred = classes[probs.argmax(1).numpy()]
    per_task, task_pred = {}, []
    for k, task in enumerate(tasks):
        rows = np.isin(labels, task)
        cols = np.isin(classes, task)
        pred = classes[cols][probs[rows][:, cols].argmax(1).numpy()]
        task_pred.append(pred)
        per_task[f"task_{chr(97 + k)}"] = float(np.mean(pred == labels[rows]))
    return {"joint_acc": float(np.mean(joint_pred == labels)),
            "task_avg_acc": float(np.mean(list(per_task.values()))),
            "per_task_acc": per_task, "joint_pred": joint_pred, "task_pred": task_pred}


# ------------------------------------------------------------------------------ the pipeline
def run(state_dicts: Sequence[dict], method: str, batches: Sequence[np.ndarray], *,
        depth: int = 20, width: int = 1, num_classes: int = 5, alpha: float = 0.3,
        beta: float = 0.125, reset_endpoints: bool = False,
        reset_batches: Sequence[np.ndarray] | None = None, cache: dict | None = None
        ) -> dict:
    """The whole pipeline; returns every stage's output for stage-by-stage comparisons.

    Args:
      state_dicts: N = 2 endpoint torch state_dicts of `ZipItResNet(depth, width, num_classes)`.
      method: "zipit", "permute" or "average".
      batches: NHWC image batches for the statistics, in order.
      reset_batches: batches for the BatchNorm resets (default: `batches`).
      cache: a dict kept between calls on the same endpoints and batches: the (reset)
        endpoints and the statistics are computed once and reused by later methods.

    Returns:
      `{"endpoints": reset endpoint models, "stats": {point: {mean, cov, corr}},
        "transforms": {point: (merge, unmerge)}, "trunk"/"heads": merged state_dicts before the
        reset, "model": the merged MultiHead after the reset}`.
    """
    blocks = (depth - 2) // 6
    reset_batches = batches if reset_batches is None else reset_batches
    cache = {} if cache is None else cache
    if "endpoints" not in cache:
        models = [endpoint(sd, depth, width, num_classes) for sd in state_dicts]
        cache["endpoints"] = [reset_bn(m, reset_batches) for m in models] if reset_endpoints \
            else models
    models = cache["endpoints"]
    points = merge_points(blocks)
    if method != "average" and "stats" not in cache:
        cache["stats"] = feature_statistics(models, batches, points)
    stats = cache.get("stats", {})
    if method == "zipit":
        transforms = {p: zipit_match(stats[p]["corr"], alpha, beta) for p in points}
    elif method == "permute":
        transforms = {p: permute_match(stats[p]["corr"]) for p in points}
    elif method == "average":
        sd = models[0].state_dict()
        widths = {out: sd[key].shape[0] for key, (out, _) in tensor_spaces(blocks).items()}
        transforms = {p: identity_match(widths[p]) for p in points}
    else:
        raise ValueError(f"unknown method {method!r}")
    trunk, heads = merge_state_dicts([m.state_dict() for m in models], transforms, blocks)
    model = reset_bn(merged_model(trunk, heads, depth, width), reset_batches)
    return {"endpoints": models, "stats": stats, "transforms": transforms, "trunk": trunk,
            "heads": heads, "model": model}
