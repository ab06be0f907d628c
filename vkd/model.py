"""Model adapter: one interface over LLaVA-style families (vision -> projector -> LLM).

The adapter names the three parameter groups ``vision``, ``projector`` and ``llm`` by each
transformers class's own module names, exposes the projector output (the image tokens the
LLM sees), and turns (question, image, answer) rows into model inputs. ``--model tiny``
builds a small LlavaForConditionalGeneration from a config, with a byte-level BPE
tokenizer trained on the benchmark's text; it is saved and loaded as any Hugging Face
checkpoint folder (safetensors + processor), through the same code a real checkpoint takes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from vkd.cache import Cache, data_fingerprint, digest
from vkd.config import ModelConfig
from vkd.registry import Registry

GROUPS = ("vision", "projector", "llm")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PLAIN_PROMPT = "Question: {question}\nAnswer:"
# The tiny model's prompt formats: none (PLAIN_PROMPT), or llava-1.5's chat template (llava-hf's, without its
# generation markers): "USER: <image>\n{question} ASSISTANT:"
CHAT_TEMPLATES = {
    "plain": None,
    "llava-1.5": ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
                  "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
                  "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
                  "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
}


class ModelError(ValueError):
    """A model that cannot be loaded or used; the message says what to do."""


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts: name prefixes of ``named_parameters`` (the projector
    is matched first, since Qwen2-VL keeps its ``merger`` inside ``visual``)."""
    name: str
    model_types: tuple[str, ...]
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    llm: tuple[str, ...]
    vision_layers: str   # prefix of the vision transformer's blocks, followed by the block index
    # Linear modules of the visual side whose *input* channels are the prunable neurons: the
    # down-projection of every vision MLP and of the projector (regexes on module names).
    neuron_modules: tuple[str, ...] = ()

    def group_of(self, param_name: str) -> str:
        for group in ("projector", "vision", "llm"):
            if param_name.startswith(getattr(self, group)):
                return group
        raise ModelError(f"parameter {param_name} belongs to no group of family {self.name}")


FAMILIES: Registry[Family] = Registry("model family")
FAMILIES.register("llava")(Family(
    "llava", ("llava",), vision=("model.vision_tower.",), projector=("model.multi_modal_projector.",),
    llm=("model.language_model.", "lm_head."), vision_layers="model.vision_tower.encoder.layers.",
    neuron_modules=(r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.mlp\.fc2",
                    r"model\.multi_modal_projector\.linear_2"),
))
FAMILIES.register("qwen2_vl")(Family(
    "qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), vision=("model.visual.",), projector=("model.visual.merger.",),
    llm=("model.language_model.", "lm_head."), vision_layers="model.visual.blocks.",
    neuron_modules=(r"model\.visual\.blocks\.\d+\.mlp\.(fc2|down_proj)", r"model\.visual\.merger\.mlp\.2"),
))


def family_for(model_type: str) -> Family:
    for name in FAMILIES.names():
        fam = FAMILIES.get(name)
        if model_type in fam.model_types:
            return fam
    known = sorted(t for n in FAMILIES.names() for t in FAMILIES.get(n).model_types)
    raise ModelError(f"model type {model_type!r} is not supported; supported types: {', '.join(known)}")


