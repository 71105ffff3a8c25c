"""Static routing and its export as plain adapters of the base tuner (LoRA, IA3, LoHa exact; DoRA, LoKr refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model

import peft_lime
from peft_lime import LimeConfig, collect_routing_profiles, export_static, static_routing
from peft_lime.export import main as export_main
from tests._models import VOCAB, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
TASKS = ["first", "second"]


def _batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (4, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # left padding in one row: padding must not count
        out.append({"input_ids": ids, "attention_mask": mask, "task_ids": torch.tensor([0, 1, 0, 1])})
    return out


def _base(base_config):
    # PEFT merges lora_bias only into layers that have a bias
    return tiny_llama(attention_bias=True, mlp_bias=True) if getattr(base_config, "lora_bias", False) else tiny_llama()


def _lime(base_config, num_experts: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = get_peft_model(_base(base_config), LimeConfig(base=base_config, num_experts=num_experts, expert_init_std=0.6))
    with torch.no_grad():  # a shared vector that matters, so the offset term is checked too
        for layer in model.modules():
            if isinstance(layer, peft_lime.LimeLayer):
                layer.lime_experts["default"].gate.fill_(0.8)
    return model.eval()


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _valid(batch) -> torch.Tensor:
    return batch["attention_mask"].bool()


LORA = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)


@pytest.mark.parametrize(
    "base_config",
    [
        LoraConfig(**LORA),
        LoraConfig(**LORA, use_rslora=True, lora_bias=True),
        IA3Config(target_modules=TARGETS, feedforward_modules=[], init_ia3_weights=False),
        LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
        LoraConfig(**LORA, use_dora=True),
    ],
    ids=["lora", "rslora_bias", "ia3", "loha", "dora"],
)
def test_export_equals_static_routing_and_merges(base_config, tmp_path):
    model = _lime(base_config)
    batches = _batches()
    profiles = collect_routing_profiles(model, batches, task_names=TASKS)
    assert set(profiles) == {"global", *TASKS}
    written = export_static(model, profiles, tmp_path)
    probe = _batches(1, seed=7)[0]
    dynamic = _logits(model, probe)
    for name, path in written.items():
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["peft_type"] == str(base_config.peft_type.value) and cfg["inference_mode"] is True
        with static_routing(model, profiles[name]):
            static = _logits(model, probe)
        plain = PeftModel.from_pretrained(_base(base_config), str(path)).eval()
        exported = _logits(plain, probe)
        valid = _valid(probe)
        torch.testing.assert_close(exported[valid], static[valid], atol=1e-5, rtol=0)
        # static routing is not dynamic routing: the check above would catch a wrong route
        assert (static[valid] - dynamic[valid]).abs().max() > 1e-3
        merged = _logits(plain.merge_and_unload(), probe)
        torch.testing.assert_close(merged[valid], exported[valid], atol=1e-5, rtol=0)
    # dynamic routing is back after the context
    torch.testing.assert_close(_logits(model, probe), dynamic, atol=0, rtol=0)


def test_profiles_are_mean_mixing_weights_of_valid_tokens():
    model = _lime(LoraConfig(**LORA))
    batches = _batches(2)
    profiles = collect_routing_profiles(model, batches, task_names=TASKS)
    # recompute the per-task mean by hand from the weights each layer used
    seen: dict[str, list] = {}

    def capture(layer, adapter, weights, layout):
        seen.setdefault(layer.layer_name, []).append(weights.reshape(-1, weights.shape[-1]).clone())

    model.base_model.routing_context.weights_capture = capture
    for b in batches:
        _logits(model, b)
    model.base_model.routing_context.weights_capture = None
    valid = torch.cat([_valid(b).reshape(-1) for b in batches])
    task = torch.cat([b["task_ids"].repeat_interleave(7) for b in batches])
    for layer, chunks in seen.items():
        w = torch.cat(chunks)
        torch.testing.assert_close(profiles["global"][layer], w[valid].mean(0), atol=1e-6, rtol=0)
        for t, name in enumerate(TASKS):
            torch.testing.assert_close(profiles[name][layer], w[valid & (task == t)].mean(0), atol=1e-6, rtol=0)
        assert abs(float(profiles["global"][layer].sum()) - 1.0) < 1e-5
    assert model.base_model.routing_context.weights_capture is None and not model.training


def test_recording_context_reads_task_ids_of_any_call_path():
    model = _lime(LoraConfig(**LORA))
    batches = _batches(2)
    expected = collect_routing_profiles(model, batches, task_names=TASKS)
    peft_lime.enable_task_ids(model)
    with torch.no_grad(), peft_lime.recording_routing_profiles(model, TASKS) as recorder:
        for b in batches:
            model(**b)  # task_ids on the PeftModel call, as the per-task telemetry reads them
    got = recorder.profiles()
    for name in expected:
        for layer in expected[name]:
            torch.testing.assert_close(got[name][layer], expected[name][layer], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="task_ids"), peft_lime.recording_routing_profiles(model, TASKS):
        _logits(model, batches[0])  # no task ids
    assert model.base_model.routing_context.weights_capture is None


def test_static_routing_validates_profile():
    model = _lime(LoraConfig(**LORA))
    profile = collect_routing_profiles(model, _batches(1))["global"]
    layer = next(iter(profile))
    with pytest.raises(ValueError, match="profile"):
        peft_lime.set_static_routing(model, {k: v for k, v in profile.items() if k != layer})
    with pytest.raises(ValueError, match=r"profile\[.*expected 4 finite"):
        peft_lime.set_static_routing(model, {**profile, layer: torch.ones(3)})
    with pytest.raises(ValueError, match="finite"):
        peft_lime.set_static_routing(model, {**profile, layer: torch.tensor([float("nan"), 0, 0, 1])})
    with pytest.raises(ValueError, match="sum to 1"):
        peft_lime.set_static_routing(model, {**profile, layer: torch.tensor([0.5, 0.5, 0.5, 0.0])})
    with pytest.raises(ValueError, match=">= 0"):
        peft_lime.set_static_routing(model, {**profile, layer: torch.tensor([1.5, -0.5, 0.0, 0.0])})
    with pytest.raises(ValueError, match="adapter_name"):
        peft_lime.set_static_routing(model, profile, adapter_name="nope")
    with pytest.raises(ValueError, match="task_ids"):
        collect_routing_profiles(model, [{"input_ids": torch.ones(1, 3, dtype=torch.long)}], task_names=TASKS)
    with pytest.raises(ValueError, match="task_names"):
        collect_routing_profiles(model, _batches(1), task_names=["global"])


def test_static_routing_is_deleted_with_its_adapter():
    model = _lime(LoraConfig(**LORA))
    profile = collect_routing_profiles(model, _batches(1))["global"]
    model.add_adapter("other", LimeConfig(base=LoraConfig(**LORA), num_experts=4))
    peft_lime.set_static_routing(model, profile, adapter_name="default")
    model.set_adapter("other")
    model.delete_adapter("default")
    layers = [m for m in model.modules() if isinstance(m, peft_lime.LimeLayer)]
    assert all("default" not in layer.lime_static_routing for layer in layers)


@pytest.mark.parametrize(
    "base_config, match",
    [
        (LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False), "Kronecker"),
        (IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]), "feed-forward"),
    ],
    ids=["lokr", "ia3_feedforward"],
)
def test_inexact_exports_are_refused(base_config, match, tmp_path):
    model = _lime(base_config)
    profiles = collect_routing_profiles(model, _batches(1))
    with pytest.raises(ValueError, match=match):
        export_static(model, profiles, tmp_path)


def test_cli_exports_from_disk_like_the_api(tmp_path):
    model = _lime(LoraConfig(**LORA))
    profiles = collect_routing_profiles(model, _batches(), task_names=TASKS)
    model.save_pretrained(tmp_path / "lime")
    peft_lime.save_routing_profiles(profiles, tmp_path / "routing.safetensors")
    api = export_static(model, profiles, tmp_path / "api")
    cli = export_main(["--adapter", str(tmp_path / "lime"), "--routing", str(tmp_path / "routing.safetensors"),
                       "--output-dir", str(tmp_path / "cli"), "--profile", "second"])
    assert set(cli) == {"second"}
    from safetensors.torch import load_file

    a, c = (load_file(str(d["second"] / "adapter_model.safetensors")) for d in (api, cli))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(SystemExit):
        export_main(["--adapter", str(tmp_path / "lime"), "--routing", str(tmp_path / "routing.safetensors"),
                     "--output-dir", str(tmp_path / "x"), "--profile", "missing"])


FRESH_PROCESS = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
batch = torch.load(sys.argv[2])
plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[4]), sys.argv[1]).eval()
with torch.no_grad():
    unmerged = plain(**batch).logits
    merged = plain.merge_and_unload()(**batch).logits
assert "peft_lime" not in sys.modules, "peft_lime was imported"
torch.save({"unmerged": unmerged, "merged": merged}, sys.argv[3])
"""


