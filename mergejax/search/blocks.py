"""Blocks of a model for recipe search: which tensors share one merge recipe.

AutoMerge's finding is that one merge method does not fit every block of a model, so it splits
the model and searches a recipe per block. By default the blocks are the ones a user would name,
read off the module names of the flat variables ('params/layer2_1/conv1/kernel'):

- a stage: modules `<name><digit>_<index>` share their prefix (`layer2_0`, `layer2_1` ->
  `layer2`; ResNet stages);
- the transformer blocks: `blocks_<i>` / `layers_<i>` / `resblocks_<i>` form one block range
  `blocks` (split it with regex groups if wanted);
- any other indexed layer (`dense_0`, `conv_3`) is its own block;
- unindexed modules are the `stem` (patch embedding, class token, positions, tokenizer, the first
  convolution) unless they come after the blocks (final norms `norm`, `fc_norm`, `ln_post`;
  CCT's sequence pooling `attention_pool`), which form `final`.

`regex_blocks` instead takes `(name, pattern)` pairs: a tensor joins the first block whose
pattern `re.search`es its name (e.g. AutoMerge's CCT split: `(("tokenizer", "tokenizer"),
("transformer", ".*"))`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_COLLECTIONS = ("params", "batch_stats")
_STAGE = re.compile(r"^(.*\d)_\d+$")
_TRANSFORMER = re.compile(r"^(blocks|layers|resblocks|encoder_layer)_\d+$")
_INDEXED = re.compile(r"_\d+$")
_FINAL = ("norm", "fc_norm", "ln_post", "encoder_ln", "final_norm", "attention_pool")


def module_of(name: str) -> str:
    """The top-level module of a flat tensor name (`params/layer2_1/conv1/kernel` -> `layer2_1`)."""
    parts = name.split("/")
    return parts[1] if len(parts) > 1 and parts[0] in _COLLECTIONS else parts[0]


def _default_block(module: str) -> str:
    if _TRANSFORMER.match(module):
        return "blocks"
    if m := _STAGE.match(module):
        return m.group(1)
    if _INDEXED.search(module):
        return module
    return "final" if module in _FINAL else "stem"


def default_blocks(names: Sequence[str]) -> dict[str, list[str]]:
    """`{block: [tensor names]}` by the module-name rules above, blocks in the order their first
    tensor appears in `sorted(names)`'s depth order (stem first, final last)."""
    blocks: dict[str, list[str]] = {}
    for name in sorted(names):
        blocks.setdefault(_default_block(module_of(name)), []).append(name)
    order = sorted(blocks, key=lambda b: (b != "stem", b == "final", _natural(b)))
    return {b: blocks[b] for b in order}


def _natural(s: str) -> tuple:
    """'layer10' after 'layer2': digits compared as numbers."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def regex_blocks(names: Sequence[str], groups: Sequence[tuple[str, str]]
                 ) -> dict[str, list[str]]:
    """`{block: [tensor names]}`: each tensor joins the first `(block, pattern)` whose pattern
    `re.search`es it. ValueError naming the tensors no pattern matches (end with `(rest, ".*")`
    to catch them) and the blocks that match nothing."""
    compiled = []
    for block, pattern in groups:
        try:
            compiled.append((block, re.compile(pattern)))
        except re.error as e:
            raise ValueError(f"search block {block!r}: bad regex {pattern!r}: {e}") from None
    blocks: dict[str, list[str]] = {b: [] for b, _ in groups}
    missed = []
    for name in sorted(names):
        for block, rx in compiled:
            if rx.search(name):
                blocks[block].append(name)
                break
        else:
            missed.append(name)
    if missed:
        raise ValueError(f"search blocks {[b for b, _ in groups]} match no pattern for "
                         f"{len(missed)} tensor(s), e.g. {missed[:5]}; add a last group "
                         "('rest', '.*')")
    empty = [b for b, names_ in blocks.items() if not names_]
    if empty:
        raise ValueError(f"search blocks {empty} match no tensor; tensors are named like "
                         f"{sorted(names)[:3]}")
    return blocks


def model_blocks(names: Sequence[str], groups: Sequence[tuple[str, str]] | None = None
                 ) -> dict[str, list[str]]:
    """`regex_blocks(names, groups)` if `groups`, else `default_blocks(names)`."""
    return regex_blocks(names, groups) if groups else default_blocks(names)
