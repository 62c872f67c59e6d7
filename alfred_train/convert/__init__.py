"""Weights in and out: Hugging Face Llama / Falcon <-> our megatron checkpoints, and apply-delta.

    hf_config.py       config.json <-> ModelShape, unsupported fields refused before any weight
    hf.py              tensor-name rules (one table, read both ways)
    mcore.py           fill a model at any TP/PP from global tensors; gather them back at TP=1/PP=1
    hf_import.py       `convert hf-to-mcore`
    hf_export.py       `convert mcore-to-hf`
    delta.py           `convert apply-delta`
    hf_output.py       the HF directory both write: new, empty or an earlier export; staged, moved in whole
    safetensors_io.py  lazy reading of single-file / sharded safetensors dirs; sharded writing
    tokenizer_files.py tokenizer files carried along
    peft.py            LoRA adapters <-> PEFT's adapter format
    deepspeed_zero.py  an HF Trainer DeepSpeed ZeRO checkpoint as an import source
    cli.py             the `convert` subcommands
"""