@pytest.mark.slow
def test_exported_adapter_loads_with_released_peft_only(tmp_path):
    model = _lime(LoraConfig(**LORA))
    profiles = collect_routing_profiles(model, _batches(), task_names=TASKS)
    path = export_static(model, profiles, tmp_path / "export")["first"]
    probe = _batches(1, seed=7)[0]
    batch = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
    torch.save(batch, tmp_path / "batch.pt")
    tiny_llama().save_pretrained(tmp_path / "base")  # the same weights (seeded), loaded without tests/_models.py
    with static_routing(model, profiles["first"]):
        expected = _logits(model, probe)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(path), str(tmp_path / "batch.pt"),
                    str(tmp_path / "out.pt"), str(tmp_path / "base")], check=True, env=env, cwd=root, timeout=300)
    out = torch.load(tmp_path / "out.pt")
    valid = _valid(probe)
    torch.testing.assert_close(out["unmerged"][valid], expected[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["merged"][valid], expected[valid], atol=1e-5, rtol=0)


def test_dora_from_disk_asks_for_the_model(tmp_path):
    model = _lime(LoraConfig(**LORA, use_dora=True))
    profiles = collect_routing_profiles(model, _batches(1))
    model.save_pretrained(tmp_path / "lime")
    with pytest.raises(ValueError, match="DoRA's fold needs the base layer's weight"):
        peft_lime.export_static_from_pretrained(tmp_path / "lime", profiles, tmp_path / "out")
