"""Cross-tokenizer distillation on the tokenizers users bring: Llama-style byte fallback, normalisers
that compose or drop characters, a teacher folder saved without its tokenizer."""

import json

import pytest
import tiny
from datasets import Dataset, DatasetDict
from test_cross_tokenizer import byte_level_bpe, cross_args
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from hf_kd import DistillationTrainer, run_distillation
from hf_kd.runs import models as run_models
from hf_kd.tasks import CausalLMTask
from hf_kd.tasks.alignment import align_spans, vocabulary_map

CORPUS = ["the cat sat on a mat", "a bat and a cat", "that is all"] * 4
SPECIAL = ["<unk>", "<s>", "</s>"]


def llama_style(texts=CORPUS, vocab_size=40) -> PreTrainedTokenizerFast:
    """A Llama-2 style BPE: ``▁`` for spaces (Metaspace, prepended to the first word), a BOS added, and the
    256 byte-fallback tokens ``<0x00>`` … ``<0xFF>`` at ids 3–258, before the ordinary tokens (Llama
    writes "a" as ``a``, a newline, which its vocabulary lacks, as ``<0x0A>``)."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trained.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
    state = json.loads(trained.to_str())
    ordinary = sorted(state["model"]["vocab"].items(), key=lambda item: item[1])[len(SPECIAL) :]
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    tokens = SPECIAL + byte_tokens + [token for token, _ in ordinary]
    state["model"] |= {"vocab": {token: i for i, token in enumerate(tokens)}, "byte_fallback": True}
    backend = Tokenizer.from_str(json.dumps(state))
    backend.decoder = decoders.Sequence(
        [decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def normalised_byte_level(normalizer, texts=CORPUS, vocab_size=280) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE (every byte in its alphabet) that first applies ``normalizer``."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"], initial_alphabet=alphabet)
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")


def test_byte_fallback_tokens_give_way_to_the_tokens_the_tokenizer_writes():
    teacher = llama_style()
    student = byte_level_bpe(CORPUS + ["a\nb"], vocab_size=270)
    assert teacher.convert_tokens_to_ids("<0x61>") < teacher.convert_tokens_to_ids("a")
    assert teacher.tokenize("a\nb") == ["▁a", "<0x0A>", "b"]
    vocabulary = vocabulary_map(student, teacher)
    pairs = {
        student.convert_ids_to_tokens(s): teacher.convert_ids_to_tokens(t)
        for s, t in zip(vocabulary.student_ids, vocabulary.teacher_ids, strict=True)
    }
    assert pairs["a"] == "a" and pairs["b"] == "b" and pairs["Ġa"] == "▁a"  # not <0x61>, <0x62>
    assert pairs["Ċ"] == "<0x0A>"  # what the teacher has no token for it writes in bytes
    rows = CausalLMTask(max_length=32).prepare(
        Dataset.from_dict({"text": ["a cat\nb"]}), student_processor=student, teacher_processor=teacher
    )
    row = rows[0]
    predicted = [
        student.convert_ids_to_tokens(row["input_ids"][t + 1])
        for t, matched in enumerate(row["kd_alignment_matched"])
        if matched
    ]
    assert predicted == ["Ġcat", "Ċ", "b", "</s>"]  # "b" was <0x62> to the map before: never matched


@pytest.mark.parametrize(
    "normalizer",
    [normalizers.NFKC(), normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()])],
    ids=["nfkc-composes", "strip-accents-drops"],
)
def test_characters_a_normaliser_merges_or_drops_are_no_boundary(normalizer):
    # "e" + a combining accent: NFKC makes one "é" whose offsets cover the "e" only; StripAccents drops
    # the accent. Either way the teacher's tokens leave the accent out, and a span must not end beside it.
    text = "e\u0301 cat"
    student = [(0, 1), (1, 2), (3, 6)]  # "e", the accent, "Ġcat" (offsets trimmed of the space)
    teacher = [(0, 1), (3, 6)]  # "é" (or "e"), "Ġcat"
    assert align_spans(student, teacher, text=text) == [([0, 1, 2], [0, 1])]
    assert align_spans(student, teacher) == [([0], [0]), ([1, 2], [1])]  # offsets alone: misaligned
    normalising = normalised_byte_level(normalizer)
    plain = byte_level_bpe(CORPUS, vocab_size=290)
    rows = [f"a {text} sat", f"{text}e\u0301\u0301 on a mat"]
    row_sets = CausalLMTask(max_length=32).prepare(
        Dataset.from_dict({"text": rows}), student_processor=plain, teacher_processor=normalising
    )
    for text_row, row in zip(rows, row_sets, strict=True):
        s_starts = [start for start, _ in plain(text_row, return_offsets_mapping=True)["offset_mapping"]]
        t_starts = [
            start for start, _ in normalising(text_row, return_offsets_mapping=True)["offset_mapping"]
        ]
        aligned = [(t, u) for t, u in enumerate(row["kd_alignment_teacher_position"]) if u >= 0]
        assert len(aligned) >= 3
        for t, u in aligned[:-1]:  # both predict a token starting at the same character (the last: EOS)
            assert text_row[s_starts[t + 1] : t_starts[u + 1]].strip() == ""
            assert text_row[t_starts[u + 1] : s_starts[t + 1]].strip() == ""


def test_tokens_a_normaliser_rewrites_are_not_shared():
    # A lowercasing tokenizer reads "The" as "the": its "T" (in its byte alphabet) is never written, so
    # sharing it would teach the other side that capitals have the probability of an unused token.
    texts = ["The Cat sat", "the cat sat"] * 4
    cased = byte_level_bpe(texts, vocab_size=280)
    lowercasing = normalised_byte_level(normalizers.Lowercase(), texts)
    for student, teacher in [(cased, lowercasing), (lowercasing, cased)]:
        vocabulary = vocabulary_map(student, teacher)
        shared = set(student.convert_ids_to_tokens(vocabulary.student_ids))
        assert {"t", "c", "Ġcat", "Ã"} <= shared  # "Ã": the byte 0xC3 (é's first), no text of its own
        assert not shared & {"T", "C"}, shared & {"T", "C"}


def test_a_teacher_folder_without_a_tokenizer_is_refused_before_the_student_loads(tmp_path, monkeypatch):
    texts = ["hello world said the cat"] * 4
    DatasetDict(train=Dataset.from_dict({"text": texts})).save_to_disk(str(tmp_path / "data"))
    byte_level_bpe(texts, vocab_size=270).save_pretrained(tmp_path / "student_tokenizer")
    tiny.tiny_llama(300, seed=0).save_pretrained(tmp_path / "teacher")  # weights and config only

    def load_student(*args, **kwargs):
        raise AssertionError("the student was loaded before the teacher's tokenizer was checked")

    monkeypatch.setattr(run_models, "load_student", load_student)
    teacher = str(tmp_path / "teacher")
    message = (
        rf"no tokenizer could be loaded from the folder '{teacher}', which holds \['config.json', "
        r"'generation_config.json', 'model.safetensors'\]: expected a tokenizer.json .* teacher_tokenizer"
    )
    with pytest.raises(ValueError, match=message):
        run_distillation(*cross_args(tmp_path, eval_split="none", output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "fields, refused",
    [
        ({"lmbda": 0.5}, "lmbda=0.5"),
        ({"seq_kd": True}, "seq_kd: true"),
        (
            {"student_logits_from_hidden_states": True, "loss_chunk_size": 8},
            "student_logits_from_hidden_states",
        ),
    ],
)
def test_the_python_api_refuses_what_cross_tokenizer_runs_do_not_support_before_training(
    tmp_path, fields, refused
):
    student_tokenizer, teacher_tokenizer = llama_style(), byte_level_bpe(CORPUS, vocab_size=270)
    task = CausalLMTask(max_length=16)
    rows = Dataset.from_dict({"text": CORPUS})
    train = task.prepare(rows, student_processor=student_tokenizer, teacher_processor=teacher_tokenizer)
    config = tiny.tiny_config(tmp_path, max_steps=1, per_device_train_batch_size=4, **fields)
    with pytest.raises(ValueError, match=f"cross-tokenizer distillation.*does not support {refused}"):
        DistillationTrainer(
            model=tiny.tiny_llama(len(student_tokenizer), seed=0),
            teacher_model=tiny.tiny_llama(len(teacher_tokenizer), seed=1),
            args=config,
            task=task,
            train_dataset=train,
            processing_class=student_tokenizer,
        )


def test_an_eos_the_post_processor_appends_aligns_at_the_end_of_the_text():
    # A "<s> $A </s>" post-processor reports its EOS at offset (0, 0), as if it came before the text: the
    # EOS then paired with nothing (or with the other side's BOS) and its prediction was never distilled.
    student = byte_level_bpe(CORPUS, vocab_size=280)
    student.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", student.bos_token_id), ("</s>", student.eos_token_id)],
    )
    teacher = llama_style()  # its own BOS; the EOS appended to plain text
    text = "the cat sat "
    assert student(text, return_offsets_mapping=True)["offset_mapping"][-1] == (0, 0)
    row = CausalLMTask(max_length=32).prepare(
        Dataset.from_dict({"text": [text]}), student_processor=student, teacher_processor=teacher
    )[0]
    assert student.convert_ids_to_tokens(row["input_ids"][-1]) == "</s>"
    last = len(row["input_ids"]) - 2  # the position that predicts the EOS
    assert row["kd_alignment_teacher_position"][last] == len(row["teacher_input_ids"]) - 2
    assert row["kd_alignment_matched"][last] == 1  # the two EOS are one shared token
    assert row["kd_alignment_teacher_position"][0] == 0  # BOS predicts "the" on both sides


def test_an_end_of_turn_marker_that_is_one_sides_eos_stays_paired_with_itself():
    # The student (a base model) ends documents with <|endoftext|> and its chat template's turns with
    # <|im_end|>; the teacher (an instruct model) has both tokens, <|im_end|> as its EOS.
    chat = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    special = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    student = byte_level_bpe(CORPUS, vocab_size=280, special=special)
    student.eos_token, student.chat_template = "<|endoftext|>", chat
    teacher = byte_level_bpe(CORPUS, vocab_size=300, special=("<pad>", *special))
    teacher.eos_token = "<|im_end|>"
    pairs = vocabulary_map(student, teacher).teacher_id_of
    for token in special:
        assert teacher.convert_ids_to_tokens(pairs[student.convert_tokens_to_ids(token)]) == token
    conversation = [{"role": "user", "content": "a cat"}, {"role": "assistant", "content": "a mat"}]
    row = CausalLMTask(max_length=64).prepare(
        Dataset.from_dict({"messages": [conversation]}), student_processor=student, teacher_processor=teacher
    )[0]
    tokens = student.convert_ids_to_tokens(row["input_ids"])
    before_end = len(tokens) - 1 - tokens[::-1].index("<|im_end|>") - 1  # predicts the reply's <|im_end|>
    assert row["labels"][before_end + 1] != -100 and row["kd_alignment_matched"][before_end] == 1


def test_conversations_with_a_template_on_the_teachers_side_only_say_whose_template_is_used():
    student, teacher = byte_level_bpe(CORPUS, vocab_size=280), llama_style()
    teacher.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    rows = Dataset.from_dict({"messages": [[{"role": "user", "content": "a cat"}]]})
    with pytest.raises(
        ValueError, match="the teacher's has one, but a conversation is rendered with the student's"
    ):
        CausalLMTask(max_length=16).prepare(rows, student_processor=student, teacher_processor=teacher)


def test_a_bos_the_post_processor_adds_without_bos_token_set_pairs_with_the_other_bos():
    # A tokenizer built by hand without naming its BOS: the token its post-processor adds at (0, 0) was
    # taken for text, so the first word's span started at it and no position predicted that word.
    backend = llama_style().backend_tokenizer
    teacher = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")  # no bos_token
    student = byte_level_bpe(CORPUS, vocab_size=280)
    student.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", student.bos_token_id)]
    )
    assert teacher.bos_token is None and teacher("a cat")["input_ids"][0] == teacher.convert_tokens_to_ids(
        "<s>"
    )
    row = CausalLMTask(max_length=16).prepare(
        Dataset.from_dict({"text": ["that cat"]}), student_processor=student, teacher_processor=teacher
    )[0]
    assert row["kd_alignment_teacher_position"][0] == 0  # both BOS predict the first word
