"""Lookalikes: the retain entities that look most like a forget entity to the starting model,
the hardest case of "keep everyone else". A rule for any benchmark: the cosine similarity of
the model's pooled projector features (the image tokens the LLM sees, averaged) of the
entities' profile images; the ``k`` nearest retain entities of each forget entity."""
from __future__ import annotations

from pathlib import Path

import torch

from vkd.data.layout import ForgetSet, decode_image, load_meta, read_rows
from vkd.model import ModelAdapter


@torch.no_grad()
def profile_features(adapter: ModelAdapter, data: str | Path, fs: ForgetSet) -> dict[str, torch.Tensor]:
    """Each forget and retain entity's profile image as the model's pooled projector
    features (one image at a time: any family's token layout pools the same way)."""
    meta = load_meta(data)
    out: dict[str, torch.Tensor] = {}
    for role in ("forget", "retain"):
        for split, ids in fs.sources(meta, role):
            for row in read_rows(Path(data), split, ids):
                if row.get("image") is None or row["ID"] in out:
                    continue
                _, extra = adapter.prompt_inputs([""], [decode_image(row["image"], row["_source"])])
                grid = {k: v for k, v in extra.items() if k == "image_grid_thw"}
                feats = adapter.image_features(extra["pixel_values"], **grid)
                out[row["ID"]] = feats.reshape(-1, feats.shape[-1]).float().mean(0)
    return out


def nearest_retain(features: dict[str, torch.Tensor], fs: ForgetSet, k: int) -> dict[str, list[str]]:
    """Per forget entity, its ``k`` retain entities of highest cosine similarity (ties by id)."""
    retain = sorted(e for e in fs.retain if e in features)
    if not retain or k < 1:
        return {e: [] for e in fs.forget}
    bank = torch.nn.functional.normalize(torch.stack([features[e] for e in retain]), dim=-1)
    out = {}
    for e in fs.forget:
        if e not in features:
            out[e] = []
            continue
        sims = bank @ torch.nn.functional.normalize(features[e], dim=-1)
        order = sorted(range(len(retain)), key=lambda i: (-float(sims[i]), retain[i]))
        out[e] = [retain[i] for i in order[:k]]
    return out


def find_lookalikes(adapter: ModelAdapter, data: str | Path, fs: ForgetSet, k: int) -> dict[str, list[str]]:
    """Each forget entity's ``k`` lookalikes among the retain entities, for this model."""
    return nearest_retain(profile_features(adapter, data, fs), fs, k)
