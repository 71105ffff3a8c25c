"""One rank of a 2-process CPU (gloo) training run of LiME under FSDP2, FSDP1 or DDP.

Launched by tests/test_distributed.py as
    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py --mode MODE --out DIR
with MODE one of
    fsdp2         fully_shard on each decoder layer, then on the root (the PeftModel)
    fsdp2_leaves  as fsdp2, plus a unit for every leaf PEFT's fsdp_auto_wrap_policy picks (LimeExperts, LoRA A/B)
    fsdp2_qlora   as fsdp2 on a 4-bit nf4 backbone with bf16 quant storage (the FSDP-QLoRA recipe)
    fsdp1         FullyShardedDataParallel with PEFT's fsdp_auto_wrap_policy, use_orig_params=True
    ddp           DistributedDataParallel
    balance_global  DDP, one SGD step of a LiME model with balance_scope="global" (tests/test_balance_scope.py): rank 0
                  writes balance.pt (the updated trainable parameters) and report.json
Every rank builds the same tiny Llama + LiME (LoRA base) from a fixed seed, wraps it, checks the wrapping really
happened (accelerate does not shard without a GPU, so "it ran" proves nothing), trains 3 AdamW steps on
rank-dependent batches, checks the expert vectors moved, computes logits on a fixed evaluation batch and saves the
adapter from a gathered full state dict. Rank 0 writes into DIR:
    adapter/ (adapter_config.json + adapter_model.safetensors), logits.pt, report.json (and base/ for fsdp2_qlora)
The parent test reloads the adapter into a single-process model and compares logits. Failures raise: torchrun then
exits non-zero and the parent prints this process's output.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

try:
    from tests._models import scatter_experts, tiny_llama_config
except ImportError:  # run as a script without the repository root on sys.path: tests/ itself is sys.path[0]
    from _models import scatter_experts, tiny_llama_config

# The parent imports the builders below from tests.distributed_worker; keep them free of distributed state.
VOCAB = 128
TARGETS = ["q_proj", "v_proj", "up_proj"]
NUM_EXPERTS = 4
STEPS = 3


def build_base(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def lime_config():
    from peft import LoraConfig

    import peft_lime

    # Default LoRA init (B = 0): experts get gradient from step 2 on, as in real training. No dropout: the
    # evaluation logits must be reproducible in another process.
    return peft_lime.LimeConfig(
        base=LoraConfig(r=8, target_modules=TARGETS, lora_dropout=0.0), num_experts=NUM_EXPERTS, n_gram=2
    )


def build_model(seed: int = 0):
    from peft import get_peft_model

    return get_peft_model(build_base(seed), lime_config())


def qlora_config():
    """4-bit nf4 with bf16 quant storage: FSDP shards only floating tensors, so the packed bytes are viewed as bf16.

    Compute stays fp32 so the reloaded model can be compared with tight tolerances.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def build_qlora_model(base_dir):
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=qlora_config(), dtype=torch.float32)
    disable_bnb_cpu_repacking(base)
    return get_peft_model(base, lime_config())


