"""sft.train.engine (the fallback warning) and the loss's collective count under real FSDP2 and ZeRO-3 sharding."""
import importlib.util
import json
import os

import pytest
import torch

from sft.train.engine import fallback_problem, fsdp_cpu_problem, requested_engine

# FSDP2 on CPU processes needs torch >= 2.7 (sft.train.engine.fsdp_cpu_problem): below it these tests would
# only meet that error.
needs_fsdp_on_cpu = pytest.mark.skipif(fsdp_cpu_problem(torch.__version__) is not None,
                                       reason="FSDP2 on CPU needs torch >= 2.7")


def test_requested_engine_reads_what_accelerate_launch_exports():
    assert requested_engine({"ACCELERATE_USE_FSDP": "true"}) == "fsdp"
    assert requested_engine({"ACCELERATE_USE_DEEPSPEED": "True"}) == "deepspeed"
    assert requested_engine({}) is None


def test_fsdp_asked_but_ddp_running_is_a_loud_message_with_cause_and_fix():
    message = fallback_problem("fsdp", "DistributedType.MULTI_CPU", 2)
    assert message.startswith("!!! FSDP was requested") and "the engine is MULTI_CPU: the model is NOT sharded" in message
    assert "Cause: accelerate kept distributed_type MULTI_CPU and dropped the FSDP plugin" in message
    assert "Fix: launch with configs/accelerate/fsdp.yaml" in message
    assert "only one process" in fallback_problem("fsdp", "DistributedType.NO", 1)
    deepspeed = fallback_problem("deepspeed", "DistributedType.MULTI_CPU", 1)
    assert "Cause: accelerate's state was created in CPU mode" in deepspeed and "Fix: launch without --cpu" in deepspeed
    assert fallback_problem("deepspeed", "DistributedType.DEEPSPEED", 1) is None  # runs on CPU, even one process
    assert fallback_problem("fsdp", "DistributedType.FSDP", 2) is None
    assert fallback_problem(None, "DistributedType.MULTI_CPU", 2) is None


def test_fsdp_on_cpu_below_torch_27_is_a_clear_error_naming_the_fix():
    message = fsdp_cpu_problem("2.6.0+cu124")
    assert message.startswith("FSDP on CPU processes needs torch >= 2.7; this is torch 2.6.0+cu124")
    assert "pip install 'torch>=2.7,<2.14'" in message and "with DDP" in message
    for version in ("2.7.1+cu126", "2.13.0+cpu", "2.10.0a0+git1234", "3.0.0"):
        assert fsdp_cpu_problem(version) is None, version


COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_gather", "all_reduce", "broadcast", "reduce_scatter")


def _count_collectives(counts: dict) -> None:
    import torch.distributed as dist

    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _sharded_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: a tiny tied Qwen2 sharded as accelerate's fsdp2_prepare_model does, two train steps."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sft.train.loss import attach_chunked_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    loss_hooks = attach_chunked_loss(model, chunk_size=2)  # before sharding, as sft.train.run does
    for layer in model.model.layers:
        fully_shard(layer)
    # accelerate's tail unit: final norm + (tied) embedding + head, kept gathered after forward.
    fully_shard([model.model.norm, model.model.embed_tokens, model.lm_head], reshard_after_forward=False)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    counts: dict = {}
    _count_collectives(counts)
    ids = torch.arange(24).reshape(1, 24) + 10 * rank
    labels = ids.clone()
    if rank == 0:
        labels[:, :1] = -100  # 23 supervised predictions: 12 chunks of 2
    else:
        labels[:, :20] = -100
        labels[:, 21:] = -100  # 1 supervised prediction: 1 chunk
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(23)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"counts": counts, "chunks": loss_hooks.chunks_run, "losses": losses,
                   "dtensors": sum(type(p).__name__ == "DTensor" for p in model.parameters())}, f)
    dist.barrier()  # no rank tears its group down while the other still has work in flight (gloo aborts then)
    dist.destroy_process_group()
    os._exit(0)  # no interpreter finalization with the sharded model alive (gloo can abort there; see hf_sft.leave)


