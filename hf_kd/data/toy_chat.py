"""A tiny offline chat corpus and its tokenizer, for the causal-LM demo recipe and tests.

Each conversation asks for one of three operations on a few symbols and gets the answer:

    user: "reverse c a f"  → assistant: "f a c"
    user: "sort c a f"     → assistant: "a c f"
    user: "add 3 4"        → assistant: "7"

The tokenizer is a word-level ``tokenizers`` model trained on the corpus, wrapped in
``PreTrainedTokenizerFast`` with a chat template, so nothing comes from the Hub. A second one, a
byte-level BPE with the same chat template and special tokens, gives the cross-tokenizer demo a student
that does not share the teacher's vocabulary.
"""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from hf_kd.files import write_atomic_dir

SYMBOLS = list("abcdefgh")
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def toy_conversation(rng: random.Random) -> list[dict[str, str]]:
    """One random request and its correct answer."""
    operation = rng.choice(["reverse", "sort", "add"])
    if operation == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        question, answer = f"add {a} {b}", str(a + b)
    else:
        items = [rng.choice(SYMBOLS) for _ in range(rng.randint(2, 5))]
        result = items[::-1] if operation == "reverse" else sorted(items)
        question, answer = f"{operation} {' '.join(items)}", " ".join(result)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def toy_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``texts``, with the chat template above."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|end|>", unk_token="<unk>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def byte_level_bpe(
    texts: list[str], vocab_size: int, special_tokens: list[str], **roles: str
) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE of ``vocab_size`` tokens trained on ``texts`` (every byte in its
    alphabet; offsets trimmed of spaces, as GPT-2's), ``special_tokens`` first; ``roles`` name them
    (``eos_token="<|end|>"``, ``pad_token=...``)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles)


def toy_byte_tokenizer(texts: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``, with the special tokens and chat template of
    :func:`toy_tokenizer`: the same text, another vocabulary."""
    wrapped = byte_level_bpe(
        texts, vocab_size, SPECIAL_TOKENS, pad_token="<pad>", eos_token="<|end|>", unk_token="<unk>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def write_toy_chat(path: str | Path, num_train: int = 512, num_test: int = 64, seed: int = 0) -> Path:
    """Write ``path`` (a ``save_to_disk`` DatasetDict with ``messages`` and ``text`` columns),
    ``path/tokenizer`` and ``path/byte_tokenizer`` (:func:`toy_byte_tokenizer`); written to a temporary
    directory first, then renamed."""
    path = Path(path)
    rng = random.Random(seed)
    conversations = [toy_conversation(rng) for _ in range(num_train + num_test)]
    texts = [f"{c[0]['content']} = {c[1]['content']}" for c in conversations]
    splits = DatasetDict(
        train=Dataset.from_dict({"messages": conversations[:num_train], "text": texts[:num_train]}),
        test=Dataset.from_dict({"messages": conversations[num_train:], "text": texts[num_train:]}),
    )

    def write(folder: Path) -> None:
        splits.save_to_disk(str(folder))
        toy_tokenizer(texts + [" ".join(SYMBOLS)]).save_pretrained(str(folder / "tokenizer"))
        toy_byte_tokenizer(texts + [" ".join(SYMBOLS)]).save_pretrained(str(folder / "byte_tokenizer"))

    return write_atomic_dir(path, write)
