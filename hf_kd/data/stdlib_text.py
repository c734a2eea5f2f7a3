"""A text-classification task from real text that ships with Python: the docstrings of standard-library
packages (modules, classes, functions), each labelled by its top-level package, written as a ``datasets``
text dataset with a word-level BERT tokenizer over its training split, fully offline.

    python -m hf_kd.data.stdlib_text outputs/data/stdlib_text
"""

from __future__ import annotations

import ast
import random
import re
import sys
import sysconfig
from collections import Counter
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from hf_kd.files import write_atomic_dir

PACKAGES = ("asyncio", "email", "unittest", "logging", "xml", "multiprocessing", "importlib", "http")
MAX_WORDS = 24  # of each docstring, lower-cased letters only
MIN_WORDS = 4
TEST_FRACTION = 0.2
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def package_docstrings(package: str) -> list[str]:
    """The distinct docstrings (first :data:`MAX_WORDS` words, ≥ :data:`MIN_WORDS`) of ``package``'s
    modules, classes and functions, read from its source (nothing imported; its tests left out)."""
    return list(package_docstring_kinds(package))


def package_docstring_kinds(package: str) -> dict[str, str]:
    """:func:`package_docstrings` (same order), each with where it was written: ``"method"`` for a
    function defined in a class body, ``"other"`` for a module, a class or any other function (the first
    place a repeated docstring appears)."""
    folder = Path(sysconfig.get_paths()["stdlib"]) / package
    if not folder.is_dir():
        raise FileNotFoundError(f"package {package!r}: no standard-library folder {folder}")
    texts: dict[str, str] = {}
    for source in sorted(folder.rglob("*.py")):
        if source.parent.name in ("test", "tests") or source.name.startswith("test"):
            continue
        tree = ast.parse(source.read_text(encoding="utf-8", errors="replace"))
        methods = {
            id(child)
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            for child in node.body
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                words = re.findall(r"[a-z]+", (ast.get_docstring(node) or "").lower())[:MAX_WORDS]
                if len(words) >= MIN_WORDS:
                    texts.setdefault(" ".join(words), "method" if id(node) in methods else "other")
    return texts


def stdlib_text_dataset(
    packages: tuple[str, ...] = PACKAGES, seed: int = 0, kind: bool = False
) -> DatasetDict:
    """train / test splits (shuffled with ``seed``) with a ``text`` and a ``label`` (the package) column;
    with ``kind``, a ``kind`` column too (``"method"`` or ``"other"``, :func:`package_docstring_kinds`):
    the same rows in the same order either way."""
    rows = [
        (text, label, where)
        for label, name in enumerate(packages)
        for text, where in package_docstring_kinds(name).items()
    ]
    random.Random(seed).shuffle(rows)
    n_train = int((1 - TEST_FRACTION) * len(rows))
    columns = {"text": Value("string"), "label": ClassLabel(names=list(packages))}
    if kind:
        columns["kind"] = Value("string")

    def subset(part: list[tuple[str, int, str]]) -> Dataset:
        values = {"text": [t for t, _, _ in part], "label": [y for _, y, _ in part]}
        if kind:
            values["kind"] = [k for _, _, k in part]
        return Dataset.from_dict(values, features=Features(columns))

    return DatasetDict(train=subset(rows[:n_train]), test=subset(rows[n_train:]))


def word_tokenizer(train: Dataset, min_count: int = 2) -> PreTrainedTokenizerFast:
    """A BERT-style word-level tokenizer over the words seen ≥ ``min_count`` times in ``train``."""
    counts = Counter(word for text in train["text"] for word in text.split())
    words = sorted(word for word, count in counts.items() if count >= min_count)
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def write_stdlib_text(path: str | Path, packages: tuple[str, ...] = PACKAGES, seed: int = 0) -> Path:
    """Write the dataset (``save_to_disk``) and its tokenizer (``path/tokenizer``) once; atomic."""
    path = Path(path)
    if (path / "dataset_dict.json").is_file() and (path / "tokenizer").is_dir():
        return path

    def write(folder: Path) -> None:
        dataset = stdlib_text_dataset(packages, seed)
        dataset.save_to_disk(str(folder))
        word_tokenizer(dataset["train"]).save_pretrained(str(folder / "tokenizer"))

    return write_atomic_dir(path, write)


if __name__ == "__main__":
    print(write_stdlib_text(sys.argv[1] if len(sys.argv) > 1 else "outputs/data/stdlib_text"))
