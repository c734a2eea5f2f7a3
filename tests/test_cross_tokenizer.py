"""Cross-tokenizer distillation: token alignment by character offsets, the vocabulary map, the loss
(exact part on shared tokens, ULD on the rest) and a run with a teacher of another tokenizer."""

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import tiny
import torch
from datasets import Dataset, DatasetDict
from processes import launch, python, torchrun
from tiny import save_model, tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hf_kd import DistillationConfig, DistillationTrainer, parse_args, run_distillation
from hf_kd.data import toy_chat
from hf_kd.data.toy_chat import toy_conversation, toy_tokenizer, write_toy_chat
from hf_kd.losses import DIVERGENCES, AlignedLogits, distillation_loss, uld_distance
from hf_kd.tasks import CausalLMTask
from hf_kd.tasks.alignment import align_spans, aligned_logits, alignment_columns, vocabulary_map
from hf_kd.tasks.causal_lm import encode_with_eos, next_token_targets
from hf_kd.teachers.cache.capture import capture_teacher_logits
from hf_kd.teachers.cache.format import CacheMismatchError
from hf_kd.teachers.cache.load import load_teacher_cache
from hf_kd.teachers.online import CrossTokenizerTeacher

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the café is open, 日本 is far 🙂 away", "hello world said the cat", " leading and trailing  "] * 5


