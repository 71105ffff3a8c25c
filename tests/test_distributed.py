"""LiME under FSDP2, FSDP1 and DDP: 2-rank CPU runs over gloo, launched with torchrun (see distributed_worker.py).

Each mode runs once per session (module-scoped fixture): build the same tiny Llama + LiME on both ranks, wrap, check
that sharding really happened, train 3 steps, check the expert vectors moved, gather a full state dict, extract the
adapter with PEFT's own function and save it. This process then loads the adapter into a fresh single-process model
built from the same seed and must reproduce the logits rank 0 computed after training.

Budget: each launch takes ~12-18 s on 2 cores (mostly imports in both ranks); the five launches stay below 3 min.
Every launch has a timeout and runs in its own session, whose whole process group is killed afterwards, so no rank
survives a failure or a hang.
The tests that launch torchrun are marked slow (`make test-fast` skips them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils.other import fsdp_auto_wrap_policy
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import peft_lime  # noqa: F401  (registers LIME before PeftModel.from_pretrained)
from peft_lime import LimeExperts, LimeLayer

from .distributed_worker import (
    TARGETS,
    build_base,
    build_model,
    disable_bnb_cpu_repacking,
    eval_batch,
    qlora_config,
)

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().with_name("distributed_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH_TIMEOUT_S = 120  # a run takes 12-20 s; the margin covers a loaded shared machine, not a hang
MODES = ["fsdp2", "fsdp2_leaves", "fsdp2_qlora", "fsdp1", "ddp"]

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not TORCHRUN.exists(), reason="needs torch.distributed and torchrun"
    ),
    # This process only runs tiny forwards; on a busy 2-core machine extra OpenMP threads just spin.
    pytest.mark.usefixtures("one_thread"),
]


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill torchrun and every rank it started: they all live in the process group led by torchrun."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# Startup failures of the rendezvous / process group (a port taken between torchrun picking it and binding it, on a
# machine shared with other jobs), not failures of the code under test: such a launch is retried once.
TRANSIENT = ("Address already in use", "EADDRINUSE", "DistNetworkError", "RendezvousConnectionError")


def launch(mode: str, out: Path, attempts: int = 2) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # The ranks must import the peft_lime of this checkout, whatever is installed.
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
    )
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), "--mode", mode, "--out", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        pytest.fail(f"{mode}: torchrun timed out after {LAUNCH_TIMEOUT_S}s; killed. Output tail:\n{output[-6000:]}")
    finally:
        _kill_group(proc)
    (out / "torchrun.log").write_text(output)  # kept with the run's files for post-mortems
    if proc.returncode != 0:
        if attempts > 1 and any(t in output for t in TRANSIENT) and "AssertionError" not in output:
            return launch(mode, out, attempts - 1)
        pytest.fail(f"{mode}: torchrun exited with {proc.returncode}. Output tail:\n{output[-8000:]}")
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch each mode at most once per module, on first use: runs(mode) -> (output dir, rank 0 report)."""
    done: dict[str, tuple[Path, dict]] = {}

    def get(mode: str) -> tuple[Path, dict]:
        if mode not in done:
            out = tmp_path_factory.mktemp(mode)
            done[mode] = (out, launch(mode, out))
        return done[mode]

    return get


@pytest.fixture(scope="module")
def reference_adapter_keys(tmp_path_factory) -> set[str]:
    """The keys a plain single-process save_pretrained writes for the same model."""
    path = tmp_path_factory.mktemp("reference_adapter")
    build_model(seed=0).save_pretrained(path)
    return set(load_file(path / "adapter_model.safetensors"))


def test_fsdp_auto_wrap_policy_gives_lime_experts_their_own_unit():
    """PEFT's FSDP policy wraps leaves with a trainable .weight: LimeExperts qualifies, LimeLayer (not a leaf) not."""
    model = build_model(seed=0)
    policy = fsdp_auto_wrap_policy(model)
    chosen = [m for m in model.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    n_lime = sum(isinstance(m, LimeLayer) for m in model.modules())
    assert n_lime == 2 * len(TARGETS)
    assert sum(isinstance(m, LimeExperts) for m in chosen) == n_lime
    assert sum(isinstance(m, LlamaDecoderLayer) for m in chosen) == 2
    assert not any(isinstance(m, LimeLayer) for m in chosen)
    leaves = [m for m in chosen if not isinstance(m, (LimeExperts, LlamaDecoderLayer))]
    # The rest are LoRA's own lora_A / lora_B linears (2 per wrapped layer), nothing frozen.
    assert len(leaves) == 2 * n_lime and all(isinstance(m, torch.nn.Linear) for m in leaves)
    assert all(p.requires_grad for m in chosen if not isinstance(m, LlamaDecoderLayer) for p in m.parameters())


def test_adapter_extraction_sees_through_activation_checkpoint_wrappers(reference_adapter_keys):
    """accelerate's fsdp_activation_checkpointing wraps each decoder layer in torch's CheckpointWrapper before sharding.

    Module names then contain "_checkpoint_wrapped_module." while state_dict() keys do not (the wrapper strips it);
    PEFT 0.21.2 derives adapter keys from module names, so without care the saved adapter is empty.
    """
    from peft import get_peft_model_state_dict
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    model = build_model(seed=0)
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: isinstance(m, LlamaDecoderLayer)
    )
    assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_modules())
    assert set(get_peft_model_state_dict(model)) == reference_adapter_keys


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_routing_statistics_are_summed_over_ranks(runs, mode):
    """sync_routing_stats: each rank routed a different batch; afterwards both hold the merged statistics."""
    sync = runs(mode)[1]["routing_sync"]
    assert sync["layers"] == 2 * len(TARGETS)
    assert sync["rank_spread"] > 1e-3, sync  # the ranks' own statistics really differed
    assert sync["max_error"] < 1e-5, sync