def disable_bnb_cpu_repacking(model) -> None:
    """bitsandbytes repacks 4-bit weights in place for CPU inference on CPUs with AVX512-BF16 (eval, no grad). Under
    FSDP that would rewrite a transient all-gathered copy and the shared quant_state, not the shards; keep the plain
    kernel so the run does not depend on the host CPU (GPUs never take that path)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def eval_batch() -> dict[str, torch.Tensor]:
    """Fixed evaluation batch; row 1 is left-padded so the routing mask path is exercised too."""
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3], attention_mask[1, :3] = 0, 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def train_batch(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randint(3, VOCAB, (2, 12), generator=gen)


# --- balance_scope="global" under DDP (tests/test_balance_scope.py) ------------------------------------------------------
BALANCE_LR = 0.5


def balance_model(seed: int = 0, scope: str = "global"):
    """Tiny Llama + LiME whose balance loss matters: strong coefficients, experts far from 1, no jitter or dropout."""
    from peft import LoraConfig, get_peft_model

    import peft_lime

    config = peft_lime.LimeConfig(
        base=LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False),
        num_experts=NUM_EXPERTS,
        jitter_noise=0.0,
        importance_loss_coef=1.0,
        kl_loss_coef=0.1,
        balance_scope=scope,
    )
    model = get_peft_model(build_base(seed), config)
    scatter_experts(model, seed=seed + 1)
    return model


def balance_batch(rank: int) -> dict[str, torch.Tensor]:
    """A rank-dependent batch with left padding in another row on each rank.

    Every rank has 20 label tokens, so DDP's average of the per-rank mean LM losses is the merged batch's mean loss.
    """
    gen = torch.Generator().manual_seed(500 + rank)
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
    mask = torch.ones_like(input_ids)
    mask[1 - rank, :3] = 0
    input_ids = input_ids.masked_fill(mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def balance_step(model, batch: dict[str, torch.Tensor]) -> float:
    """One SGD step on the LM loss plus the injected balance loss; returns the LM loss."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=BALANCE_LR)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def trainable_params(model) -> dict[str, torch.Tensor]:
    return {_clean(n): p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- helpers used only inside the distributed run --------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def _experts(model) -> dict[str, torch.Tensor]:
    """Expert parameters, gathered to full tensors (a collective under FSDP2: call on every rank)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):  # FSDP1 with use_orig_params: gather the flat parameters first
        with FSDP.summon_full_params(model, writeback=False):
            return {_clean(n): p.detach().cpu().clone() for n, p in model.named_parameters() if "lime_experts" in n}
    return {_clean(n): _full(p) for n, p in model.named_parameters() if "lime_experts" in n}


def _clean(name: str) -> str:
    """Parameter name without the FSDP1 wrapper infixes and the DDP "module." prefix."""
    return name.replace("_fsdp_wrapped_module.", "").removeprefix("module.")


def _train(model, rank: int) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        x = train_batch(rank, step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _save_adapter(peft_model, full_sd: dict[str, torch.Tensor], out: Path) -> list[str]:
    """Extract the adapter from a full model state dict with PEFT's own function and save it like save_pretrained."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter_sd = get_peft_model_state_dict(peft_model, state_dict=full_sd)
    adapter_sd = {k: v.detach().cpu().contiguous() for k, v in adapter_sd.items()}
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    save_file(adapter_sd, str(out / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(out / "adapter"))
    return sorted(adapter_sd)


# --- wrapping per mode -------------------------------------------------------------------------------------------------
def wrap_fsdp2(model, report: dict, leaves: bool):
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    from peft_lime import LimeExperts

    if leaves:
        # What PEFT's auto-wrap policy selects (LimeExperts, lora_A/B leaves with a trainable .weight), each its own
        # FSDP2 unit, bottom-up: LiME must read its experts only inside LimeExperts.forward for this to work.
        policy = fsdp_auto_wrap_policy(model)
        for module in list(model.modules()):
            if not list(module.children()) and policy(module=module, recurse=False, nonwrapped_numel=0):
                fully_shard(module)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert isinstance(model, FSDPModule)
    params = dict(model.named_parameters())
    assert params and all(isinstance(p, DTensor) for p in params.values()), "some parameters were not sharded"
    local = {n: p.to_local() for n, p in params.items()}
    # Sharding really split the tensors: each rank holds ceil(rows / 2) (or fewer) rows of every parameter.
    expert_rows = [
        (n, local[n].shape[0], params[n].shape[0]) for n in params if n.endswith("lime_experts.default.weight")
    ]
    assert expert_rows and all(lr < full for _, lr, full in expert_rows), expert_rows
    experts = [m for m in model.modules() if isinstance(m, LimeExperts)]
    report["lime_experts_fsdp_units"] = sum(isinstance(m, FSDPModule) for m in experts)
    report["num_lime_experts"] = len(experts)
    report["all_params_dtensor"] = True
    return model


def wrap_fsdp1(model, report: dict):
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from peft_lime import LimeExperts, LimeLayer

    full_numel = sum(p.numel() for p in model.parameters())
    wrapped = FSDP(
        model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True, device_id=torch.device("cpu")
    )
    assert isinstance(wrapped, FSDP)
    units = [m.module for m in wrapped.modules() if isinstance(m, FSDP)]
    kinds = sorted({type(u).__name__ for u in units})
    report["fsdp1_unit_types"] = kinds
    lime_layers = [m for m in wrapped.modules() if isinstance(m, LimeLayer)]
    assert lime_layers
    for layer in lime_layers:
        unit = layer.lime_experts["default"]
        assert isinstance(unit, FSDP) and isinstance(unit.module, LimeExperts), type(unit)
    assert sum(isinstance(u, LlamaDecoderLayer) for u in units) == 2
    assert sum(isinstance(u, LimeExperts) for u in units) == len(lime_layers)
    # Really sharded: with use_orig_params each parameter is a view of this rank's shard of its flat parameter, so
    # a rank holds about half of the elements (padding aside).
    local_numel = sum(p.numel() for p in wrapped.parameters())
    report["fsdp1_local_fraction"] = local_numel / full_numel
    assert local_numel < 0.6 * full_numel, (local_numel, full_numel)
    return wrapped


def _check_routing_sync(model, peft_model, rank: int, world: int) -> dict:
    """Each rank routes its own batch; after sync_routing_stats every rank must hold the statistics of both batches.

    Returns, for rank 0's report, the largest disagreement of the synced statistics with the token-weighted merge of
    the per-rank ones, and how far apart the ranks' own statistics were (so the check cannot pass by accident).
    """
    import peft_lime

    peft_lime.reset_routing_stats(peft_model)
    with torch.no_grad(), peft_lime.recording_routing_stats(peft_model):
        model(input_ids=train_batch(rank, 99)[:, : 6 + 4 * rank])  # different lengths: token-weighting matters
    local = peft_lime.get_routing_stats(peft_model)["layers"]  # reading does not reset
    assert peft_lime.sync_routing_stats(peft_model)
    synced = peft_lime.get_routing_stats(peft_model, reset=True)["layers"]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, {"local": local, "synced": synced})
    worst, spread = 0.0, 0.0
    for name, merged in synced.items():
        parts = [e["local"][name] for e in everyone]
        tokens = [p["tokens"] for p in parts]
        worst = max(worst, abs(merged["tokens"] - sum(tokens)))
        for key in ("routing_entropy", "active_experts", "mean_probs"):
            want = sum(torch.tensor(p[key]) * n for p, n in zip(parts, tokens)) / sum(tokens)
            worst = max(worst, (torch.tensor(merged[key]) - want).abs().max().item())
            spread = max(spread, (torch.tensor(parts[0][key]) - torch.tensor(parts[1][key])).abs().max().item())
        for other in everyone[1:]:  # every rank ends with the same numbers
            worst = max(
                worst,
                (torch.tensor(other["synced"][name]["mean_probs"]) - torch.tensor(merged["mean_probs"]))
                .abs()
                .max()
                .item(),
            )
    return {"layers": len(synced), "max_error": worst, "rank_spread": spread}


def _run_balance_global(out: Path, rank: int, world: int) -> None:
    """DDP step with the global balance scope; counts the all-reduces LiME makes (one per layer call expected)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import peft_lime
    from peft_lime import balance

    model = balance_model(seed=0)
    reduce_calls = []
    data_parallel_sum = balance.data_parallel_sum

    def counting(local: torch.Tensor):
        reduced, n_ranks = data_parallel_sum(local)
        reduce_calls.append(n_ranks)
        return reduced, n_ranks

    balance.data_parallel_sum = counting
    loss = balance_step(DDP(model), balance_batch(rank))
    layers = [m for m in model.modules() if isinstance(m, peft_lime.LimeLayer)]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, float(peft_lime.get_aux_loss(model)))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(trainable_params(model), out / "balance.pt")
        report = {
            "world_size": world,
            "lime_layers": len(layers),
            "reduce_calls": reduce_calls,
            "aux_per_rank": everyone,
            "loss_rank0": loss,
            # The optimizer step closed every window.
            "windows_open_after_step": sum(balance.window_of(m, "default").sums is not None for m in layers),
        }
        (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--mode", choices=["fsdp2", "fsdp2_leaves", "fsdp2_qlora", "fsdp1", "ddp", "balance_global"], required=True
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    faulthandler.enable()  # a crash in a rank (e.g. SIGSEGV) then prints its Python stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    if args.mode == "balance_global":
        _run_balance_global(args.out, rank, world)
        dist.barrier()
        dist.destroy_process_group()
        return
    report: dict = {"mode": args.mode, "world_size": world}

    if args.mode == "fsdp2_qlora":
        import bitsandbytes as bnb

        if rank == 0:
            build_base(seed=0).save_pretrained(args.out / "base")  # fp32 checkpoint, quantized on load by each rank
        dist.barrier()
        model = build_qlora_model(args.out / "base")
        packed = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert packed and all(w.dtype == torch.bfloat16 and w.shape[1] == 1 for w in packed)  # packed, bf16 storage
    else:
        model = build_model(seed=0)
    if args.mode.startswith("fsdp2"):
        model = wrap_fsdp2(model, report, leaves=args.mode == "fsdp2_leaves")
        peft_model = model
        if args.mode == "fsdp2_qlora":
            from torch.distributed.tensor import DTensor

            linear4bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
            report["packed_4bit_layers"] = len(linear4bit)
            report["packed_4bit_dtensors"] = sum(isinstance(m.weight, DTensor) for m in linear4bit)
    elif args.mode == "fsdp1":
        model = wrap_fsdp1(model, report)
        peft_model = model.module
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
        peft_model = model.module

    before = _experts(model)
    losses = _train(model, rank)
    after = _experts(model)
    moved = {n: (after[n] - before[n]).abs().max().item() for n in before if n.endswith(".weight")}
    assert moved and all(v > 0 for v in moved.values()), moved
    # Data-parallel ranks must agree on the (gathered) experts; under FSDP there is only one copy anyway.
    gathered = [None] * world
    dist.all_gather_object(gathered, {n: t for n, t in after.items()})
    for n in after:
        torch.testing.assert_close(gathered[0][n], gathered[1][n], rtol=0, atol=0)

    report["routing_sync"] = _check_routing_sync(model, peft_model, rank, world)
    with torch.no_grad():
        logits = model(**eval_batch()).logits.detach().cpu()

    if args.mode.startswith("fsdp2"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif args.mode == "fsdp1":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # offload_to_cpu=False on purpose: with a CPU compute device, torch 2.13's FlatParamHandle.to_cpu() "moves"
        # the unsharded flat parameter to CPU (a no-op, same storage) and then frees that storage, so the state-dict
        # hook clones freed memory and rank 0 dies with SIGSEGV (reproduced with a plain nn.Linear model, no LiME;
        # torch.distributed.checkpoint's get_model_state_dict(cpu_offload=True) on FSDP1 takes the same path). The
        # parameters already live on CPU here, so offloading would be a no-op anyway; on GPUs keep offload_to_cpu=True.
        with FSDP.state_dict_type(
            model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        ):
            full_sd = model.state_dict()
    else:
        full_sd = None  # DDP: every rank holds the full model; save_pretrained below is the normal path

    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        if full_sd is None:
            peft_model.save_pretrained(str(args.out / "adapter"))
            from safetensors.torch import load_file

            report["adapter_keys"] = sorted(load_file(str(args.out / "adapter" / "adapter_model.safetensors")))
        else:
            assert full_sd and not any("_fsdp_wrapped_module" in k for k in full_sd), list(full_sd)[:5]
            report["adapter_keys"] = _save_adapter(peft_model, full_sd, args.out)
        report.update(losses_rank0=losses, expert_max_change=moved, num_expert_tensors=len(after))
        torch.save({"logits": logits, **eval_batch()}, args.out / "logits.pt")
        (args.out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
