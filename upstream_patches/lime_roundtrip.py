"""One step of upstream_patches/check: save a LiME adapter, or load it in a process that never imported peft_lime.

    python lime_roundtrip.py save WORKDIR      # patched PEFT on PYTHONPATH; imports peft_lime, saves the adapter
    python lime_roundtrip.py load WORKDIR      # patched PEFT; loading must import peft_lime through discovery
    python lime_roundtrip.py released WORKDIR  # released PEFT: loading without `import peft_lime` fails with
                                               # KeyError 'LIME'; after `import peft_lime` it loads

Each step prints one "ok: ..." line per check and exits non-zero (AssertionError) on any failure.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

MAX_ABS_DIFF = 1e-5
LOADING_HINT = (
    "released PEFT cannot find LiME by itself: run `import peft_lime` before PeftModel.from_pretrained "
    "(see 'Loading a saved LiME adapter' in upstream_patches/README.md)"
)


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits


def check_peft_copy(patched: bool) -> None:
    import peft
    import peft.utils.peft_types as peft_types

    has_patches = hasattr(peft_types, "add_peft_type") and hasattr(peft_types, "import_peft_method_plugin")
    assert has_patches == patched, f"expected {'patched' if patched else 'released'} PEFT, got {peft.__file__}"
    print(
        f"ok: using {'patched' if patched else 'released'} peft {peft.__version__} from {Path(peft.__file__).parent}"
    )


def save(workdir: Path) -> None:
    import torch

    check_peft_copy(patched=True)
    from peft import LoraConfig, get_peft_model
    from peft.utils import PeftType

    import peft_lime

    assert PeftType("LIME") is PeftType["LIME"] is PeftType.LIME
    print("ok: peft_lime registered PeftType.LIME through peft.utils.peft_types.add_peft_type")

    base = tiny_llama()
    input_ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    base_logits = logits(base, input_ids)
    config = peft_lime.LimeConfig(
        base=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), num_experts=4
    )
    model = get_peft_model(base, config).eval()
    adapter_logits = logits(model, input_ids)
    diff = (adapter_logits - base_logits).abs().max().item()
    assert diff > 1e-3, f"the LiME adapter does not change the output (max abs diff {diff:.2e})"
    model.save_pretrained(workdir / "adapter")
    torch.save(
        {"input_ids": input_ids, "base_logits": base_logits, "logits": adapter_logits}, workdir / "reference.pt"
    )
    print(f"ok: saved a LiME adapter (output differs from the base model by up to {diff:.3f})")


def load_and_compare(workdir: Path, peft_lime_imported_by: str) -> None:
    import torch
    from peft import PeftModel

    reference = torch.load(workdir / "reference.pt")
    base = tiny_llama()
    base_diff = (logits(base, reference["input_ids"]) - reference["base_logits"]).abs().max().item()
    assert base_diff == 0.0, f"the rebuilt base model differs from the saving process's (max abs diff {base_diff})"
    model = PeftModel.from_pretrained(base, workdir / "adapter").eval()
    assert "peft_lime" in sys.modules, "loading the adapter did not import peft_lime"
    config_cls = type(model.peft_config["default"])
    assert config_cls.__module__.startswith("peft_lime."), f"adapter config is a {config_cls}, not LimeConfig"
    diff = (logits(model, reference["input_ids"]) - reference["logits"]).abs().max().item()
    assert diff < MAX_ABS_DIFF, f"logits differ from the saving process's by {diff:.2e}"
    print(f"ok: loaded with peft_lime imported by {peft_lime_imported_by}; max abs logit diff {diff:.1e}")


def load(workdir: Path) -> None:
    from importlib.metadata import entry_points

    check_peft_copy(patched=True)
    declared = {ep.name: ep.value for ep in entry_points(group="peft.methods")}
    assert declared.get("LIME") == "peft_lime", f"no 'peft.methods' entry point LIME = peft_lime: {declared}"
    assert "peft_lime" not in sys.modules, "peft_lime was imported before loading"
    load_and_compare(workdir, "PEFT's entry point discovery")


def released(workdir: Path) -> None:
    check_peft_copy(patched=False)
    from peft import PeftModel

    assert "peft_lime" not in sys.modules, "peft_lime was imported before loading"
    try:
        PeftModel.from_pretrained(tiny_llama(), workdir / "adapter")
    except KeyError as exc:
        assert "LIME" in str(exc), f"KeyError does not mention LIME: {exc!r}"
        print(f"ok: without `import peft_lime`, released PEFT raises KeyError({exc}); hint: {LOADING_HINT}")
    else:
        raise AssertionError("released PEFT loaded a LiME adapter without peft_lime being imported")
    assert "peft_lime" not in sys.modules

    import peft_lime  # noqa: F401  (the documented fallback)

    load_and_compare(workdir, "an explicit `import peft_lime` (released PEFT)")


if __name__ == "__main__":
    step, workdir = sys.argv[1], Path(sys.argv[2])
    {"save": save, "load": load, "released": released}[step](workdir)