def _fresh_base(mode: str, out: Path):
    """The backbone the ranks started from: same seed, or the same checkpoint quantized the same way."""
    if mode != "fsdp2_qlora":
        return build_base(seed=0)
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(out / "base", quantization_config=qlora_config(), dtype=torch.float32)
    disable_bnb_cpu_repacking(base)
    return base


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_distributed_training_changes_experts_and_saved_adapter_reloads(runs, reference_adapter_keys, mode):
    out, report = runs(mode)
    assert report["world_size"] == 2
    changes = report["expert_max_change"]
    assert len(changes) == 2 * len(TARGETS) and all(v > 0 for v in changes.values()), changes

    saved = set(load_file(out / "adapter" / "adapter_model.safetensors"))
    assert saved, (
        f"{mode}: get_peft_model_state_dict(model, state_dict=full_sd) extracted NOTHING from the gathered full "
        "state dict, so an empty adapter was saved (module names of the wrapped model do not match the clean keys)"
    )
    # The adapter extracted from the distributed full state dict must hold exactly what a single-process
    # save_pretrained writes (LoRA A/B and the expert / shared / gate tensors of every wrapped layer).
    assert saved == reference_adapter_keys, (
        f"{mode}: adapter keys differ from a single-process save.\nmissing: {sorted(reference_adapter_keys - saved)}"
        f"\nunexpected: {sorted(saved - reference_adapter_keys)}"
    )
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LIME" and config["base"]["peft_type"] == "LORA"

    expected = torch.load(out / "logits.pt")
    batch = eval_batch()
    assert torch.equal(expected["input_ids"], batch["input_ids"])
    loaded = PeftModel.from_pretrained(_fresh_base(mode, out), out / "adapter").eval()
    with torch.no_grad():
        got = loaded(**batch).logits
        with loaded.disable_adapter():
            base_only = loaded(**batch).logits
    valid = batch["attention_mask"].bool()
    # The trained adapter must matter, or the comparison below would only compare backbones.
    assert (got - base_only)[valid].abs().max() > 1e-3
    # Same fp32 weights (all-gathered copies are exact) and the same ops; only summation order may differ
    # (batch layout, kernels picked per shape): 1e-5 absolute on logits of order 1.
    torch.testing.assert_close(got[valid], expected["logits"][valid], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "fsdp2_leaves", "fsdp2_qlora"])
def test_fsdp2_really_sharded(runs, mode):
    _, report = runs(mode)
    assert report["all_params_dtensor"]
    assert report["num_lime_experts"] == 2 * len(TARGETS)
    # fsdp2 / fsdp2_qlora: units are the decoder layers and the root. fsdp2_leaves: PEFT's policy also made every
    # LimeExperts its own unit, which works only because the experts are read inside LimeExperts.forward.
    assert report["lime_experts_fsdp_units"] == (2 * len(TARGETS) if mode == "fsdp2_leaves" else 0)
    if mode == "fsdp2_qlora":
        # Every packed 4-bit weight (bf16 quant storage) is sharded too: all 7 linears of both decoder layers.
        assert report["packed_4bit_layers"] == 14 and report["packed_4bit_dtensors"] == 14


@pytest.mark.slow
def test_fsdp1_auto_wrap_units(runs):
    _, report = runs("fsdp1")
    # PEFT's policy: LimeExperts and LoRA A/B (Linear) get their own unit, decoder layers too, the PeftModel is the root.
    assert set(report["fsdp1_unit_types"]) == {"LimeExperts", "Linear", "LlamaDecoderLayer", "PeftModel"}
    assert report["fsdp1_local_fraction"] < 0.6  # each rank holds about half of the elements: really sharded


ACCELERATE_DIR = ROOT / "examples" / "accelerate"


def test_accelerate_configs_parse_and_say_what_the_readme_says():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    configs = {p.stem: load_config_from_file(str(p)) for p in sorted(ACCELERATE_DIR.glob("*.yaml"))}
    assert set(configs) == {"fsdp2", "fsdp2_qlora", "ddp", "multinode_8gpu"}
    for name in ("fsdp2", "fsdp2_qlora", "multinode_8gpu"):
        cfg = configs[name]
        assert cfg.distributed_type == DistributedType.FSDP, name
        assert cfg.fsdp_config["fsdp_version"] == 2, name
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP", name
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT", name  # rank 0 writes a normal adapter
    # QLoRA: FSDP2 all-gathers in the mixed-precision dtype, which must be the bf16 quant storage dtype.
    assert configs["fsdp2_qlora"].mixed_precision == "bf16"
    assert configs["fsdp2_qlora"].fsdp_config["fsdp_cpu_ram_efficient_loading"] is False
    assert configs["ddp"].distributed_type == DistributedType.MULTI_GPU
    assert (configs["multinode_8gpu"].num_machines, configs["multinode_8gpu"].num_processes) == (2, 8)

    readme = (ACCELERATE_DIR / "README.md").read_text()
    for name in configs:  # every config has its launch command in the README
        assert f"accelerate launch --config_file examples/accelerate/{name}.yaml" in readme, name
    assert "bnb_4bit_quant_storage=torch.bfloat16" in readme
