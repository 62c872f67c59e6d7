"""Weights in and out: Hugging Face Llama / Falcon <-> our megatron checkpoints, and apply-delta.

    hf_config.py       config.json <-> ModelShape, unsupported fields refused before any weight
    hf.py              tensor-name rules (one table, read both ways)
    mcore.py           fill a model at any TP/PP from global tensors; gather them back at TP=1/PP=1
    hf_import.py       `convert hf-to-mcore`
    hf_export.py       `convert mcore-to-hf`
    delta.py           `convert apply-delta`
    safetensors_io.py  lazy reading of single-file / sharded safetensors dirs; sharded writing
    tokenizer_files.py tokenizer files carried along
    cli.py             the `convert` subcommands
"""
