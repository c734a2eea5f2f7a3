"""Feature distillation and teacher-initialised students: the losses against their formulas, the student
built from teacher layers against the teacher with those layers removed, the trainer's hook, and
scripts/distill.py end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from datasets import load_from_disk
from distill_run import write_tiny_run
from tiny import bert_classifier, tiny_config, tiny_llama, vit_classifier
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

import scripts.distill as distill_script
from hf_kd import DistillationTrainer
from hf_kd.config import ModelArguments
from hf_kd.data.toy_chat import write_toy_chat
from hf_kd.feature_losses import (
    FeatureProjection,
    attention_relation_loss,
    default_layer_mapping,
    hidden_state_loss,
)
from hf_kd.losses import DIVERGENCES
from hf_kd.student_init import choose_layers, find_layer_list, student_from_teacher
from hf_kd.tasks import CausalLMTask
from hf_kd.tasks.causal_lm import next_token_targets
from hf_kd.tasks.features import MLPClassifierConfig, MLPForFeatureClassification


def without_layers(model, path: str, removed: list[int]):
    """A copy of ``model`` with the blocks ``removed`` deleted from its ModuleList at ``path``."""
    reference = copy.deepcopy(model)
    blocks = reference.get_submodule(path)
    for index in sorted(removed, reverse=True):
        del blocks[index]
    return reference


def test_bert_student_from_layers_0_2_is_the_teacher_without_layers_1_and_3(tmp_path):
    teacher = bert_classifier(30, hidden=16, layers=4, seed=3).eval()
    student = student_from_teacher(teacher, [0, 2]).eval()
    reference = without_layers(teacher, "bert.encoder.layer", [1, 3]).eval()
    ids = torch.tensor([[2, 5, 7, 9, 3, 0], [2, 6, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        got = student(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
        full = teacher(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, full)  # the two removed layers did change the output
    assert len(teacher.bert.encoder.layer) == 4  # the teacher is untouched
    student.save_pretrained(tmp_path / "student")
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 16
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, want)


def test_llama_student_from_every_second_layer_reloads_and_generates(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    teacher = LlamaForCausalLM(config).eval()
    student = student_from_teacher(teacher, choose_layers(4, None, 2)).eval()
    reference = without_layers(teacher, "model.layers", [1, 3]).eval()
    ids = torch.tensor([[1, 4, 9, 16, 25, 36]])
    with torch.no_grad():
        torch.testing.assert_close(
            student(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0
        )
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]  # cache slots renumbered
    student.save_pretrained(tmp_path / "llama")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        generated = reloaded.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
        uncached = reloaded.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    assert generated.tolist() == uncached.tolist()


def test_vit_layers_are_found_and_models_without_a_layer_list_refused():
    path, blocks = find_layer_list(vit_classifier(layers=3))
    assert path == "vit.layers" and len(blocks) == 3  # transformers 5 names
    mlp = MLPForFeatureClassification(MLPClassifierConfig(input_dim=4, hidden_size=8, num_hidden_layers=2))
    with pytest.raises(ValueError, match="expected exactly one ModuleList of its 2 layers, found 0"):
        student_from_teacher(mlp, [0])
    with pytest.raises(ValueError, match=r"student_layers=\[2, 1\]"):
        choose_layers(4, [2, 1], None)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        choose_layers(4, [0, 4], None)


def test_hidden_losses_equal_their_formulas_with_the_projection():
    torch.manual_seed(0)
    student = [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    teacher = [torch.randn(2, 3, 6), torch.randn(2, 3, 6)]
    weights = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    projection = FeatureProjection(4, 6)
    w = projection.linear.weight.detach()  # [6, 4]
    for kind in ("mse", "cosine"):
        expected = 0.0
        for s, t in zip(student, teacher, strict=True):
            for b in range(2):
                for i in range(3):
                    x, y = w @ s[b, i], t[b, i]
                    if kind == "mse":
                        value = sum((x[j] - y[j]) ** 2 for j in range(6)) / 6
                    else:
                        value = 1 - (x @ y) / (x.norm() * y.norm())
                    expected += weights[b, i] * value / 2
        got = hidden_state_loss(student, teacher, weights, kind, projection)
        assert got.item() == pytest.approx(float(expected), rel=1e-5)
    assert FeatureProjection(4, 4)(student[0]) is student[0]  # same widths: no parameters, identity
    assert default_layer_mapping(2, 4) == {1: 2, 2: 4} and default_layer_mapping(3, 6) == {1: 2, 2: 4, 3: 6}


def _relations(a, b, heads, allowed):
    """[B, R, T, T] relation distributions written out with loops."""
    batch, length, width = a.shape
    d = width // heads
    out = torch.zeros(batch, heads, length, length)
    for n in range(batch):
        for r in range(heads):
            for i in range(length):
                scores = [
                    math.exp(
                        float(a[n, i, r * d : (r + 1) * d] @ b[n, j, r * d : (r + 1) * d]) / math.sqrt(d)
                    )
                    if allowed[n, i, j]
                    else 0.0
                    for j in range(length)
                ]
                total = sum(scores)
                out[n, r, i] = torch.tensor([x / total for x in scores])
    return out


def test_attention_relation_loss_equals_minilm_formula_across_head_counts():
    torch.manual_seed(1)
    student = tuple(torch.randn(2, 4, 4) for _ in range(3))  # width 4
    teacher = tuple(torch.randn(2, 4, 8) for _ in range(3))  # width 8: different heads and widths
    allowed = torch.ones(2, 4, 4, dtype=torch.bool)
    allowed[1, :, 3] = False  # the second example's last token is padding
    allowed[1, 3, 3] = True
    weights = torch.tensor([[0.25] * 4, [1 / 3, 1 / 3, 1 / 3, 0.0]])
    heads = 2
    expected = 0.0
    for pair in ((0, 1), (2, 2)):  # attention Q·K and value relation V·V
        s = _relations(student[pair[0]], student[pair[1]], heads, allowed)
        t = _relations(teacher[pair[0]], teacher[pair[1]], heads, allowed)
        for n in range(2):
            for r in range(heads):
                for i in range(4):
                    kl = sum(
                        float(t[n, r, i, j] * (t[n, r, i, j].log() - s[n, r, i, j].log()))
                        for j in range(4)
                        if t[n, r, i, j] > 0
                    )
                    expected += float(weights[n, i]) * kl / heads
    got = attention_relation_loss(student, teacher, weights, allowed, heads)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() > 0


def test_feature_options_are_checked_before_any_loading(tmp_path):
    with pytest.raises(ValueError, match="cached teacher does not have"):
        tiny_config(tmp_path, hidden_loss="mse", teacher_source="cached", teacher_cache="somewhere")
    with pytest.raises(ValueError, match=r"hidden_loss='l1' is not one of \('none', 'mse', 'cosine'\)"):
        tiny_config(tmp_path, hidden_loss="l1")
    with pytest.raises(ValueError, match="need the teacher: alpha=0.0"):
        tiny_config(tmp_path, attention_weight=1.0, alpha=0.0)
    assert tiny_config(tmp_path, layer_mapping="{1: 2}").layer_mapping == {1: 2}
    with pytest.raises(ValueError, match="exactly one of student_layers and every_k"):
        ModelArguments(student_init="teacher")
    with pytest.raises(ValueError, match="remove student_model_name_or_path / student_config"):
        ModelArguments(student_init="teacher", every_k=2, student_config={"model_type": "vit"})
    with pytest.raises(ValueError, match="need student_init: teacher"):
        ModelArguments(student_config={"model_type": "vit"}, every_k=2)


def test_trainer_adds_the_hidden_term_normalised_by_the_window_items(tmp_path):
    """compute_loss with hidden_loss = without it + w · Σ hidden / N, the teacher's states read in the one
    forward of its logits, the projection's parameters in the optimizer."""
    teacher, student = (
        bert_classifier(30, hidden=32, layers=2, seed=1),
        bert_classifier(30, hidden=16, seed=2),
    )
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 6, 3, 0, 0], [2, 8, 9, 3, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([0, 1, 0])}
    plain = DistillationTrainer(model=student, teacher_model=teacher, args=tiny_config(tmp_path))
    base = plain.compute_loss(student, batch).item()
    args = tiny_config(tmp_path, hidden_loss="mse", hidden_weight=0.7, layer_mapping={0: 0, 1: 2})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    window = torch.tensor([3, 6])  # a window of 6 items, this micro-batch 3 of them
    base_window = plain.compute_loss(student, batch, num_items_in_batch=window).item()
    calls = []
    teacher.register_forward_hook(lambda module, inputs, output: calls.append(1))
    total = trainer.compute_loss(student, batch, num_items_in_batch=window).item()
    assert len(calls) == 1  # one teacher forward for logits and hidden states
    with torch.no_grad():
        s = student(
            **{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True
        ).hidden_states
        t = teacher(
            **{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True
        ).hidden_states
        mask = batch["attention_mask"].float()
        weights = mask / mask.sum(1, keepdim=True)
        hidden = hidden_state_loss([s[0], s[1]], [t[0], t[2]], weights, "mse", trainer.features.projection)
    assert total == pytest.approx(base_window + 0.7 * hidden.item() / 6, rel=1e-5)
    assert base_window != pytest.approx(base)  # the window normaliser is really used
    trainer.create_optimizer()
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(trainer.features.projection.linear.weight) in optimised


def test_distill_script_with_teacher_layers_hidden_and_attention_losses(tmp_path, capsys):
    recipe = write_tiny_run(
        tmp_path,
        student_config=None,
        student_init="teacher",
        student_layers=[1],
        hidden_loss="cosine",
        hidden_weight=0.5,
        attention_weight=1.0,
        attention_relation_heads=2,
        logging_steps=2,
    )
    distill_script.main(["--config", str(recipe)])
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 32  # the teacher's width
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in logs if "loss" in entry]
    assert logged and all(entry["loss_hidden"] > 0 and entry["loss_attention"] > 0 for entry in logged)
    card = (out / "README.md").read_text()
    assert "teacher layers [1] of 2" in card and "hidden-state cosine (weight 0.5" in card
    assert "MiniLM attention and value relations" in card
    record = json.loads((out / "run_record.json").read_text())
    assert record["recipe"]["student_init"] == "teacher" and record["recipe"]["hidden_loss"] == "cosine"


def test_feature_losses_refused_with_a_cached_teacher_recipe(tmp_path):
    recipe = write_tiny_run(tmp_path, hidden_loss="mse", teacher_source="cached", teacher_cache=str(tmp_path))
    with pytest.raises(ValueError, match="use teacher_source: online"):
        distill_script.main(["--config", str(recipe)])
    assert not (tmp_path / "out").exists()


def test_feature_modules_import_no_layer_above():
    """feature_losses and student_init are pure (torch only); features is trainer layer."""
    from test_layers import ABOVE_PURE, imported_by, within

    for module in ("hf_kd.feature_losses", "hf_kd.student_init"):
        modules = imported_by(module)
        assert module in modules and within(modules, ABOVE_PURE + ("hf_kd.modeling", "hf_kd.data")) == []
    assert within(imported_by("hf_kd.features"), ("hf_kd.trainer", "hf_kd.runs", "hf_kd.data.loading")) == []


def test_feature_projection_is_checkpointed_and_a_killed_run_resumes_to_the_same_weights(
    tmp_path, monkeypatch
):
    """hidden_loss with a 16-wide student and a 32-wide teacher: the learned projection is saved beside the
    student in each checkpoint (not inside it) and read back on resume, so a run killed after checkpoint-3
    ends with the weights of the run never interrupted."""
    from safetensors.torch import load_file
    from test_faults_resume import assert_same_weights, interrupt, text_recipe, weights

    recipe = text_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "hidden_loss: mse\nhidden_weight: 1.0\n")
    straight, out = tmp_path / "straight", tmp_path / "killed"
    distill_script.main(["--config", str(recipe), "--output_dir", str(straight)])
    projection = [load_file(straight / f"checkpoint-{n}" / "feature_projection.safetensors") for n in (3, 6)]
    assert projection[0]["linear.weight"].shape == (32, 16)
    assert not torch.equal(projection[0]["linear.weight"], projection[1]["linear.weight"])  # it is trained
    assert not any("linear" in name for name in weights(straight / "checkpoint-3"))

    interrupt(recipe, out, "compute_loss", 4, real_kill=False, monkeypatch=monkeypatch)
    distill_script.main(
        ["--config", str(recipe), "--output_dir", str(out), "--resume_from_checkpoint", "true"]
    )
    assert_same_weights(weights(out), weights(straight))
    assert_same_weights(
        load_file(out / "checkpoint-8" / "feature_projection.safetensors"),
        load_file(straight / "checkpoint-8" / "feature_projection.safetensors"),
    )

    (out / "checkpoint-8" / "feature_projection.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-8' has no feature_projection.safetensors"):
        distill_script.main(
            ["--config", str(recipe), "--output_dir", str(out), "--resume_from_checkpoint", "true"]
        )


