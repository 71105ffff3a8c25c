"""mini-MMT (issue 6): splits, labels, the log-likelihood scorer and the image projector."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from lime_examples.mini_mmt import (
    TASKS,
    Example,
    MiniVLM,
    MissingExtraError,
    PatchProjector,
    PromptEncoder,
    SplitCaps,
    TrainCollator,
    accuracy_report,
    load_mini_mmt,
    load_projector,
    save_projector,
    score_examples,
)
from lime_examples.mini_mmt.data import MODALITIES, SPLITS, require
from lime_examples.mini_mmt.scoring import predictions
from lime_examples.mini_mmt.tasks import BUILDERS
from lime_examples.mini_mmt.vlm import ProjectorConfig

from ._models import VOCAB, lora, tiny_llama

CAPS = SplitCaps(train=10, validation=3, test=5)


def _key(ex: Example) -> tuple:
    return (ex.task_id, ex.task, ex.modality, ex.prompt, ex.candidates, ex.label, ex.group)


@pytest.fixture(scope="module")
def suite():
    return load_mini_mmt(caps=CAPS)


# --- data -----------------------------------------------------------------------------------------------------
def test_splits_are_deterministic(suite) -> None:
    again = load_mini_mmt(caps=CAPS)
    for split in SPLITS:
        assert [_key(e) for e in suite.split(split)] == [_key(e) for e in again.split(split)]
        for a, b in zip(suite.split(split), again.split(split)):
            assert (a.image is None) == (b.image is None)
            if a.image is not None:
                assert torch.equal(a.image, b.image)
    other = load_mini_mmt(caps=CAPS, seed=1)
    assert [_key(e) for e in other.test] != [_key(e) for e in suite.test]


def test_full_splits_are_disjoint() -> None:
    """No split unit (question text, image, table row) is in two splits, before any cap."""
    for task in TASKS:
        built = BUILDERS[task.name](task, 0)
        groups = {s: {e.group for e in built[s]} for s in SPLITS}
        assert built["train"] and built["test"], task.name
        assert not groups["train"] & groups["test"], task.name
        assert not groups["train"] & groups["validation"], task.name
        assert not groups["validation"] & groups["test"], task.name
        if task.name == "chat_topic":  # a question text is one example
            prompts = {s: {e.prompt for e in built[s]} for s in SPLITS}
            assert not prompts["train"] & prompts["test"]


def test_every_task_present_with_valid_labels(suite) -> None:
    for split in SPLITS:
        examples = suite.split(split)
        assert {e.task for e in examples} == {t.name for t in TASKS}, split
        for ex in examples:
            assert ex.label in ex.candidates
            assert len(set(ex.candidates)) == len(ex.candidates) >= 2
            assert ex.modality in MODALITIES
            assert TASKS[ex.task_id].name == ex.task
            if ex.modality == "image":
                assert ex.image is not None and ex.image.shape == (3, 32, 32)
                assert 0.0 <= float(ex.image.min()) and float(ex.image.max()) <= 1.0
            else:
                assert ex.image is None
    counts = suite.summary()
    assert all(c["train"] == CAPS.train and c["test"] == CAPS.test for c in counts.values())


def test_smaller_caps_give_subsets(suite) -> None:
    small = load_mini_mmt(tasks=["digits", "iris", "chat_topic"], caps=SplitCaps(train=4, validation=1, test=2))
    for split in SPLITS:
        assert {_key(e) for e in small.split(split)} <= {_key(e) for e in suite.split(split)}
    topics = [e.label for e in suite.train if e.task == "chat_topic"]
    assert len(set(topics)) == len(topics)  # label-balanced: 10 examples, 10 different categories


def test_missing_extra_names_the_pip_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # makes `import easy_vqa` raise ImportError
    with pytest.raises(MissingExtraError, match="easy-vqa"):
        load_mini_mmt(tasks=["easy_vqa"], caps=CAPS)
    fake = TASKS[0].__class__(99, "fake", "text", "not-a-real-package", "not_a_real_module_xyz")
    with pytest.raises(ImportError, match="pip install not-a-real-package"):
        require(fake)
    with pytest.raises(ValueError, match="unknown mini-MMT task"):
        load_mini_mmt(tasks=["nope"])


# --- model side: a tiny Llama and a character tokenizer ---------------------------------------------------------
class CharTokenizer:
    """One token per character; adds a BOS token (id 2) when asked for special tokens."""

    unk_token_id, pad_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids = [3 + ord(ch) % (VOCAB - 3) for ch in text]
        return SimpleNamespace(input_ids=([2] if add_special_tokens else []) + ids)


def _vlm(lm: torch.nn.Module) -> tuple[MiniVLM, PromptEncoder]:
    torch.manual_seed(0)
    projector = PatchProjector(ProjectorConfig(hidden_size=lm.config.hidden_size), embed_rms=0.5)
    encoder = PromptEncoder(CharTokenizer(), projector.config.num_patches, max_prompt_tokens=40)
    return MiniVLM(lm, projector), encoder


def _examples() -> list[Example]:
    torch.manual_seed(1)
    out = []
    for i, prompt in enumerate(["ab", "question cd?", "e", "long prompt with more tokens:"]):
        image = torch.rand(3, 32, 32) if i % 2 else None
        cands = ("xx", "y", "zqw", "yq")
        out.append(Example(i % 2, f"task{i % 2}", "image" if image is not None else "text", prompt, cands,
                           cands[i % 4], f"g{i}", image))
    return out


def test_encoder_layout() -> None:
    _, enc = _vlm(tiny_llama())
    ex = _examples()[1]
    ids, mask = enc.prompt(ex)
    assert enc.prefix == [2] and ids[0] == 2
    assert mask == [False] + [True] * 16 + [False] * len(ex.prompt)
    assert enc.answer("xx") == tuple(CharTokenizer()(" xx", add_special_tokens=False).input_ids)


def test_scorer_picks_the_forced_candidate() -> None:
    """With the LM head biased towards token 'x', candidate 'xx' wins although it is longer than 'y'."""
    lm = tiny_llama()
    head = torch.nn.Linear(lm.config.hidden_size, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[CharTokenizer()("x", add_special_tokens=False).input_ids[0]] = 12.0
        head.bias[CharTokenizer()(" ", add_special_tokens=False).input_ids[0]] = 12.0
    lm.lm_head = head
    vlm, enc = _vlm(lm)
    examples = _examples()
    for share in (True, False):
        scores = score_examples(vlm, enc, examples, batch_size=3, share_prompt=share, progress=False)
        assert predictions(scores) == [0] * len(examples)
        # log p = log softmax of the bias: exact, since every other logit is 0
        top = torch.log_softmax(head.bias, -1)
        assert scores[0][0] == pytest.approx(3 * float(top[head.bias.detach().argmax()]), abs=1e-4)
    report = accuracy_report(examples, scores)
    assert report["per_task"] == {"task0": 0.5, "task1": 0.0}  # gold labels: xx, y, zqw, yq
    assert report["macro"] == 0.25 and report["n"] == {"task0": 2, "task1": 2}


def test_shared_prompt_scoring_matches_full_rows() -> None:
    """The KV-cache path (prompt once, candidates continued) equals scoring each prompt+candidate row in full."""
    vlm, enc = _vlm(tiny_llama())
    examples = _examples()
    shared = score_examples(vlm, enc, examples, batch_size=4, share_prompt=True, progress=False)
    full = score_examples(vlm, enc, examples, batch_size=2, share_prompt=False, max_rows=5, progress=False)
    one = score_examples(vlm, enc, examples, batch_size=1, share_prompt=True, progress=False)
    assert torch.allclose(torch.tensor(shared), torch.tensor(full), atol=1e-4)
    assert torch.allclose(torch.tensor(shared), torch.tensor(one), atol=1e-4)  # batching does not change scores


def test_scoring_through_lime_with_task_ids() -> None:
    from peft import get_peft_model

    import peft_lime

    lm = get_peft_model(tiny_llama(), peft_lime.LimeConfig(base=lora(), num_experts=4))
    peft_lime.enable_task_ids(lm)
    peft_lime.set_routing_stats_mode(lm, "always")  # scoring runs in eval mode
    vlm, enc = _vlm(lm)
    examples = _examples()
    peft_lime.reset_routing_stats(lm)
    shared = score_examples(vlm, enc, examples, share_prompt=True, with_task_ids=True, progress=False)
    usage = peft_lime.get_routing_stats(lm)["aggregate"]["task_usage"]
    assert set(usage) == {0, 1} and all(abs(sum(u) - 1) < 1e-4 for u in usage.values())
    full = score_examples(vlm, enc, examples, share_prompt=False, progress=False)
    assert torch.allclose(torch.tensor(shared), torch.tensor(full), atol=1e-4)


def test_projector_fills_image_token_positions(tmp_path) -> None:
    vlm, enc = _vlm(tiny_llama())
    examples = _examples()[:2]  # text, image
    batch = TrainCollator(enc)(examples)
    embeds = vlm.embed(batch["input_ids"], batch["pixel_values"], batch["image_mask"])
    plain = vlm.lm.get_input_embeddings()(batch["input_ids"])
    mask = batch["image_mask"]
    assert int(mask[0].sum()) == 0 and int(mask[1].sum()) == 16
    expected = vlm.projector(batch["pixel_values"][1:2])[0]
    assert torch.allclose(embeds[1][mask[1]], expected, atol=1e-6)
    assert torch.equal(embeds[~mask], plain[~mask])
    # image tokens sit right after the BOS prefix, in patch order
    assert mask[1].nonzero().flatten().tolist() == list(range(1, 17))
    # gradients reach the projector through the LM loss
    vlm(**batch).loss.backward()
    assert vlm.projector.proj.weight.grad is not None and vlm.projector.proj.weight.grad.abs().sum() > 0
    # save / load round trip
    save_projector(vlm.projector, tmp_path)
    loaded = load_projector(tmp_path)
    assert torch.equal(loaded(batch["pixel_values"]), vlm.projector(batch["pixel_values"]))


def test_collator_labels_only_answer_tokens() -> None:
    _, enc = _vlm(tiny_llama())
    examples = _examples()
    batch = TrainCollator(enc)(examples)
    for b, ex in enumerate(examples):
        answer = list(enc.answer(ex.label))
        labels = batch["labels"][b]
        assert labels[labels != -100].tolist() == answer
        n = len(enc.prompt(ex)[0]) + len(answer)
        assert batch["attention_mask"][b].sum() == n
        assert batch["input_ids"][b, n - len(answer):n].tolist() == answer
    assert batch["task_ids"].tolist() == [ex.task_id for ex in examples]


# --- main job helpers (issue 16) -----------------------------------------------------------------------------------
def test_tabular_rows_are_training_deciles() -> None:
    """Every tabular feature becomes one digit: its decile among the training rows (never the test rows)."""
    from lime_examples.mini_mmt.tasks import decile_edges, to_deciles

    train = torch.arange(100.0).reshape(100, 1)
    edges = decile_edges(train)
    assert [to_deciles(torch.tensor([v]), edges)[0] for v in (-5.0, 0.0, 10.0, 55.0, 99.0, 1e6)] == [0, 0, 1, 5, 9, 9]
    built = BUILDERS["iris"](TASKS[4], 0)
    assert len(built["test"]) >= 60  # the small tables give 40 % of their rows to the test split
    digits = [int(tok) for ex in built["train"] for tok in ex.prompt.split("\n")[0].split() if tok.isdigit()]
    assert len(digits) == 4 * len(built["train"]) and set(digits) == set(range(10))


def test_paired_bootstrap_and_distinct_predictions() -> None:
    from lime_examples.main_job import balanced_train_set, correct_items, distinct_predictions, paired_bootstrap

    examples = [Example(t, f"t{t}", "text", f"p{i}", ("a", "b"), "ab"[i % 2], f"g{t}-{i}") for t in (0, 1)
                for i in range(20)]
    always = [[1.0, 0.0] if ex.label == "a" else [0.0, 1.0] for ex in examples]  # always right
    constant = [[1.0, 0.0]] * len(examples)  # always "a": right half of the time
    right, half = correct_items(examples, always), correct_items(examples, constant)
    assert sum(right) == 40 and sum(half) == 20
    same = paired_bootstrap(examples, half, half, n_resamples=200)
    assert same["estimate"] == same["ci_low"] == same["ci_high"] == 0.0 and not same["excludes_zero"]
    gain = paired_bootstrap(examples, right, half, n_resamples=500)
    assert gain["estimate"] == pytest.approx(0.5) and gain["excludes_zero"]
    assert 0.25 < gain["ci_low"] < 0.5 < gain["ci_high"] < 0.75
    assert gain == paired_bootstrap(examples, right, half, n_resamples=500)  # seeded
    stuck = distinct_predictions(examples, constant)["t0"]
    assert stuck == {"distinct": 1, "labels": 2, "most_common": "a", "most_common_share": 1.0}
    mixed = balanced_train_set(examples[:3] + examples[20:], per_task=10, seed=0)
    assert [ex.task for ex in mixed].count("t0") == 10 and [ex.task for ex in mixed].count("t1") == 10
    assert {ex.prompt for ex in mixed if ex.task == "t0"} == {"p0", "p1", "p2"}  # small tasks are cycled
