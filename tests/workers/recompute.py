"""Worker: train.recompute none | selective | full build the same model, give the same loss and
gradients, and `full` really re-runs every layer in the backward pass (forward hooks count calls).

    python tests/workers/recompute.py OUT_DIR     (one process; writes OUT_DIR/recompute.json)
"""

import json
import sys
from pathlib import Path

import torch


def main():
    from alfred_train.config import load_config
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, shutdown
    from alfred_train.stages import common

    out = Path(sys.argv[1])
    runtime = init_runtime(ParallelDims(1, 1, 1))
    results = {}
    for mode in ("none", "selective", "full"):
        cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny-sft.yaml",
                          ["parallel.tp=1", f"train.recompute={mode}"])
        shape = common.shape_for(cfg, common.tokenizer_for(cfg))
        model = common.make_model(cfg, runtime, shape, kind="lm", backend=common.attention_backend(cfg, runtime),
                                  seed=7)[0]
        model.train()
        calls = []
        for layer in model.decoder.layers:
            layer.mlp.register_forward_hook(lambda *a: calls.append(1))
        tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(32)[None].expand(2, -1)
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        forward_calls = len(calls)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[mode] = {"loss": loss.item(), "grad_sum": grads.double().abs().sum().item(),
                         "granularity": model.config.recompute_granularity,
                         "forward_calls": forward_calls, "all_calls": len(calls)}
    (out / "recompute.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