def test_stdlib_text_task_is_read_from_the_standard_librarys_docstrings(tmp_path):
    from hf_kd.data.stdlib_text import package_docstrings, stdlib_text_dataset, write_stdlib_text

    json_texts = package_docstrings("json")
    assert json_texts[0].startswith(
        "json javascript object notation https json org is a subset of javascript"
    )
    assert all(4 <= len(text.split()) <= 24 for text in json_texts) and len(set(json_texts)) == len(
        json_texts
    )
    dataset = stdlib_text_dataset(("json", "email"), seed=1)
    assert dataset["train"].features["label"].names == ["json", "email"]
    train, test = set(dataset["train"]["text"]), set(dataset["test"]["text"])
    assert not train & test and len(train) + len(test) == len(json_texts) + len(package_docstrings("email"))
    assert {
        t for t, y in zip(dataset["test"]["text"], dataset["test"]["label"], strict=True) if y == 0
    } <= set(json_texts)
    with pytest.raises(FileNotFoundError, match="package 'no_such_package': no standard-library folder"):
        package_docstrings("no_such_package")

    folder = write_stdlib_text(tmp_path / "text", ("json", "email"))
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    ids = tokenizer("return the name of the message")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == "return the name of the message".split()


def test_stdlib_text_kind_says_where_each_docstring_was_written():
    """``kind``: "method" for a function defined in a class body, "other" for a module, a class or another
    function; asking for it leaves the rows and their order as they were."""
    from hf_kd.data.stdlib_text import package_docstring_kinds, package_docstrings, stdlib_text_dataset

    kinds = package_docstring_kinds("json")
    assert list(kinds) == package_docstrings("json")
    where = {text.split(" s a str")[0]: kind for text, kind in kinds.items()}
    assert where["return the python representation of"] == "method"  # JSONDecoder.decode
    assert where["deserialize"] == "other"  # json.loads, a module-level function
    assert kinds[package_docstrings("json")[0]] == "other"  # the package's own docstring
    assert [kinds[t] for t in kinds if t.startswith("subclass of valueerror")] == ["other"]  # a class
    plain, with_kind = (
        stdlib_text_dataset(("json", "email")),
        stdlib_text_dataset(("json", "email"), kind=True),
    )
    assert plain["train"].column_names == ["text", "label"]
    for split in ("train", "test"):
        assert with_kind[split].select_columns(["text", "label"]).to_list() == plain[split].to_list()
        assert set(with_kind[split]["kind"]) == {"method", "other"}