@needs_fsdp_on_cpu
def test_ranks_with_very_different_supervised_counts_issue_the_same_collectives(tmp_path):
    """The chunk count follows each rank's supervised tokens; the collectives must not (or ranks hang)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["chunks"] == [12, 12] and ranks[1]["chunks"] == [1, 1]
    assert ranks[0]["dtensors"] == ranks[1]["dtensors"] > 0  # really sharded
    assert ranks[0]["counts"].get("all_gather_single", 0) + ranks[0]["counts"].get("all_gather_into_tensor", 0) > 0
    assert ranks[0]["counts"] == ranks[1]["counts"], ranks
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)


def _zero3_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: a tiny tied Qwen2 under DeepSpeed ZeRO-3 (every parameter partitioned), two train steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    counts: dict = {}
    _count_collectives(counts)  # before DeepSpeed's comm backend captures torch.distributed's functions
    import deepspeed
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sft.train.loss import attach_chunked_loss

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    config = Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):  # built partitioned, as zero3_init_flag does
        model = Qwen2ForCausalLM(config)
    loss_hooks = attach_chunked_loss(model, chunk_size=2)  # before the engine wraps it, as sft.train.run does
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=ds_config)
    partitioned = sum(p.ds_tensor.numel() < p.ds_numel for p in model.parameters())
    before = dict(counts)
    ids = torch.arange(24).reshape(1, 24) + 10 * rank
    labels = ids.clone()
    if rank == 0:
        labels[:, :1] = -100  # 23 supervised predictions: 12 chunks of 2
    else:
        labels[:, :20] = -100
        labels[:, 21:] = -100  # 1 supervised prediction: 1 chunk
    losses = []
    for _ in range(2):
        loss = engine(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(23)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    steps = {name: counts.get(name, 0) - before.get(name, 0) for name in counts}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"counts": steps, "chunks": loss_hooks.chunks_run, "losses": losses, "partitioned": partitioned,
                   "parameters": len(list(model.parameters()))}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # see _sharded_worker


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not importable (see tests/e2e/test_zero3_runs.py to install it)")
def test_zero3_ranks_with_very_different_supervised_counts_issue_the_same_collectives(tmp_path):
    """ZeRO-3 gathers a module's weights in its forward hooks; the loss must not add per-chunk gathers."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_zero3_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["chunks"] == [12, 12] and ranks[1]["chunks"] == [1, 1]
    assert ranks[0]["partitioned"] == ranks[0]["parameters"] > 0  # every parameter really partitioned
    assert sum(ranks[0]["counts"].get(name, 0) for name in ("all_gather_into_tensor", "all_gather")) > 0
    assert ranks[0]["counts"] == ranks[1]["counts"], ranks
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)


def test_ddp_does_not_search_for_unused_parameters_when_every_trainable_one_is_used():
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from sft.models import load_model
    from sft.train.engine import ddp_find_unused_parameters

    model = load_model("tiny-qwen2")
    assert ddp_find_unused_parameters(model) is False  # full fine-tuning of a dense model
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert ddp_find_unused_parameters(lora) is False  # the Trainer's own default for a PEFT model is True
    assert ddp_find_unused_parameters(lora, requested=True) is True  # --ddp_find_unused_parameters wins
    moe = SimpleNamespace(config=SimpleNamespace(num_experts=8, get_text_config=lambda: SimpleNamespace(num_experts=8)))
    assert ddp_find_unused_parameters(moe) is True  # a router may leave an expert without a gradient


def test_setup_hands_the_trainer_find_unused_parameters_false_for_lora(tmp_path, monkeypatch):
    """The TrainingArguments a LoRA run gives the Trainer, and the DDP kwargs the Trainer builds from them."""
    from transformers import Trainer

    from sft.config import parse_config
    from sft.models import load_tokenizer
    from sft.train import run as run_module

    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n' * 4)
    config = parse_config(["--model", "tiny-qwen2", "--data", str(data), "--finetuning_type", "lora",
                           "--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    run = run_module.setup(config, load_tokenizer("tiny-qwen2"))
    assert run.args.ddp_find_unused_parameters is False
    trainer = Trainer(model=run.model, args=run.args, train_dataset=run.train_data, data_collator=run.collate)
    assert trainer._build_accelerator_args()["kwargs_handlers"][0].find_unused_parameters is False