def byte_level_bpe(texts=TEXTS, vocab_size=300, special=("<s>", "</s>", "<pad>")) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE (no BOS added)."""
    roles = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return toy_chat.byte_level_bpe(texts, vocab_size, list(special), **roles)


def unigram(texts=TEXTS, vocab_size=60) -> PreTrainedTokenizerFast:
    """A SentencePiece-style unigram (Metaspace ``▁``) that adds a BOS."""
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    special = ["<pad>", "<unk>", "<s>", "</s>"]
    backend.train_from_iterator(
        texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token="<unk>")
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def pair():
    return byte_level_bpe(), unigram()


def spans_as_tokens(student, teacher, text):
    """The spans of ``text`` as (student tokens, teacher tokens), both encoded with their specials and EOS."""
    s_ids, s_offsets, s_special = encode_with_eos(student, text, True, True)
    t_ids, t_offsets, t_special = encode_with_eos(teacher, text, True, True)
    spans = align_spans(
        s_offsets,
        t_offsets,
        student_special=s_special,
        teacher_special=t_special,
        student_end=len(text),
        teacher_end=len(text),
    )
    return [
        (
            student.convert_ids_to_tokens([s_ids[i] for i in s]),
            teacher.convert_ids_to_tokens([t_ids[i] for i in t]),
        )
        for s, t in spans
    ]


# ---- alignment ------------------------------------------------------------------------------------


def test_spans_of_multibyte_characters_and_spaces(pair):
    student, teacher = pair
    assert spans_as_tokens(student, teacher, "the café 日本 🙂") == [
        (["the"], ["▁t", "he"]),
        (["Ġca"], ["▁ca"]),
        (["fÃ", "©"], ["f", "é"]),  # é is two bytes, split across two byte-level tokens
        (["ĠæĹ", "¥æ", "ľ", "¬"], ["▁", "日", "本"]),  # overlapping byte pieces: no boundary inside
        (["Ġ"], ["▁"]),  # a zero-width (trimmed) space token is text, not a special token
        (["ðŁ", "Ļ", "Ĥ"], ["🙂"]),
        (["</s>"], ["</s>"]),  # the two EOS pair; the teacher's BOS pairs with nothing
    ]
    assert spans_as_tokens(student, teacher, " leading and trailing  ")[-3:] == [
        (["ling"], ["l", "i", "n", "g"]),
        (["ĠĠ"], ["▁", "▁"]),  # trailing spaces
        (["</s>"], ["</s>"]),
    ]
    assert spans_as_tokens(student, teacher, " leading")[0] == (["Ġlead"], ["▁", "l", "e", "a", "d"])


def test_special_tokens_pair_by_position_and_truncation_stops_the_spans():
    # Both sides' BOS at 0 pair (no loss uses them: nothing predicts a first token); a side cut short
    # ends the spans where both still cover the text.
    student = [(0, 0), (0, 3), (3, 7), (8, 11), (11, 11)]  # BOS "the" "_cat" "_sat" EOS
    teacher = [(0, 0), (0, 1), (1, 3), (4, 7), (8, 11)]  # BOS "t" "he" "cat" "sat" (trimmed spaces)
    special_s, special_t = [True, False, False, False, True], [True, False, False, False, False]
    spans = align_spans(student, teacher, student_special=special_s, teacher_special=special_t)
    assert spans == [([0], [0]), ([1], [1, 2]), ([2], [3]), ([3], [4])]  # the student's EOS: no partner
    cut = align_spans(
        student[:3], teacher, student_special=special_s[:3], teacher_special=special_t, student_end=7
    )
    assert cut == [([0], [0]), ([1], [1, 2]), ([2], [3])]


def test_alignment_columns_carry_the_completion_mask():
    spans = [([0], [0]), ([1], [1, 2]), ([2], [3]), ([3, 4], [4])]
    student_ids, teacher_ids = [10, 11, 12, 13, 14], [20, 21, 22, 23, 24]
    labels = [-100, -100, 12, 13, 14]  # the first two tokens are the prompt
    columns = alignment_columns(spans, student_ids, labels, teacher_ids, {12: 23, 11: 21})
    assert columns == {
        "kd_alignment_teacher_position": [-1, 2, 3, -1, -1],  # student 1 predicts token 2, teacher 2 token 3
        "kd_alignment_matched": [0, 1, 0, 0, 0],  # 12 ↔ 23: one token each, the same token
    }  # span ([3, 4], [4]) starts at student position 2: ULD there
    everything = alignment_columns(spans, student_ids, student_ids, teacher_ids, {12: 23, 11: 21})
    assert everything["kd_alignment_teacher_position"] == [0, 2, 3, -1, -1]
    assert everything["kd_alignment_matched"] == [0, 1, 0, 0, 0]  # 11 ↔ (21, 22) spans two teacher tokens


def test_vocabulary_map_compares_text_not_spellings(pair):
    student, teacher = pair
    vocabulary = vocabulary_map(student, teacher)
    pairs = {
        student.convert_ids_to_tokens(s): teacher.convert_ids_to_tokens(t)
        for s, t in zip(vocabulary.student_ids, vocabulary.teacher_ids, strict=True)
    }
    assert pairs["Ġca"] == "▁ca" and pairs["Ġ"] == "▁" and pairs["a"] == "a"
    assert pairs["</s>"] == "</s>"
    assert "the" not in pairs  # the unigram's pieces of "the" are "▁t" "he": no shared token
    other_eos = toy_tokenizer(["add 3 4 = 7"])  # its EOS is <|end|>
    toy_pairs = vocabulary_map(other_eos, teacher).teacher_id_of
    assert toy_pairs[other_eos.eos_token_id] == teacher.eos_token_id


def test_chat_rows_align_the_assistant_tokens_only():
    import random

    rng = random.Random(0)
    conversations = [toy_conversation(rng) for _ in range(8)]
    student = toy_tokenizer(
        [f"{c[0]['content']} = {c[1]['content']}" for c in conversations] + ["a b c d e f g h"]
    )
    texts = [student.apply_chat_template(c, tokenize=False) for c in conversations]
    teacher = byte_level_bpe(texts, vocab_size=280, special=("<pad>", "<|end|>"))
    teacher.eos_token, teacher.pad_token = "<|end|>", "<pad>"
    task = CausalLMTask(max_length=64)
    rows = task.prepare(
        Dataset.from_dict({"messages": conversations}), student_processor=student, teacher_processor=teacher
    )
    assert task.vocabulary is not None
    for row, text in zip(rows, texts, strict=True):
        assert teacher.decode(row["teacher_input_ids"]) == text  # the teacher reads the same rendered text
        targets = next_token_targets(torch.tensor([row["labels"]]))[0].tolist()
        aligned = [t for t, u in enumerate(row["kd_alignment_teacher_position"]) if u >= 0]
        assert aligned == [t for t, y in enumerate(targets) if y != -100]  # words: one span per student token
        s_offsets = student(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        t_offsets = teacher(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for t in aligned:  # the two predicted tokens start the same word
            u = row["kd_alignment_teacher_position"][t]
            assert s_offsets[t + 1][0] == t_offsets[u + 1][0]


# ---- the loss -------------------------------------------------------------------------------------


def value_and_grad(fn, z):
    z = z.detach().clone().requires_grad_(True)
    terms = fn(z)
    (grad,) = torch.autograd.grad(terms.loss, z)
    return terms, grad


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_same_tokenizer_gives_todays_loss_exactly(name, chunk_size):
    tokenizer = toy_tokenizer(["add 3 4 = 7", "sort c a f = a c f"])
    rows = [tokenizer("add 3 4 = 7")["input_ids"], tokenizer("sort c a f = a c f")["input_ids"]]
    features = []
    for ids in rows:
        offsets = tokenizer(tokenizer.decode(ids), return_offsets_mapping=True)["offset_mapping"]
        spans = align_spans(offsets, offsets)
        labels = [-100, *ids[1:]] if len(features) == 0 else ids  # a masked first target in row 0
        columns = alignment_columns(
            spans, ids, labels, ids, vocabulary_map(tokenizer, tokenizer).teacher_id_of
        )
        features.append(
            {
                "input_ids": ids,
                "labels": labels,
                "teacher_input_ids": ids,
                "teacher_attention_mask": [1] * len(ids),
            }
            | columns
        )
    task = CausalLMTask()
    task.use_processor(tokenizer)
    batch = task.collate(features)
    torch.manual_seed(0)
    vocab = len(tokenizer)
    z = torch.randn(*batch["input_ids"].shape, vocab) * 2
    v = torch.randn(*batch["input_ids"].shape, vocab) * 2
    aligned = aligned_logits(
        v, batch, vocabulary_map(tokenizer, tokenizer), matched_weight=1.0, unmatched_weight=1.0
    )
    labels = next_token_targets(batch["labels"]).reshape(-1)
    settings = dict(alpha=0.4, temperature=2.0, divergence_name=name, chunk_size=chunk_size)
    today, today_grad = value_and_grad(
        lambda x: distillation_loss(x.reshape(-1, vocab), v.reshape(-1, vocab), labels, **settings), z
    )
    cross, cross_grad = value_and_grad(
        lambda x: distillation_loss(x.reshape(-1, vocab), aligned, labels, **settings), z
    )
    torch.testing.assert_close(cross.loss, today.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(cross_grad, today_grad, rtol=1e-6, atol=1e-9)
    assert cross.parts["soft_unmatched"][1] == 0 and cross.parts["soft_matched"][1] == (labels != -100).sum()


def hand_case():
    """4 student rows over V_s = 4, 4 teacher rows over V_t = 5; shared tokens: student 0 ↔ teacher 1,
    student 2 ↔ teacher 3, student 3 ↔ teacher 0. Row 0 is matched with teacher row 1; row 1 starts an
    unmatched span with teacher row 2; rows 2 and 3 start no span (inside one, or no alignment)."""
    torch.manual_seed(1)
    z = torch.randn(4, 4)
    teacher = AlignedLogits(
        logits=torch.randn(4, 5),
        teacher_row=torch.tensor([1, 2, -1, -1]),
        matched=torch.tensor([True, False, False, False]),
        student_ids=torch.tensor([0, 2, 3]),
        teacher_ids=torch.tensor([1, 3, 0]),
        matched_weight=0.7,
        unmatched_weight=0.3,
    )
    labels = torch.tensor([2, 1, 3, 0])
    return z, teacher, labels


def test_exact_and_uld_parts_equal_the_formulas_by_hand():
    z, teacher, labels = hand_case()
    tau = 2.0

    def by_hand(z):
        q_shared = torch.softmax(z[0, [0, 2, 3]] / tau, -1)
        p_shared = torch.softmax(teacher.logits[1, [1, 3, 0]] / tau, -1)
        exact = (p_shared * (p_shared / q_shared).log()).sum()
        q = torch.softmax(z[1] / tau, -1)  # the span start's distributions, each summing to 1
        p = torch.softmax(teacher.logits[2] / tau, -1)
        q_sorted = torch.cat([q.sort(descending=True).values, torch.zeros(1)])  # padded to V_t = 5
        uld = (q_sorted - p.sort(descending=True).values).abs().sum()
        hard = torch.nn.functional.cross_entropy(z, labels, reduction="sum")
        return exact, uld, 0.5 * hard / 4 + 0.5 * (0.7 * exact + 0.3 * uld) / 4

    z = z.requires_grad_(True)
    exact, uld, loss = by_hand(z)
    (expected_grad,) = torch.autograd.grad(loss, z)
    soft_mask = torch.ones(4, dtype=torch.bool)
    for chunk_size in (None, 1, 3):
        settings = dict(alpha=0.5, temperature=tau, soft_mask=soft_mask, temperature_squared=False)
        terms = distillation_loss(z, teacher, labels, chunk_size=chunk_size, **settings)
        torch.testing.assert_close(terms.parts["soft_matched"][0], exact.detach())
        torch.testing.assert_close(terms.parts["soft_unmatched"][0], uld.detach())
        assert int(terms.parts["soft_matched"][1]) == 1 and int(terms.parts["soft_unmatched"][1]) == 1
        torch.testing.assert_close(terms.loss, loss)
        (grad,) = torch.autograd.grad(terms.loss, z)
        torch.testing.assert_close(grad, expected_grad)
    assert expected_grad[1].abs().sum() > 0 and expected_grad[3].abs().sum() > 0


def test_uld_distance_is_the_sorted_l1_with_zero_padding():
    q = torch.tensor([[0.2, 0.5, 0.3]])
    p = torch.tensor([[0.1, 0.1, 0.6, 0.2]])
    # sorted: q = .5 .3 .2 0, p = .6 .2 .1 .1 → .1 + .1 + .1 + .1
    torch.testing.assert_close(uld_distance(q, p), torch.tensor([0.4]))


def test_chunked_equals_unchunked_with_different_tokenizers():
    z, teacher, labels = hand_case()
    whole, whole_grad = value_and_grad(
        lambda x: distillation_loss(x, teacher, labels, alpha=0.3, temperature=1.5), z
    )
    for chunk_size in (1, 2):
        chunked, grad = value_and_grad(
            lambda x, c=chunk_size: distillation_loss(
                x, teacher, labels, alpha=0.3, temperature=1.5, chunk_size=c
            ),
            z,
        )
        torch.testing.assert_close(chunked.loss, whole.loss)
        torch.testing.assert_close(grad, whole_grad)
    assert whole_grad[0].abs().sum() > 0 and whole_grad[1].abs().sum() > 0


# ---- end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cross_run(tmp_path_factory):
    """Plain text of the toy corpus; the student reads it with the word-level toy tokenizer, the teacher
    (a tiny Llama saved with a byte-level BPE) with its own tokenizer."""
    import random

    root = tmp_path_factory.mktemp("xtok")
    rng = random.Random(0)
    texts = [f"{c[0]['content']} = {c[1]['content']}" for c in (toy_conversation(rng) for _ in range(80))]
    DatasetDict(
        train=Dataset.from_dict({"text": texts[:64]}), test=Dataset.from_dict({"text": texts[64:]})
    ).save_to_disk(str(root / "data"))
    student_tokenizer = toy_tokenizer(texts + ["a b c d e f g h"])
    student_tokenizer.save_pretrained(root / "student_tokenizer")
    teacher_tokenizer = byte_level_bpe(texts, vocab_size=268, special=("<pad>", "</s>", "<s>"))
    teacher = tiny.tiny_llama(len(teacher_tokenizer), seed=3, pad_token_id=0, eos_token_id=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)  # a confident teacher: peaked distributions to learn from
    save_model(teacher, teacher_tokenizer, root / "teacher")
    byte_level_bpe(texts + TEXTS, vocab_size=320).save_pretrained(root / "too_big")  # > the teacher's rows
    return root, student_tokenizer, teacher_tokenizer


def cross_argv(root, **overrides) -> list[str]:
    """The command line of a tiny cross-tokenizer run on ``root`` (from :func:`cross_run`)."""
    recipe = {
        "task": "causal-lm",
        "dataset_name": str(root / "data"),
        "student_processor": str(root / "student_tokenizer"),
        "teacher_model_name_or_path": str(root / "teacher"),
        "student_config": {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 64,
        },
        "max_length": 48,
        "alpha": 1.0,
        "temperature": 1.0,
        "loss_chunk_size": 16,
        "max_steps": 8,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 16,
        "learning_rate": 1.0e-2,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "output_dir": str(root / "out"),
    } | overrides
    argv = []
    for key, value in recipe.items():
        argv += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


def cross_args(root, **overrides):
    return parse_args(cross_argv(root, **overrides))


def test_run_with_a_teacher_of_another_tokenizer(cross_run, caplog):
    root, student_tokenizer, teacher_tokenizer = cross_run
    with caplog.at_level(logging.INFO, logger="hf_kd.tasks.causal_lm"):
        result = run_distillation(*cross_args(root, cross_tokenizer_unmatched_weight=0.5))
    assert "vocabulary sizes differ: teacher 268, student 34" in caplog.text
    assert (
        f"distilling across tokenizers, {len(result.trainer.task.vocabulary.student_ids)} tokens shared"
        in caplog.text
    )
    history = [entry for entry in result.trainer.state.log_history if "loss_soft_matched" in entry]
    assert len(history) == 8
    assert all(entry["loss_soft_unmatched"] > 0 for entry in history)
    assert history[-1]["loss_soft_matched"] < 0.8 * history[0]["loss_soft_matched"]
    metrics = result.metrics
    assert 0 < metrics["eval_loss_soft_matched"] < math.inf and 0 < metrics["eval_loss_soft_unmatched"] < 2
    card = (root / "out" / "README.md").read_text()
    assert str(root / "student_tokenizer") in card and str(root / "teacher") in card
    assert f"({len(teacher_tokenizer)} tokens)" in card and "different vocabularies" in card
    record = json.loads((root / "out" / "run_record.json").read_text())
    assert "cross-tokenizer" in record["card"]["tokenizers"]
    assert record["recipe"]["cross_tokenizer_unmatched_weight"] == 0.5
    assert "teacher_loss_hard" not in json.loads((root / "out" / "eval_results.json").read_text())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"packing": True}, "packing: true is not supported with a teacher whose tokenizer differs"),
        ({"lmbda": 0.5}, "does not support lmbda=0.5"),
        ({"student_logits_from_hidden_states": True}, "student_logits_from_hidden_states: true"),
        ({"synthetic_teacher": "kd_pt"}, "synthetic_teacher='kd_pt'"),
        (
            {"teacher_processor": "too_big"},
            "the teacher's tokenizer has 320 tokens but the teacher scores only 268",
        ),
    ],
)
def test_what_cross_tokenizer_runs_do_not_support_is_refused_before_training(cross_run, overrides, message):
    root, _, _ = cross_run
    if "teacher_processor" in overrides:
        overrides = {"teacher_processor": str(root / overrides["teacher_processor"])}
    with pytest.raises(ValueError, match=message):
        run_distillation(*cross_args(root, output_dir=str(root / f"never_{len(message)}"), **overrides))
    assert not (root / f"never_{len(message)}").exists()


def test_part_weights_are_checked(tmp_path):
    with pytest.raises(ValueError, match="cross_tokenizer_matched_weight=-1.0 must be ≥ 0"):
        tiny_config(tmp_path, cross_tokenizer_matched_weight=-1.0)
    with pytest.raises(ValueError, match="are both 0"):
        DistillationConfig(
            output_dir=str(tmp_path), cross_tokenizer_matched_weight=0.0, cross_tokenizer_unmatched_weight=0.0
        )


def test_teacher_tokenizer_is_the_teacher_processor_under_its_own_name(tmp_path):
    argv = ["--student_config", "{model_type: llama}", "--output_dir", str(tmp_path), "--task", "causal-lm"]
    _, model_args, _ = parse_args([*argv, "--teacher_tokenizer", "org/teacher-tok"])
    assert model_args.teacher_processor == "org/teacher-tok"
    with pytest.raises(
        ValueError, match="teacher_tokenizer='a' and teacher_processor='b' name the same thing"
    ):
        parse_args([*argv, "--teacher_tokenizer", "a", "--teacher_processor", "b"])


def test_cross_tokenizer_recipe_runs_from_the_script(tmp_path):
    data = write_toy_chat(tmp_path / "toy_chat", num_train=48, num_test=16)
    teacher = tmp_path / "teacher"
    run_distillation(
        *parse_args(
            ["--config", "recipes/causal_lm/tiny/teacher.yaml", "--dataset_name", str(data)]
            + [
                "--student_processor",
                str(data / "tokenizer"),
                "--output_dir",
                str(teacher),
                "--max_steps",
                "2",
            ]
        )
    )
    out = tmp_path / "student"
    command = [*python(), "scripts/distill.py", "--config", "recipes/causal_lm/tiny/cross_tokenizer.yaml"]
    command += ["--dataset_name", str(data), "--student_processor", str(data / "byte_tokenizer")]
    command += ["--teacher_model_name_or_path", str(teacher), "--output_dir", str(out), "--max_steps", "3"]
    command += ["--logging_steps", "1"]
    launch(command)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_loss_soft_matched"] > 0 and results["eval_loss_soft_unmatched"] > 0
    steps = [
        e
        for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "loss_soft_matched" in e
    ]
    assert len(steps) == 3
    assert "byte_tokenizer" in (out / "README.md").read_text()


def test_a_cache_of_another_tokenizer_is_refused_with_the_way_out(pair, tmp_path):
    student, teacher_tokenizer = pair
    teacher = tiny.tiny_llama(len(teacher_tokenizer), seed=0)
    task = CausalLMTask(max_length=16)
    data = DatasetDict(train=Dataset.from_dict({"text": TEXTS[:3]}))
    kwargs = dict(teacher_id="t", top_k=4, batch_size=3, shard_size=4, progress=False)
    capture_teacher_logits(teacher, teacher_tokenizer, task, data, tmp_path / "cache", **kwargs)
    cache = load_teacher_cache(tmp_path / "cache")
    with pytest.raises(CacheMismatchError, match="another tokenizer runs online: teacher_source: online"):
        cache.check_run(CausalLMTask(max_length=16), teacher.config, student, tiny_config(tmp_path / "o"))


@pytest.mark.slow
def test_two_processes_end_where_one_process_ends(cross_run, tmp_path):
    root, _, _ = cross_run
    # SGD: Adam would turn rounding differences of near-zero gradients (ULD at spans the random teacher
    # finds unlikely) into full-size updates, hiding what is compared.
    steps = {"max_steps": 4, "eval_split": "none", "logging_steps": 2, "optim": "sgd", "learning_rate": 0.5}
    one = run_distillation(*cross_args(root, output_dir=str(tmp_path / "one"), **steps))
    command = [*torchrun(), "scripts/distill.py"]
    launch(
        command + cross_argv(root, output_dir=str(tmp_path / "two"), per_device_train_batch_size=8, **steps)
    )
    two = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two"))
    for name, tensor in one.trainer.model.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    logged = json.loads((tmp_path / "two" / "trainer_state.json").read_text())["log_history"]
    reference = [e for e in one.trainer.state.log_history if "loss_soft_matched" in e]
    pairs = zip([e for e in logged if "loss_soft_matched" in e], reference, strict=True)
    for got, want in pairs:  # the two parts are averaged over both processes' spans
        assert got["loss_soft_matched"] == pytest.approx(want["loss_soft_matched"], rel=1e-4)
        assert got["loss_soft_unmatched"] == pytest.approx(want["loss_soft_unmatched"], rel=1e-4)


def test_a_resumed_run_ends_where_the_uninterrupted_one_ends(cross_run, tmp_path):
    root, _, _ = cross_run
    steps = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "eval_split": "none"}
    straight = run_distillation(*cross_args(root, output_dir=str(tmp_path / "straight"), **steps))
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run_distillation(
        *cross_args(root, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint="true", **steps)
    )
    assert resumed.trainer.state.global_step == 4
    for name, tensor in straight.trainer.model.state_dict().items():
        torch.testing.assert_close(resumed.trainer.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_python_api_with_rows_prepared_for_two_tokenizers(cross_run, tmp_path):
    root, student_tokenizer, teacher_tokenizer = cross_run
    task = CausalLMTask(max_length=48)
    rows = Dataset.load_from_disk(str(root / "data" / "train"))
    train = task.prepare(rows, student_processor=student_tokenizer, teacher_processor=teacher_tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(str(root / "teacher"))
    student = tiny.tiny_llama(len(student_tokenizer), seed=0, pad_token_id=0)
    config = tiny_config(tmp_path, max_steps=2, per_device_train_batch_size=8, logging_steps=1, alpha=0.5)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        task=task,
        train_dataset=train,
        processing_class=student_tokenizer,
    )
    assert isinstance(trainer.teacher_signal, CrossTokenizerTeacher)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss_soft_matched" in e]
    assert len(logged) == 2 and all(e["loss_soft_unmatched"] > 0 and e["loss_hard"] > 0 for e in logged)


def test_prompt_rows_align_with_a_chat_template_and_are_refused_without_one(pair):
    student, teacher_tokenizer = pair
    rows = Dataset.from_dict({"prompt": ["hello world"], "completion": ["said the cat"]})
    with pytest.raises(ValueError, match="prompt_column 'prompt' without a chat template is not supported"):
        CausalLMTask(max_length=32, prompt_column="prompt").prepare(
            rows, student_processor=student, teacher_processor=teacher_tokenizer
        )
    templated = byte_level_bpe()
    templated.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    row = CausalLMTask(max_length=128, prompt_column="prompt").prepare(
        rows, student_processor=templated, teacher_processor=teacher_tokenizer
    )[0]
    text = "user: hello world\nassistant: said the cat\n"
    assert row["teacher_input_ids"] == teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(column.startswith("kd_alignment") for column in row)
    labelled = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert templated.decode(labelled) == " said the cat\n"  # byte-level: the word keeps its space