@pytest.mark.parametrize(("alpha", "temperature"), [(0.5, 2.0), (1.0, 1.0)])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_feature_terms_compose_with_alpha_temperature_and_every_divergence(
    tmp_path, divergence, alpha, temperature
):
    """Total = the plain KD loss (same α, τ, divergence, batch) + w_h · L_hidden / N + w_a · L_attention / N,
    with L_hidden and L_attention rebuilt from the two models' hidden states and last-layer query, key and
    value projections; the backward reaches the student and the projection with finite gradients."""
    teacher, student = (
        bert_classifier(30, hidden=32, layers=2, seed=1),
        bert_classifier(30, hidden=16, seed=2),
    )
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 6, 3, 0, 0], [2, 8, 9, 3, 0]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0])}
    kd = dict(alpha=alpha, temperature=temperature, divergence=divergence)
    plain = DistillationTrainer(model=student, teacher_model=teacher, args=tiny_config(tmp_path, **kd))
    window = torch.tensor([3, 6])
    base = plain.compute_loss(student, batch, num_items_in_batch=window).item()
    args = tiny_config(
        tmp_path, **kd, hidden_loss="mse", hidden_weight=0.7, attention_weight=0.3, attention_relation_heads=2
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    total = trainer.compute_loss(student, batch, num_items_in_batch=window)
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        weights = mask.float() / mask.sum(1, keepdim=True)
        hidden = hidden_state_loss(
            [s[1]], [t[2]], weights, "mse", trainer.features.projection
        )  # default mapping

        def qkv(model, layer_input):
            attention = model.bert.encoder.layer[-1].attention.self
            return tuple(linear(layer_input) for linear in (attention.query, attention.key, attention.value))

        allowed = mask.bool()[:, None, :].expand(3, 5, 5) | torch.eye(5, dtype=torch.bool)
        attention = attention_relation_loss(qkv(student, s[0]), qkv(teacher, t[1]), weights, allowed, 2)
    assert hidden.item() > 0 and attention.item() > 0
    expected = base + 0.7 * hidden.item() / 6 + 0.3 * attention.item() / 6
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    projection = trainer.features.projection.linear.weight
    assert (
        projection.grad is not None
        and torch.isfinite(projection.grad).all()
        and projection.grad.abs().sum() > 0
    )
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert student.bert.encoder.layer[-1].attention.self.query.weight.grad.abs().sum() > 0


def _llama(vocab_size: int, width: int, layers: int, seed: int) -> LlamaForCausalLM:
    """A tiny Llama causal LM of the given width and depth."""
    return tiny_llama(
        vocab_size,
        seed,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        pad_token_id=0,
        use_cache=False,
    )


@pytest.fixture(scope="module")
def chat_rows(tmp_path_factory):
    """Toy chat conversations prepared completion-only (labels −100 on the prompt and the padding)."""
    path = write_toy_chat(tmp_path_factory.mktemp("chat") / "toy_chat", num_train=8, num_test=2)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    task = CausalLMTask(max_length=64)
    rows = task.prepare(load_from_disk(str(path))["train"], student_processor=tokenizer)
    return task, rows, len(tokenizer)


def _mse_by_hand(student, teacher, projection, batch, counted: torch.Tensor) -> float:
    """Σ over the ``counted`` [B, T] positions of mean_h((W s_1 − t_2)²), student layer 1 onto teacher layer 2."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        s = student(**inputs, output_hidden_states=True).hidden_states[1]
        t = teacher(**inputs, output_hidden_states=True).hidden_states[2]
    w = projection.linear.weight.detach()  # [32, 16]
    total = 0.0
    for b, i in counted.nonzero().tolist():
        total += ((w @ s[b, i] - t[b, i]) ** 2).mean().item()
    return total


def test_causal_lm_hidden_loss_counts_only_completion_positions(tmp_path, chat_rows):
    """Causal LM, completion-only labels, widths 16 → 32: the hidden term the trainer adds is
    w · Σ_{positions with a next-token target} MSE(W s, t) / N; prompt and padding positions do not count,
    and labels covering more positions change it accordingly."""
    task, rows, vocab = chat_rows
    teacher, student = _llama(vocab, 32, 2, seed=1).eval(), _llama(vocab, 16, 1, seed=2).eval()
    batch = task.collate([rows[i] for i in range(3)])
    mask, labels = batch["attention_mask"], batch["labels"]
    assert (mask == 0).any()  # padding present
    completion = next_token_targets(labels) != -100
    prompt = mask.bool() & ~completion
    assert completion.any() and prompt.sum() > completion.sum()  # most real positions are the prompt's
    plain = DistillationTrainer(model=student, teacher_model=teacher, args=tiny_config(tmp_path), task=task)
    args = tiny_config(tmp_path, hidden_loss="mse", hidden_weight=0.7)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, task=task)
    projection = trainer.features.projection
    assert projection.linear is not None and projection.linear.weight.shape == (32, 16)

    def hidden_term(batch, window):
        with torch.no_grad():
            with_hidden = trainer.compute_loss(student, batch, num_items_in_batch=window).item()
            without = plain.compute_loss(student, batch, num_items_in_batch=window).item()
        return with_hidden - without

    window = torch.tensor([int(completion.sum()), 40])  # the window's soft-item count: 40
    added = hidden_term(batch, window)
    on_completion = _mse_by_hand(student, teacher, projection, batch, completion)
    on_prompt = _mse_by_hand(student, teacher, projection, batch, prompt)
    assert on_prompt > 0.1 * on_completion  # counting the prompt would change the value visibly
    assert added == pytest.approx(0.7 * on_completion / 40, rel=1e-4)
    # The same inputs, labels on every real token: the prompt positions now count too.
    full = {**batch, "labels": batch["input_ids"].masked_fill(mask == 0, -100)}
    every = next_token_targets(full["labels"]) != -100
    assert torch.equal(every & completion, completion) and every.sum() > completion.sum()
    added_full = hidden_term(full, window)
    assert added_full == pytest.approx(
        0.7 * _mse_by_hand(student, teacher, projection, full, every) / 40, rel=1e-4
    )
    assert added_full > added * 1.5


def test_causal_lm_training_with_hidden_loss_logs_a_finite_loss_hidden(tmp_path, chat_rows):
    task, rows, vocab = chat_rows
    teacher, student = _llama(vocab, 32, 2, seed=1), _llama(vocab, 16, 1, seed=2)
    args = tiny_config(
        tmp_path,
        hidden_loss="mse",
        hidden_weight=0.5,
        max_steps=3,
        logging_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, task=task, train_dataset=rows
    )
    before = trainer.features.projection.linear.weight.detach().clone()
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    assert all(math.isfinite(entry["loss_hidden"]) and entry["loss_hidden"] > 0 for entry in logged)
    assert not torch.equal(
        trainer.features.projection.linear.weight.detach(), before
    )  # trained with the student
