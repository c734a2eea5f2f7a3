"""Tiny offline builders shared by the tests: a word-level tokenizer, BERT/ViT classifiers built from
configs, and small labelled data sets. Nothing here touches the Hub."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from hf_kd import DistillationConfig

POSITIVE = ["good", "great", "fine", "nice", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "weak"]
FILLER = ["the", "movie", "was", "plot", "and", "very", "a", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
LABELS = ["negative", "positive"]


def tiny_config(output_dir: str | Path, **fields) -> DistillationConfig:
    """The tests' one :class:`DistillationConfig` factory: a deterministic, quiet CPU run writing to
    ``output_dir`` (no reporting integrations, no checkpoints, seed 0); ``fields`` set or override any field."""
    defaults = dict(use_cpu=True, report_to="none", seed=0, save_strategy="no", disable_tqdm=True)
    return DistillationConfig(output_dir=str(output_dir), **{**defaults, **fields})


def word_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A BERT-style word-level tokenizer over ``words`` (default: the sentiment vocabulary, in this order)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + (words or POSITIVE + NEGATIVE + FILLER))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def bert_classifier(
    vocab_size: int, *, hidden: int = 16, layers: int = 1, seed: int = 0, labels=LABELS
) -> BertForSequenceClassification:
    """A BERT sequence classifier without dropout (deterministic training steps)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    return BertForSequenceClassification(config)


def sentiment_dataset(n: int, seed: int = 0, unlabeled_every: int = 0) -> Dataset:
    """Short sentences whose label is the sign of (#positive − #negative) words; every
    ``unlabeled_every``-th row gets label −1 (no label) when that is > 0."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = int(rng.integers(2))
        strong = POSITIVE if label else NEGATIVE
        words = list(rng.choice(strong, 2)) + list(rng.choice(FILLER, int(rng.integers(1, 5))))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(-1 if unlabeled_every and i % unlabeled_every == 0 else label)
    return Dataset.from_dict(
        {"text": texts, "label": labels},
        features=Features({"text": Value("string"), "label": ClassLabel(names=LABELS)}),
    )


def vit_classifier(
    *, hidden: int = 16, layers: int = 1, num_labels: int = 3, seed: int = 0
) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        id2label={i: str(i) for i in range(num_labels)},
        label2id={str(i): i for i in range(num_labels)},
    )
    return ViTForImageClassification(config)


def image_dataset(n: int, num_labels: int = 3, seed: int = 0) -> Dataset:
    """8×8 grey images whose brightness encodes the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(num_labels, size=n)
    images = [
        PILImage.fromarray((rng.uniform(0, 60, (8, 8)) + 80 * y).astype(np.uint8), mode="L") for y in labels
    ]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(num_labels)])})
    return Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)


def image_processor() -> ViTImageProcessorPil:
    return ViTImageProcessorPil(
        do_resize=True, size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def save_model(model, processor, path: Path) -> Path:
    """``save_pretrained`` a model and its processor into ``path`` (a local "Hub" checkpoint)."""
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_llama(vocab_size: int, seed: int = 0, **config) -> LlamaForCausalLM:
    """A tiny Llama causal LM (1 layer of width 32, 2 heads over 1 key-value head, 128 positions),
    initialised with ``seed``; ``config`` overrides any of its fields."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(LlamaConfig(**(fields | config)))
