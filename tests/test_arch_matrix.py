"""Architecture matrix: LiME over LoRA on tiny random models of many architectures (tests/_arch_models.py).

Every cell is one architecture x one check, with ids like "falcon-train_step":
- wrap: LiME wraps exactly the layers plain LoRA wraps, adding E*d + d + 1 trainable values per layer
- train_step: one SGD step; finite losses, a non-zero finite gradient on every LoRA and every expert tensor
- save_load: save_pretrained -> PeftModel.from_pretrained on a fresh base gives the same outputs (1e-5: the same
  weights run through the same ops, so only the load path could differ)
- batch_{left,right}_n{1,3}: a sample's outputs alone equal its outputs inside a padded batch (1e-4: batching changes
  matmul shapes, i.e. float rounding only; a batch- or padding-dependent route moves outputs far more, since the
  experts are scattered far from 1); batch_n{1,3} for models without padding (vision encoders): alone vs batched
- generate_n{1,3}: generate(use_cache=True) step logits equal generate(use_cache=False) ones, and a second cached call
  equals the first (1e-4, as above: the cached path sums in another order)
- disable_adapter: with the adapter disabled the outputs are exactly the base model's (the same ops run)
- target_parameters (MoE): wrapping the fused expert parameters is refused with a clear error

Where transformers itself fails a check for an architecture (BASE_FAILURES), the cell asserts that the base model
without any adapter fails it too, and that LiME does no better: the cell fails as soon as transformers is fixed.
`python -m tests.arch_matrix_table` prints the matrix as the table of README.md's "Supported architectures".
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from peft_lime import LimeConfig, LimeLayer

from ._arch_models import ARCHS, FAMILY_OF, PAD, ArchModel, build, collate, samples
from ._models import lime, lora, scatter_experts

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
ATOL_SAVE = 1e-5
NUM_EXPERTS = 4
NEW_TOKENS = 3

# Suffix: "n1" / "n3" causal windows of 1 / 3 tokens, "p3" the opening's first 3 tokens (ngram_mode="prefix").
PADDED_CHECKS = (
    "batch_left_n1",
    "batch_left_n3",
    "batch_right_n1",
    "batch_right_n3",
    "batch_left_p3",
    "batch_right_p3",
)
UNPADDED_CHECKS = ("batch_n1", "batch_n3", "batch_p3")
GENERATE_CHECKS = ("generate_n1", "generate_n3", "generate_p3")
CHECKS = ("wrap", "train_step", "save_load", *PADDED_CHECKS, *UNPADDED_CHECKS, *GENERATE_CHECKS, "disable_adapter")

# (architecture, check) -> why transformers itself fails it; the cell asserts the base model fails it too.
_BART_POSITIONS = (
    "BART's learned positions count the left padding (positions start at the first column, not the first token) and "
    "BartForConditionalGeneration takes no position_ids: a left-padded sample's logits change without any adapter"
)
BASE_FAILURES: dict[tuple[str, str], str] = {
    ("bart", "batch_left_n1"): _BART_POSITIONS,
    ("bart", "batch_left_n3"): _BART_POSITIONS,
    ("bart", "batch_left_p3"): _BART_POSITIONS,
}


def applicable(name: str, check: str) -> bool:
    family = FAMILY_OF[name]
    if check in PADDED_CHECKS:
        return family != "vision"
    if check in UNPADDED_CHECKS:
        return family == "vision"
    if check in GENERATE_CHECKS:
        return family not in ("encoder", "vision")  # no generation
    if check == "target_parameters":
        return family == "moe"
    return check in CHECKS


# --- building --------------------------------------------------------------------------------------------------------


def lime_model(name: str, n_gram: int = 1, ngram_mode: str = "causal") -> tuple[Any, ArchModel]:
    """LiME over LoRA r=4 (random B), E=4, experts scattered far from 1 so that a wrong route shows."""
    arch = build(name)
    torch.manual_seed(0)
    config = lime(lora(target_modules=arch.targets), num_experts=NUM_EXPERTS, n_gram=n_gram, ngram_mode=ngram_mode)
    model = get_peft_model(arch.model, config)
    scatter_experts(model)
    return model.eval(), arch


def base_model(name: str, n_gram: int = 1, ngram_mode: str = "causal") -> tuple[Any, ArchModel]:
    arch = build(name)
    return arch.model, arch


def _output(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _forward(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return _output(model(**batch))


def _ids_aligned(arch: ArchModel) -> bool:
    """Whether the outputs have one row per padded id (not so for encoder-decoders padded on the encoder side)."""
    return arch.kind in ("causal", "masked", "speech", "vlm")


# --- the checks: each raises (AssertionError naming what differs) when the cell fails ---------------------------------


def check_wrap(make: Callable[..., tuple[Any, ArchModel]]) -> None:
    model, arch = make()
    plain = get_peft_model(build(arch.name).model, LoraConfig(**_lora_kwargs(arch)))
    lora_layers = {n for n, m in plain.named_modules() if isinstance(m, LoraLayer)}
    lime_layers = {n: m for n, m in model.named_modules() if isinstance(m, LimeLayer)}
    assert lime_layers, "no layer wrapped"
    assert set(lime_layers) == lora_layers, f"LiME wraps {sorted(set(lime_layers) ^ lora_layers)} unlike LoRA"
    lora_count = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    expected = lora_count + sum(NUM_EXPERTS * m.out_features + m.out_features + 1 for m in lime_layers.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected, f"{trainable} trainable values, expected LoRA's {lora_count} + E*d + d + 1 per layer"


def check_train_step(make: Callable[..., tuple[Any, ArchModel]]) -> None:
    model, arch = make(n_gram=3)
    model.train()
    batch = collate(arch, samples(arch, arch.lengths), "right")
    loss = _loss(model, arch, batch)
    assert torch.isfinite(loss), f"loss {loss.item()}"
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lime_experts" in n for n in trainable) and any("lora_B" in n for n in trainable), sorted(trainable)
    for n, p in trainable.items():
        if any(module in n for module in arch.discarded):
            assert p.grad is None, f"{n}: a discarded output got a gradient"
            continue
        assert p.grad is not None, f"no gradient reaches {n}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient on {n}"
        assert p.grad.abs().sum() > 0, f"zero gradient on {n}"
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    with torch.no_grad():
        after = _loss(model, arch, batch)
    assert torch.isfinite(after) and after != loss, f"loss {loss.item()} -> {after.item()} after the step"


def _loss(model: Any, arch: ArchModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if arch.kind == "vision":  # no labels needed: any scalar of the outputs
        return _output(model(**batch)).square().mean()
    if arch.kind == "seq2seq":
        labels = batch["decoder_input_ids"].clone()
    else:
        labels = batch[arch.ids_key].masked_fill(batch[arch.mask_key] == 0, -100)
    return model(**batch, labels=labels).loss


def check_save_load(make: Callable[..., tuple[Any, ArchModel]], path: Any) -> None:
    model, arch = make(n_gram=3)
    batch = collate(arch, samples(arch, arch.lengths), "right")
    before = _forward(model, batch)
    model.save_pretrained(path)
    loaded = PeftModel.from_pretrained(build(arch.name).model, path).eval()
    torch.testing.assert_close(_forward(loaded, batch), before, atol=ATOL_SAVE, rtol=0)


def check_batch(make: Callable[..., tuple[Any, ArchModel]], side: str, n_gram: int, mode: str = "causal") -> None:
    model, arch = make(n_gram=n_gram, ngram_mode=mode)
    group = samples(arch, arch.lengths)
    batch = collate(arch, group, side)
    together = _forward(model, batch)
    for i, sample in enumerate(group):
        alone = _forward(model, collate(arch, [sample]))[0]
        row = together[i]
        if arch.ids_key is not None and _ids_aligned(arch):
            row = row[batch[arch.mask_key][i].bool()]
        torch.testing.assert_close(row, alone, atol=ATOL, rtol=0, msg=lambda m, i=i: f"sample {i}: {m}")


def check_generate(make: Callable[..., tuple[Any, ArchModel]], n_gram: int, mode: str = "causal") -> None:
    model, arch = make(n_gram=n_gram, ngram_mode=mode)
    batch = collate(arch, samples(arch, (arch.prompt_length,) * 2))
    if arch.kind in ("seq2seq", "speech"):  # decoding starts from decoder_start_token_id
        batch.pop("decoder_input_ids", None)
        for key in ("decoder_attention_mask", "decoder_position_ids"):
            batch.pop(key, None)
    batch.pop("position_ids", None)  # generate() derives positions from the attention mask
    cached = _generate_logits(model, batch, use_cache=True)
    uncached = _generate_logits(model, batch, use_cache=False)
    again = _generate_logits(model, batch, use_cache=True)
    assert cached.shape[1] == NEW_TOKENS, tuple(cached.shape)
    torch.testing.assert_close(cached, uncached, atol=ATOL, rtol=0, msg=lambda m: f"cached vs uncached: {m}")
    torch.testing.assert_close(again, cached, atol=ATOL, rtol=0, msg=lambda m: f"second cached call: {m}")


def _generate_logits(model: Any, batch: dict[str, torch.Tensor], use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            **copy.deepcopy(batch),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=PAD,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return torch.stack(out.logits, dim=1)


def check_disable_adapter(name: str) -> None:
    arch = build(name)
    batch = collate(arch, samples(arch, arch.lengths), "right")
    base = _forward(arch.model, batch)
    model, _ = lime_model(name)
    active = _forward(model, batch)
    assert (active - base).abs().max() > 1e-3, "the adapter changes nothing: the comparison below would prove nothing"
    with model.disable_adapter():
        disabled = _forward(model, batch)
    torch.testing.assert_close(disabled, base, atol=0, rtol=0)


def check_target_parameters(name: str) -> str:
    """MoE experts in transformers 5.x are fused parameters that PEFT's LoRA reaches with target_parameters
    (PEFT's ParamWrapper adds a delta to the weight); LiME modulates a layer OUTPUT per token and refuses them."""
    arch = build(name)
    params = _expert_parameters(arch.model)
    plain = get_peft_model(build(name).model, LoraConfig(r=4, target_modules=[], target_parameters=params))
    assert plain.get_nb_trainable_parameters()[0] > 0, "plain LoRA did not reach the expert parameters"
    for base in (LoraConfig(r=4, target_modules=[], target_parameters=params), _lora_dict(params)):
        with pytest.raises(ValueError) as refused:
            LimeConfig(base=base, num_experts=NUM_EXPERTS)
        message = str(refused.value)
        assert "target_parameters" in message, message  # names the field
        assert "not bare parameters" in message, message  # says why
        assert "target_modules" in message, message  # says what to do instead
    return message


def _lora_dict(params: list[str]) -> dict[str, Any]:
    return LoraConfig(r=4, target_modules=[], target_parameters=params).to_dict()


def _expert_parameters(model: Any) -> list[str]:
    names = {".".join(n.split(".")[-2:]) for n, _ in model.named_parameters() if ".experts." in n}
    assert names, "no fused expert parameter found"
    return sorted(names)


def _lora_kwargs(arch: ArchModel) -> dict[str, Any]:
    return dict(r=4, target_modules=arch.targets, init_lora_weights=False)


def run_check(name: str, check: str, path: Any = None, adapter: bool = True) -> None:
    """Run one cell; `adapter=False` runs the same check on the base model (for BASE_FAILURES)."""
    make = functools.partial(lime_model if adapter else base_model, name)
    mode = "prefix" if check.endswith("_p3") else "causal"
    if check == "wrap":
        check_wrap(make)
    elif check == "train_step":
        check_train_step(make)
    elif check == "save_load":
        check_save_load(make, path)
    elif check in PADDED_CHECKS:
        check_batch(make, check.split("_")[1], int(check[-1]), mode)
    elif check in UNPADDED_CHECKS:
        check_batch(make, "right", int(check[-1]), mode)
    elif check in GENERATE_CHECKS:
        check_generate(make, int(check[-1]), mode)
    elif check == "disable_adapter":
        check_disable_adapter(name)
    else:
        raise KeyError(check)


# --- the matrix ------------------------------------------------------------------------------------------------------


def cells() -> list[tuple[str, str]]:
    return [(name, check) for name in ARCHS for check in (*CHECKS, "target_parameters") if applicable(name, check)]


@pytest.mark.parametrize(("name", "check"), [pytest.param(n, c, id=f"{n}-{c}") for n, c in cells()])
def test_arch(name: str, check: str, tmp_path: Any) -> None:
    if check == "target_parameters":
        check_target_parameters(name)
        return
    reason = BASE_FAILURES.get((name, check))
    if reason is None:
        run_check(name, check, tmp_path)
        return
    # transformers itself fails this check (reason): the base model without adapter fails it, LiME cannot do better
    with pytest.raises(AssertionError):
        run_check(name, check, tmp_path / "base", adapter=False)
    with pytest.raises(AssertionError):
        run_check(name, check, tmp_path)


def test_matrix_covers_every_family() -> None:
    assert len(ARCHS) >= 20
    assert set(FAMILY_OF.values()) == {"decoder", "moe", "ssm", "encoder", "encoder-decoder", "vision", "vlm"}
