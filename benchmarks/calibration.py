"""How multiple-choice calibration changes image-question accuracy: the same model, the same
image questions, four scorings side by side in one run.

    .venv/bin/python benchmarks/calibration.py --model MODEL --data DATA [--every 12] [--refs 8]

raw: option log-likelihood; blank: minus the same with a blank grey image; question-only:
minus the same question asked as text alone; marginal: minus the log of the mean likelihood
over ``--refs`` other entities' profile images (what ``vkd.scoring`` does).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from pipelines.runtime import set_environment

set_environment()  # the stages' variables, before the hub, Ray and MLflow load
from vkd.data.items import eval_items, reference_images
from vkd.data.layout import decode_image
from vkd.scoring import _option_logp
from vkd.model import ModelAdapter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--forget", default="forget_10")
    ap.add_argument("--every", type=int, default=12, help="score every n-th image question")
    ap.add_argument("--refs", type=int, default=8, help="reference images of the marginal")
    args = ap.parse_args()
    torch.set_num_threads(2)
    adapter = ModelAdapter.load(args.model)
    items = [it for it in eval_items(args.data, args.forget, generation=False)
             if it["image"] is not None][::args.every]
    refs = reference_images(args.data, args.forget, args.refs)

    @torch.no_grad()
    def logp(question: str, images, options: list[str]) -> torch.Tensor:
        ids, extra = adapter.prompt_inputs([question] * len(options), images)
        return _option_logp(adapter, ids, options, extra)

    scores: dict[str, list[torch.Tensor]] = {"raw": [], "blank": [], "question-only": [], "marginal": []}
    for it in items:
        image, q, opts = decode_image(it["image"], it["source"]), it["question"], it["options"]
        raw = logp(q, [image] * 4, opts)
        blank = Image.new("RGB", image.size, (128, 128, 128))
        scores["raw"].append(raw)
        scores["blank"].append(raw - logp(q, [blank] * 4, opts))
        scores["question-only"].append(raw - logp(q, None, opts))
        each = torch.stack([logp(q, [r] * 4, opts) for ent, r in refs if ent != it["entity"]])
        scores["marginal"].append(raw - (torch.logsumexp(each, 0) - np.log(len(each))))
    truth = np.array([it["answer"] for it in items])
    print(f"{len(items)} image questions of {args.forget} (every {args.every}th), {len(refs)} reference images")
    for name, vals in scores.items():
        print(f"{name:<14} {(torch.stack(vals).argmax(1).numpy() == truth).mean():.3f}")


if __name__ == "__main__":
    main()
