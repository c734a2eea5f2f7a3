"""Served teacher: scripts/serve_teacher.py started as a real process on a free port of 127.0.0.1 and the
client (hf_kd.teachers.served) reading it: vLLM's request and answer shapes, the log-probs equal to the
online teacher's top-k, a run trained from the server equal to one trained from a cache of the same
teacher, refusals before training (another model, another tokenizer, no key), the server down mid-run
(a named error, the checkpoint intact, the resumed run equal to the run never interrupted)."""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from processes import TeacherServer
from tiny import save_model, tiny_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback

from hf_kd import DistillationTrainer
from hf_kd.losses import SparseLogits
from hf_kd.tasks import CausalLMTask
from hf_kd.teachers.cache.capture import capture_teacher_logits
from hf_kd.teachers.served import ServedTeacher, TeacherServerError
from hf_kd.teachers.signal import build_teacher_signal, open_teacher_source

K = 4
KEY_ENV = "HF_KD_TEST_TEACHER_KEY"


def tokenizer_of(words: list[str]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]


def gpt(seed: int, vocab: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g).tolist()
    return [" ".join(f"w{i}" for i in torch.randint(0, 29, (m,), generator=g).tolist()) for m in lengths]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny GPT-2 teacher with its tokenizer, a server for it (key required), and 24 texts."""
    root = tmp_path_factory.mktemp("served")
    tokenizer = tokenizer_of(WORDS)
    teacher = gpt(0).eval()
    save_model(teacher, tokenizer, root / "teacher")
    data = DatasetDict(train=Dataset.from_dict({"text": texts(24, 0)}))
    env = {KEY_ENV: "s3cret-key"}
    with TeacherServer(
        root / "teacher", "--served-model-name", "tiny-gpt", "--api-key-env", KEY_ENV, env=env
    ) as server:
        yield root, tokenizer, teacher, data, server


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "s3cret-key")


def served_config(tmp_path, server, **options):
    options = {"url": server.url, "model": "tiny-gpt", "top_k": K, "api_key_env": KEY_ENV, **options}
    return tiny_config(tmp_path / "out", teacher_source="served", teacher_options=options, alpha=0.5)


def signal_and_rows(setup, config):
    _, tokenizer, _, data, _ = setup
    task = CausalLMTask(max_length=8)
    task.use_processor(tokenizer)
    client, splits = open_teacher_source(config, task, data, ["train"])
    rows = task.prepare(splits["train"], student_processor=tokenizer)
    return (
        build_teacher_signal(config, task, gpt(1), resource=client, student_processor=tokenizer),
        task,
        rows,
    )


def post(server, path, payload, key="s3cret-key"):
    request = urllib.request.Request(
        server.url + path,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def test_the_server_answers_in_vllms_shape(setup):
    """POST /v1/completions with one token-id prompt: vLLM's completion object; prompt_logprobs is None at
    position 0, then a dict keyed by the token id as a string, of {logprob, rank, decoded_token}, holding
    the k of rank 1..k and the prompt's own token."""
    _, tokenizer, teacher, _, server = setup
    ids = [5, 9, 3, 17]
    answer = post(
        server, "/v1/completions", {"model": "tiny-gpt", "prompt": ids, "max_tokens": 1, "prompt_logprobs": K}
    )
    assert answer["object"] == "text_completion" and answer["model"] == "tiny-gpt"
    (choice,) = answer["choices"]
    assert choice["index"] == 0 and len(choice["prompt_logprobs"]) == len(ids)
    assert choice["prompt_logprobs"][0] is None
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(input_ids=torch.tensor([ids])).logits[0], -1)
    for t in range(1, len(ids)):
        entries = choice["prompt_logprobs"][t]
        assert str(ids[t]) in entries
        ranks = sorted(entry["rank"] for entry in entries.values())
        assert ranks[:K] == [1, 2, 3, 4]
        for token, entry in entries.items():
            assert set(entry) == {"logprob", "rank", "decoded_token"}
            assert entry["logprob"] == pytest.approx(log_p[t - 1, int(token)].item(), abs=1e-5)
            assert entry["decoded_token"] == tokenizer.decode([int(token)])
    assert choice["text"] == tokenizer.decode([int(log_p[-1].argmax())])