class ModelAdapter:
    """A loaded multimodal model with its processor."""

    def __init__(self, model: nn.Module | None, processor: Any, config: Any = None):
        self.model = model  # None: loaded for its processor alone (tokenising)
        self.processor = processor
        self.config = config if model is None else model.config
        self.family = family_for(self.config.model_type)
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat = bool(getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None))
        self._unseen: frozenset[str] | None = None

    # --- loading and saving ----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", weights: bool = True) -> "ModelAdapter":
        """The model and processor of a checkpoint folder; ``weights=False``: the processor
        and config alone (what tokenising needs), without loading the weights."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is not a model folder (no config.json); pass --model tiny or a Hugging Face checkpoint folder"
            )
        config = AutoConfig.from_pretrained(path)
        family_for(config.model_type)
        processor = AutoProcessor.from_pretrained(path)
        if not weights:
            return cls(None, processor, config)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
        model.eval()
        return cls(model, processor)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.processor.save_pretrained(path)
        return path

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (inputs built here go there); the CPU without a model."""
        if self.model is None:
            return torch.device("cpu")
        return next(self.model.parameters()).device

    # --- parameter groups ------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
        for name, param in self.model.named_parameters():
            groups[self.family.group_of(name)].append((name, param))
        return groups

    def noise_images(self) -> dict[str, torch.Tensor]:
        """Visual inputs of one noise picture at the vision tower's own size, as the model
        takes them (no processor needed)."""
        vc = self.config.vision_config
        rng = torch.Generator().manual_seed(0)
        if self.family.name == "qwen2_vl":  # flattened patches with their grid (t, h, w)
            side = 2 * vc.spatial_merge_size
            dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
            return {"pixel_values": torch.rand((side * side, dim), generator=rng),
                    "image_grid_thw": torch.tensor([[1, side, side]])}
        return {"pixel_values": torch.rand((1, getattr(vc, "num_channels", 3), vc.image_size, vc.image_size),
                                           generator=rng)}

    def unseen_visual(self) -> frozenset[str]:
        """Names of the visual parameters that nothing the LLM sees depends on (LLaVA's
        vision layers after ``vision_feature_layer`` and its post layer norm): found once by
        one backward pass from the image tokens of a noise picture, so it holds for any
        family. They are never measured, pruned, trained or distilled."""
        if self._unseen is None:
            visual = [(n, p) for g in ("vision", "projector") for n, p in self.param_groups()[g]]
            was = {n: p.requires_grad for n, p in visual}
            for _, p in visual:
                p.requires_grad_(True)
                p.grad = None
            inputs = self.noise_images()
            inputs["pixel_values"] = inputs["pixel_values"].to(visual[0][1].dtype)
            with torch.enable_grad():
                self.image_features(**inputs).float().sum().backward()
            self._unseen = frozenset(n for n, p in visual if p.grad is None or not bool(p.grad.any()))
            for n, p in visual:
                p.grad = None
                p.requires_grad_(was[n])
        return self._unseen

    def group_sizes(self) -> dict[str, int]:
        return {g: sum(p.numel() for _, p in ps) for g, ps in self.param_groups().items()}

    def image_features(self, pixel_values: torch.Tensor, **image_kwargs: Any) -> torch.Tensor:
        """The projector's output for a batch of images: the image tokens the LLM sees,
        as one tensor [images, tokens, hidden] (or [tokens, hidden] for flattened families)."""
        out = self.model.model.get_image_features(pixel_values=pixel_values, **image_kwargs)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (list, tuple)):
            shapes = {f.shape for f in feats}
            feats = torch.stack(list(feats)) if len(shapes) == 1 else torch.cat(list(feats))
        return feats

    # --- inputs ----------------------------------------------------------------------------
    def prompt(self, question: str, has_image: bool) -> str:
        if self.chat:
            content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        image = (self.processor.image_token + "\n") if has_image else ""
        return image + PLAIN_PROMPT.format(question=question)

    def target_ids(self, answers: Sequence[str], eos: bool = True) -> list[list[int]]:
        lead = "" if self.chat else " "
        ids = self.tokenizer([lead + a for a in answers], add_special_tokens=False)["input_ids"]
        return [list(x) + ([self.tokenizer.eos_token_id] if eos else []) for x in ids]

    def turn_prompts(self, questions: Sequence[str], answers: Sequence[str], has_image: bool) -> list[str]:
        """The prompt text before each answer of a multi-turn conversation (the image goes
        with the first question); each answer's tokens are ``target_ids`` (answer + EOS)."""
        if not self.chat:
            return [self.prompt(questions[0], has_image)] + [
                "\n" + PLAIN_PROMPT.format(question=q) for q in questions[1:]]
        eos = self.tokenizer.eos_token or ""
        messages: list[dict] = []
        out, done = [], ""
        for k, (q, a) in enumerate(zip(questions, answers)):
            content = ([{"type": "image"}] if has_image and k == 0 else []) + [{"type": "text", "text": q}]
            messages.append({"role": "user", "content": content})
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if not text.startswith(done):
                raise ModelError("this model's chat template does not render a conversation turn by turn; "
                                 "set train.turns=1")
            out.append(text[len(done):])
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
            done = text + a + eos
        return out

    def prompt_inputs(self, questions: Sequence[str], images: Sequence[Any] | None,
                      texts: Sequence[str] | None = None) -> tuple[list[list[int]], dict]:
        """Token ids of each prompt (image placeholders expanded) and the image tensors;
        ``texts`` gives ready prompt texts instead of building them from ``questions``."""
        has_image = images is not None
        texts = list(texts) if texts is not None else [self.prompt(q, has_image) for q in questions]
        if has_image:
            enc = self.processor(text=texts, images=list(images), return_tensors="pt", padding=True)
            mask = enc.pop("attention_mask")
            ids = [row[m.bool()].tolist() for row, m in zip(enc.pop("input_ids"), mask)]
            extra = {k: v.to(self.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
        else:
            ids = [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
            extra = {}
        bos = self.tokenizer.bos_token_id
        if bos is not None and not self.chat:
            ids = [[bos] + x for x in ids]
        return ids, extra

    def batch(self, prompt_ids: list[list[int]], target_ids: list[list[int]] | None = None,
              left_pad: bool = False) -> dict[str, torch.Tensor]:
        """Pad prompt (+ target) ids into input_ids, attention_mask and labels (-100 outside
        the targets)."""
        pad = self.tokenizer.pad_token_id
        seqs, labels = [], []
        for i, p in enumerate(prompt_ids):
            t = target_ids[i] if target_ids is not None else []
            seqs.append(p + t)
            labels.append([-100] * len(p) + t)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, lb) in enumerate(zip(seqs, labels)):
            sl = slice(width - len(s), width) if left_pad else slice(0, len(s))
            ids[i, sl] = torch.tensor(s)
            att[i, sl] = 1
            lab[i, sl] = torch.tensor(lb)
        return {"input_ids": ids.to(self.device), "attention_mask": att.to(self.device), "labels": lab.to(self.device)}


# --- the tiny model ------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained offline on ``texts`` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="right",
    )


def build_tiny(cfg: ModelConfig, texts: Iterable[str], image_size: int) -> ModelAdapter:
    """The tiny LLaVA of ``cfg``: CLIP-style vision tower, 2-layer MLP projector, Llama-style LLM."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    if image_size % cfg.patch_size:
        raise ModelError(f"model.patch_size={cfg.patch_size} must divide the benchmark's image size {image_size}")
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(cfg.seed)
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=image_size, patch_size=cfg.patch_size,
    )
    text = LlamaConfig(
        hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_heads, vocab_size=len(tokenizer),
        max_position_embeddings=cfg.max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, projector_hidden_act=cfg.projector_act,
        vision_feature_select_strategy="default", vision_feature_layer=cfg.feature_layer,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
        chat_template=CHAT_TEMPLATES[cfg.chat_template],
    )
    return ModelAdapter(model, processor)


def resolve_model(spec: str | Path, cfg: ModelConfig, data: str | Path, cache: str | Path) -> Path:
    """The folder of model ``spec``: a checkpoint folder as given, or for ``tiny`` the tiny
    model of ``cfg`` for benchmark ``data``, built once and kept in the cache folder's
    ``tiny-<key>`` (the key: the model settings and the benchmark's content)."""
    from vkd.data.items import benchmark_texts
    from vkd.data.layout import load_meta

    if str(spec) != "tiny":
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {spec}: not a model folder (no config.json); pass tiny or a checkpoint folder")
        return path.resolve()
    meta = load_meta(data)
    image_size = cfg.image_size or int(meta.extra.get("image_size", 0) or 0)
    if not image_size:
        raise ModelError(f"benchmark {data} does not record an image size; set model.image_size for the tiny model")
    key = digest({"model": vars(cfg), "data": data_fingerprint(data)})
    return Cache(Path(cache).resolve(), ".").get_or_make(
        f"tiny-{key}", lambda tmp: build_tiny(cfg, benchmark_texts(data), image_size).save(tmp))
