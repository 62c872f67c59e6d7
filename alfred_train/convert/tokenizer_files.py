"""Carry tokenizer files between a Hugging Face directory and our checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from alfred_train.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files found in `src` (a directory, or one .model / .json file) into `dst`."""
    src, dst = Path(src), Path(dst)
    if src.is_file():  # e.g. an SFT run's model.tokenizer pointing at a .model file
        name = "tokenizer.model" if src.suffix == ".model" else "tokenizer.json"
        files = [(src, name)]
    else:
        files = [(src / n, n) for n in TOKENIZER_FILES if (src / n).is_file()]
    if not files:
        return []
    dst.mkdir(parents=True, exist_ok=True)
    for path, name in files:
        shutil.copyfile(path, dst / name)
    return [name for _, name in files]


def remove_tokenizer_files(dst: Path) -> None:
    """Remove the tokenizer files an earlier conversion copied into `dst` (nothing else)."""
    for name in TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
    if dst.is_dir() and not any(dst.iterdir()):
        dst.rmdir()


def check_tokenizer(tokenizer_dir: Path, model_vocab: int):
    """Load the copied tokenizer (BOS/EOS/EOD mapped) and check it fits the embedding rows."""
    from alfred_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    if tok.vocab_size > model_vocab:
        raise ConfigError(f"{tokenizer_dir}: tokenizer has {tok.vocab_size} tokens but config.json "
                          f"vocab_size is {model_vocab}; use the tokenizer the model was trained with")
    return tok


def write_tokenizer_config(dst: Path, tok) -> None:
    """A minimal tokenizer_config.json when the source had none, so transformers can load the files."""
    path = dst / "tokenizer_config.json"
    if path.exists() or tok is None:
        return
    sp = (dst / "tokenizer.model").is_file()
    config = {"tokenizer_class": "LlamaTokenizer" if sp else "PreTrainedTokenizerFast",
              "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    if sp:
        import sentencepiece as spm

        proc = spm.SentencePieceProcessor(model_file=str(dst / "tokenizer.model"))
        config.update({k: proc.id_to_piece(v) for k, v in names.items() if v is not None})
        config["add_bos_token"], config["add_eos_token"] = tok.bos_id is not None, False
    else:
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(dst / "tokenizer.json"))
        config.update({k: hf.id_to_token(v) for k, v in names.items() if v is not None})
    path.write_text(json.dumps(config, indent=2))