def test_served_log_probs_equal_the_online_teachers_top_k(setup, tmp_path, key):
    """Through the server, at every position with a next-token target: the same top-k ids, log-probs and
    tail mass as SparseLogits.from_logits of the teacher's own logits on the same padded batch; the
    collator's request is the one the step uses."""
    _, tokenizer, teacher, _, server = setup
    signal, task, rows = signal_and_rows(setup, served_config(tmp_path, server))
    assert isinstance(signal, ServedTeacher)
    batch = signal.collator(task.collate)([rows[i] for i in range(6)])
    assert len(signal._pending) == 1
    served = signal(batch)
    assert not signal._pending
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = SparseLogits.from_logits(logits, K)
    targets = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    targets[:, :-1] = batch["attention_mask"][:, 1:].bool()  # positions whose next token is real
    assert int(targets.sum()) > 20
    assert torch.equal(served.indices[targets], reference.indices[targets])
    torch.testing.assert_close(served.log_probs[targets], reference.log_probs[targets], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        served.tail_log_mass[targets], reference.tail_log_mass[targets], atol=1e-4, rtol=1e-4
    )


def test_a_server_for_another_model_or_tokenizer_is_refused_before_training(setup, tmp_path, key):
    _, tokenizer, _, data, server = setup
    task = CausalLMTask(max_length=8)
    with pytest.raises(TeacherServerError, match=r"serves \['tiny-gpt'\], not teacher_options.model='other'"):
        open_teacher_source(served_config(tmp_path, server, model="other"), task, data, ["train"])
    other = tokenizer_of(["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(28, -1, -1)])
    task.use_processor(other)
    config = served_config(tmp_path, server)
    client, _ = open_teacher_source(config, task, data, ["train"])
    with pytest.raises(TeacherServerError, match="reads another tokenizer than the student"):
        build_teacher_signal(config, task, gpt(1), resource=client, student_processor=other)


def test_without_the_key_the_server_refuses_and_the_key_is_written_nowhere(setup, tmp_path, monkeypatch):
    _, tokenizer, _, data, server = setup
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = served_config(tmp_path, server)
    with pytest.raises(TeacherServerError, match=r"refused /v1/models \(HTTP 401\)"):
        open_teacher_source(config, CausalLMTask(max_length=8), data, ["train"])
    assert "s3cret" not in json.dumps(config.to_dict())


def test_a_server_down_is_a_named_error(setup, tmp_path, key):
    _, _, _, data, server = setup
    config = served_config(tmp_path, server, url="http://127.0.0.1:9", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(TeacherServerError, match=r"did not answer /v1/models after 2 tries"):
        open_teacher_source(config, CausalLMTask(max_length=8), data, ["train"])


def train(setup, tmp_path, config_fields, *, resume=False, callbacks=()):
    """Four steps of batch 6 from the served (or cached) teacher; the student's final weights."""
    root, tokenizer, teacher, data, server = setup
    fields = dict(max_steps=4, per_device_train_batch_size=6, learning_rate=1e-2, logging_steps=1, alpha=0.5)
    config = tiny_config(tmp_path, **{**fields, **config_fields})
    task = CausalLMTask(max_length=8)
    task.use_processor(tokenizer)
    resource, splits = open_teacher_source(config, task, data, ["train"])
    student = gpt(1)
    signal = build_teacher_signal(config, task, student, resource=resource, student_processor=tokenizer)
    trainer = DistillationTrainer(
        model=student,
        teacher_signal=signal,
        args=config,
        task=task,
        train_dataset=task.prepare(splits["train"], student_processor=tokenizer),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    return {name: value.detach().clone() for name, value in student.state_dict().items()}


def served_fields(server, **options):
    return dict(
        teacher_source="served",
        teacher_options={
            "url": server.url,
            "model": "tiny-gpt",
            "top_k": K,
            "api_key_env": KEY_ENV,
            **options,
        },
    )


def test_a_student_trained_from_the_server_ends_where_one_from_a_cache_ends(setup, tmp_path, key):
    """Same seed, same teacher, same top-k and sparse_tail: the served run's weights equal the cached run's,
    its requests made in the training process or in a DataLoader worker."""
    root, tokenizer, teacher, data, server = setup
    capture_teacher_logits(
        teacher,
        tokenizer,
        CausalLMTask(max_length=8),
        data,
        tmp_path / "cache",
        teacher_id="tiny-gpt",
        top_k=K,
        progress=False,
    )
    cached = train(
        setup, tmp_path / "cached", dict(teacher_source="cached", teacher_cache=str(tmp_path / "cache"))
    )
    served = train(setup, tmp_path / "served", served_fields(server))
    assert not torch.equal(served["lm_head.weight"], gpt(1).lm_head.weight)  # it trained
    # asked in a DataLoader worker: the answers travel in the batch (kd_teacher_served_* columns)
    in_worker = train(setup, tmp_path / "worker", {**served_fields(server), "dataloader_num_workers": 1})
    for name in cached:
        torch.testing.assert_close(served[name], cached[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(in_worker[name], cached[name], atol=1e-5, rtol=1e-4)


class StopServerAtSave(TrainerCallback):
    """Stops the teacher server once the first checkpoint is written."""

    def __init__(self, server):
        self.server = server

    def on_save(self, args, state, control, **kwargs):
        self.server.stop()


def test_the_server_down_mid_run_stops_with_a_named_error_and_resume_finishes_the_run(setup, tmp_path, key):
    """The server stops after checkpoint-2: the run stops with TeacherServerError, checkpoint-2 stays
    complete; with the server back the resumed run ends with the weights of the run never interrupted."""
    _, _, _, _, server = setup
    save = dict(save_strategy="steps", save_steps=2)
    whole = train(setup, tmp_path / "whole", {**served_fields(server), **save})
    out = tmp_path / "cut"
    fields = {**served_fields(server, retries=1, backoff=0.01, timeout=5), **save}
    try:
        with pytest.raises(TeacherServerError, match="did not answer /v1/completions after 2 tries"):
            train(setup, out, fields, callbacks=[StopServerAtSave(server)])
    finally:
        server.start()
    checkpoints = sorted(p.name for p in Path(out).iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-2"]
    resumed = train(setup, out, fields, resume=True)
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-6, rtol=1e-5)


def post_raw(server, payload, key="s3cret-key") -> bytes:
    request = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.read()


@pytest.mark.parametrize("k", [K, 0, None])
def test_the_servers_answer_is_the_text_json_dumps_writes_of_it(setup, k):
    """The server writes its answer's JSON text from pieces: byte for byte what ``json.dumps`` writes of the
    parsed answer (keys in vLLM's order, floats as Python writes them), for several prompts of which one has
    a single token (no position to score), with k log-probs, none, or no prompt_logprobs asked."""
    *_, server = setup
    prompts = [[5, 9, 3, 17, 3], [7], [1, 2]]
    raw = post_raw(server, {"model": "tiny-gpt", "prompt": prompts, "max_tokens": 1, "prompt_logprobs": k})
    answer = json.loads(raw)
    assert raw.decode() == json.dumps(answer)
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    logprobs = [c["prompt_logprobs"] for c in answer["choices"]]
    if k is None:
        assert logprobs == [None, None, None]
    else:
        assert [len(p) for p in logprobs] == [5, 1, 2] and logprobs[1] == [None]
        assert all(len(position) in (k, k + 1) for p in logprobs for position in p[1:])


def per_position_reading(answers, lengths, length, top_k, num_classes) -> SparseLogits:
    """The reading of prompt_logprobs one position at a time (the conversion before the vectorised one):
    each position's entries sorted by rank (stable), the first top_k kept; ids ≥ num_classes dropped and
    the rest renormalised, their slots padding."""
    log_probs = torch.full((len(answers), length, top_k), -math.log(top_k))
    indices = torch.arange(top_k).expand(len(answers), length, top_k).clone()
    tail = torch.full((len(answers), length), -math.inf)
    for b, (answer, n) in enumerate(zip(answers, lengths, strict=True)):
        for t, position in enumerate(answer[1:n]):
            top = sorted(position.items(), key=lambda item: item[1]["rank"])[:top_k]
            kept = [(int(i), e["logprob"]) for i, e in top if int(i) < num_classes]
            dropped = sum(math.exp(e["logprob"]) for i, e in top if int(i) >= num_classes)
            norm = math.log1p(-min(dropped, 1.0 - 1e-12)) if len(kept) < top_k else 0.0
            ids = [i for i, _ in kept]
            free = (i for i in range(num_classes) if i not in ids)
            ids += [next(free) for _ in range(top_k - len(kept))]
            values = [v - norm for _, v in kept] + [-math.inf] * (top_k - len(kept))
            row = torch.tensor(values, dtype=torch.float64)
            log_probs[b, t], indices[b, t] = row.float(), torch.tensor(ids)
            tail[b, t] = torch.log1p(-row.exp().sum().clamp(max=1.0)).float()
    return SparseLogits(log_probs, indices, tail, num_classes)


def test_the_vectorised_reading_equals_the_per_position_one():
    """sparse_from_prompt_logprobs (entries read in one pass, chosen on tensors) equals the per-position
    reading exactly, on answers built to hit its corners: the prompt's own token first (as vLLM orders it)
    or last, in the top-k (k entries) or not (k + 1), tied in rank with a top-k entry (the entry given first
    wins), equal log-probs, a −inf log-prob, ids past the vocabulary (dropped, renormalised), rows of 0, 1
    and 2 tokens next to longer ones."""
    from hf_kd.teachers.served import sparse_from_prompt_logprobs

    g = torch.Generator().manual_seed(0)
    num_classes, top_k = 30, 4

    def entry(logprob, rank):
        return {"logprob": logprob, "rank": rank, "decoded_token": "w"}

    def position():
        ids = torch.randperm(num_classes + 3, generator=g)[: top_k + 1].tolist()  # 3 ids past the vocabulary
        values = torch.rand(top_k, generator=g, dtype=torch.float64).mul(0.2).log().sort(descending=True)[0]
        values = values.tolist()
        corner = int(torch.randint(0, 4, (), generator=g))
        if corner == 1:
            values[1] = values[0]  # equal log-probs
        elif corner == 2:
            values[-1] = -math.inf
        entries = {
            str(i): entry(v, r) for r, (i, v) in enumerate(zip(ids[:top_k], values, strict=True), start=1)
        }
        own, own_rank = str(ids[top_k]), int(torch.randint(1, top_k + 3, (), generator=g))
        own_entry = entry(values[min(own_rank, top_k) - 1] - 0.01 * (own_rank > top_k), own_rank)
        where = int(torch.randint(0, 3, (), generator=g))  # first (vLLM), last, or in the top-k already
        if where == 0:
            return {own: own_entry, **entries}
        return {**entries, own: own_entry} if where == 1 else entries

    for _ in range(20):
        lengths = torch.randint(0, 9, (5,), generator=g).tolist()
        lengths[:3] = [0, 1, 2]
        answers = [[None, *(position() for _ in range(n - 1))] if n else [] for n in lengths]
        fast = sparse_from_prompt_logprobs(answers, lengths, 10, top_k, num_classes)
        slow = per_position_reading(answers, lengths, 10, top_k, num_classes)
        assert torch.equal(fast.log_probs, slow.log_probs)
        assert torch.equal(fast.indices, slow.indices)
        assert torch.equal(fast.tail_log_mass, slow.tail_log_mass)
    assert (fast.indices < num_classes).all() and (fast.log_probs == -math.inf).any()


def test_ids_beyond_the_students_vocabulary_are_dropped_and_the_rest_renormalised():
    """A padded output layer's id in the top-k (id 40 ≥ the student's 40 classes): dropped, the kept
    log-probs renormalised over the mass left, its slot padding (−inf), the tail what the kept leave."""
    from hf_kd.teachers.served import sparse_from_prompt_logprobs

    def entry(logprob, rank):
        return {"logprob": math.log(logprob), "rank": rank, "decoded_token": "x"}

    answer = [None, {"7": entry(0.5, 1), "40": entry(0.3, 2), "3": entry(0.1, 3), "9": entry(0.05, 5)}]
    sparse = sparse_from_prompt_logprobs([answer], [2], 2, 3, 40)
    torch.testing.assert_close(sparse.log_probs[0, 0, :2], torch.tensor([0.5 / 0.7, 0.1 / 0.7]).log())
    assert sparse.log_probs[0, 0, 2] == -math.inf and sparse.indices[0, 0].tolist()[:2] == [7, 3]
    assert sparse.indices[0, 0, 2] not in (7, 3)
    torch.testing.assert_close(sparse.tail_log_mass[0, 0], torch.tensor(1 - 0.6 / 0.7).log())


def test_on_policy_samples_are_scored_by_the_server(tmp_path, key):
    """lmbda = 1: the student's sampled completions (which no collator saw) are asked of the server when
    the step needs them, and equal the teacher's own top-k on the sampled batch."""
    from test_on_policy import PAD, tiny_llama

    from hf_kd.data.toy_chat import write_toy_chat

    path = write_toy_chat(tmp_path / "toy_chat", num_train=8, num_test=2)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path / "tokenizer"))
    teacher = tiny_llama(40, seed=1).eval()
    save_model(teacher, tokenizer, tmp_path / "teacher")
    with TeacherServer(tmp_path / "teacher", "--served-model-name", "toy") as server:
        options = {"url": server.url, "model": "toy", "top_k": K}
        config = tiny_config(
            tmp_path / "out", teacher_source="served", teacher_options=options, alpha=0.5, lmbda=1.0,
            max_new_tokens=4, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        )  # fmt: skip
        task = CausalLMTask(max_length=64)
        task.use_processor(tokenizer, pad_token_id=PAD)
        from datasets import load_from_disk

        client, splits = open_teacher_source(config, task, load_from_disk(str(path)), ["train"])
        rows = task.prepare(splits["train"], student_processor=tokenizer)
        student = tiny_llama(40, seed=0)
        signal = build_teacher_signal(config, task, student, resource=client, student_processor=tokenizer)
        trainer = DistillationTrainer(
            model=student,
            teacher_signal=signal,
            args=config,
            task=task,
            train_dataset=rows,
            processing_class=tokenizer,
        )
        batch = trainer.data_collator([rows[i] for i in range(4)])
        (sampled,), _ = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
        assert not torch.equal(sampled["input_ids"], batch["input_ids"])  # the student's completions
        served = signal(sampled)
        with torch.no_grad():
            logits = teacher(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]).logits
        reference = SparseLogits.from_logits(logits, K)
        targets = torch.zeros_like(sampled["attention_mask"], dtype=torch.bool)
        targets[:, :-1] = sampled["attention_mask"][:, 1:].bool()
        assert torch.equal(served.indices[targets], reference.indices[targets])
        torch.testing.assert_close(
            served.log_probs[targets], reference.log_probs[targets], atol=1e-5, rtol=1e-5
        )
        trainer.train()
        assert [h for h in trainer.state.log_history if "loss_soft_generated" in h]
