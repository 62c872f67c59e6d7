"""Worker: train a tiny Hugging Face Llama two steps under DeepSpeed ZeRO-3 (gloo, CPU) and save it the
way the HF Trainer does (OUT/config.json, OUT/latest, OUT/global_step2/*_model_states.pt + optim shards).

    RANK=.. WORLD_SIZE=.. python tests/workers/deepspeed_zero3.py OUT_DIR TOKENIZER_MODEL

Rank 0 also writes OUT/deepspeed_logits.pt: the DeepSpeed model's logits (2, 24, V) after training and
before, on the same tokens as tests/workers/logits.py, and OUT/ds_losses.json (the two training losses).
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch

VOCAB = 520


def skip_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (~2 min on a fresh machine)
    in every TorchBackend. Marking it incompatible takes DeepSpeed's own fallback (torch.distributed
    over gloo): the op is only a faster intra-node all-reduce, not needed for correctness."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def main() -> None:
    out, tokenizer = Path(sys.argv[1]), sys.argv[2]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    dist.init_process_group("gloo")  # ours, before deepspeed.initialize (DeepSpeed reuses it)
    skip_shm_op()
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
                         initializer_range=0.1)  # logits well away from zero, so equality means something
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))  # as workers/logits.py
    with torch.no_grad():
        initial = model(input_ids=tokens).logits  # (2, 24, V) before training
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0: say what we mean
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # a torch optimizer: FusedAdam compiles ~3 min
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    gen = torch.Generator().manual_seed(100 + dist.get_rank())
    losses = []
    for _ in range(2):
        batch = torch.randint(0, VOCAB, (2, 16), generator=gen)  # (B, S), different on each rank
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=tokens).logits  # (2, 24, V); ZeRO-3 gathers the shards for the forward
    engine.save_checkpoint(str(out))  # collective: OUT/latest, OUT/global_step2/
    if dist.get_rank() == 0:
        config.save_pretrained(out)
        shutil.copyfile(tokenizer, out / "tokenizer.model")
        torch.save({"trained": logits, "initial": initial}, out / "deepspeed_logits.pt")
        (out / "ds_losses.json").write_text(json.dumps(losses))
    dist.barrier()
    dist.destroy_process_group()
    # Everything is written. Skip the interpreter's teardown: once in a loaded CI run a thread left by
    # DeepSpeed was destroyed while still joinable ("terminate called without an active exception",
    # SIGABRT, exit -6) after the checkpoint was complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
