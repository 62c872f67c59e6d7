"""Tokenizers: Llama's sentencepiece `tokenizer.model` and Falcon's `tokenizer.json`, one interface.

Special ids every stage relies on:
    bos_id  prepended to every sequence when the tokenizer has one (Llama: 1; Falcon: None)
    eos_id  the model's end-of-sequence token
    eod_id  end of document / response: appended after each response; the reward model reads its
            score at this position and generation stops on it. sentencepiece: eod == eos;
            Falcon: "<|endoftext|>" (looked up by string, id 11 in Falcon's vocabulary)
    pad_id  fills right-padded rows; masked out everywhere. Falls back to eod_id when the
            tokenizer defines no pad token (Llama's tokenizer.model has pad_id -1)
`encode` never adds special tokens: callers add BOS / EOD explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Protocol, Sequence

from alfred_train.errors import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: Optional[int]
    eos_id: int
    eod_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_continuation(self, text: str) -> list[int]:
        """The tokens of `text` where it continues other text: without the space a tokenizer
        prepends to the start of a text (sentencepiece's dummy prefix, Llama's Metaspace)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece model file (Llama's tokenizer.model, or `train_sentencepiece` output)."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise ConfigError(f"sentencepiece model {path} does not exist; "
                              "set model.tokenizer / --tokenizer to a .model file")
        self.path = path
        self._continuation = None  # the same model without the dummy prefix, built on first use
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError):  # "INTERNAL: could not parse ModelProto from ..."
            raise ConfigError(f"{path} is not a valid SentencePiece model (sentencepiece cannot parse it); "
                              "point model.tokenizer / --tokenizer at a tokenizer.model file") from None
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if self._sp.eos_id() < 0:
            raise ConfigError(f"sentencepiece model {path} has no EOS token; retrain it with eos_id set")
        self.eos_id = self._sp.eos_id()
        self.eod_id = self.eos_id
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_continuation(self, text: str) -> list[int]:
        """`text` encoded by the same model with its normalizer's add_dummy_prefix off."""
        if self._continuation is None:
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self.path.read_bytes())
            proto.normalizer_spec.add_dummy_prefix = False
            self._continuation = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._continuation.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


FALCON_SPECIAL_TOKENS = {"bos": None, "eos": "<|endoftext|>", "eod": "<|endoftext|>", "pad": None}


class HFJsonTokenizer:
    """A Hugging Face `tokenizer.json` (Falcon's byte-level BPE) read with the `tokenizers` library.

    `special_tokens` maps "bos" / "eos" / "eod" / "pad" to token strings (None = absent); keys left
    out keep Falcon's values: no BOS, EOS = EOD = "<|endoftext|>", pad = EOD. Not given, they are
    read from the tokenizer_config.json beside the file when there is one (`config_special_tokens`).
    Llama-3 style: {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "eod": "<|end_of_text|>"}.

    Text never encodes to a special token: a literal "<|endoftext|>" in a record (code, a chat log
    about GPT) is its characters, as with sentencepiece, not an EOD in the middle of a response
    (HF's default parses it; the SFT model learnt to stop there and the RM scored the cut-off text).
    BOS and EOD are placed by id, never by text.
    """

    def __init__(self, tokenizer_json_path: str | Path, special_tokens: Optional[Mapping[str, Optional[str]]] = None):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as err:
            raise ConfigError(
                "reading tokenizer.json needs the `tokenizers` package; pip install alfred-train[hf]"
            ) from err
        path = Path(tokenizer_json_path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file {path} does not exist; "
                              "set model.tokenizer / --tokenizer to a tokenizer.json")
        unknown = set(special_tokens or {}) - set(FALCON_SPECIAL_TOKENS)
        if unknown:
            roles = ", ".join(FALCON_SPECIAL_TOKENS)
            raise ConfigError(f"unknown special token role(s) {sorted(unknown)}; use {roles}")
        self.path = path
        if special_tokens is None:
            special_tokens = config_special_tokens(path.parent)
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for JSON it cannot read as a tokenizer
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"{path} is not a valid Hugging Face tokenizer file ({reason}); "
                              "point model.tokenizer / --tokenizer at a tokenizer.json") from None
        self._tok.encode_special_tokens = True  # special tokens' text is split as any other text
        names = {**FALCON_SPECIAL_TOKENS, **(special_tokens or {})}
        ids = {role: self._token_id(role, token) for role, token in names.items()}
        if ids["eod"] is None or ids["eos"] is None:
            raise ConfigError(f"{path}: 'eos' and 'eod' special tokens are required; name them in special_tokens")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.eod_id = ids["bos"], ids["eos"], ids["eod"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eod_id

    def _token_id(self, role: str, token: Optional[str]) -> Optional[int]:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ConfigError(
                f"{self.path} has no token {token!r} for {role}; put the model's tokenizer_config.json "
                f"(its bos_token / eos_token / pad_token) beside it"
            )
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        """`text` encoded after a newline, whose own tokens are then dropped: a tokenizer.json that
        prepends a space to a text's start (Llama's Metaspace) prepends none in mid-text."""
        anchor = self.encode("\n")
        ids = self.encode("\n" + text)
        return ids[len(anchor):] if ids[:len(anchor)] == anchor else self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFJsonTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def config_special_tokens(directory: Path) -> Optional[dict[str, Optional[str]]]:
    """bos / eos (= eod) / pad as `directory/tokenizer_config.json` names them (a hub model's own
    file: Llama-3's "<|begin_of_text|>" and "<|end_of_text|>", Mistral's "<s>" and "</s>"); None
    without that file. A token given as {"content": ...} is read the same; a role it leaves out keeps
    Falcon's value."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); repair it or remove it") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object; repair it or remove it")

    def token(key: str) -> Optional[str]:
        value = config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    found = {role: token(f"{role}_token") for role in ("bos", "eos", "pad") if f"{role}_token" in config}
    if found.get("eos"):
        found["eod"] = found["eos"]
    return found


def load_tokenizer(path: str | Path, special_tokens: Optional[Mapping[str, Optional[str]]] = None) -> Tokenizer:
    """Pick the implementation from the file name, or from a directory's contents.

    A directory holding `tokenizer.model` is read with sentencepiece (Llama checkpoints often ship
    both files, and the .model is the original); otherwise its `tokenizer.json` is used.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer(path / "tokenizer.model")
        if (path / "tokenizer.json").is_file():
            return HFJsonTokenizer(path / "tokenizer.json", special_tokens)
        raise ConfigError(f"directory {path} holds neither tokenizer.model nor tokenizer.json; "
                          "set model.tokenizer / --tokenizer")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFJsonTokenizer(path, special_tokens)
    raise ConfigError(f"cannot tell the tokenizer type of {path}; "
                      "point model.tokenizer / --tokenizer at a .model or .json file")


def train_sentencepiece(corpus_path: str | Path, out_prefix: str | Path, vocab_size: int) -> Path:
    """Train a BPE sentencepiece model on a text file (one sentence per line); returns `<out_prefix>.model`.

    Deterministic: one thread, every sentence used in file order (no sampling, no shuffling).
    Ids: pad 0, bos 1, eos 2, unk 3 (Llama: unk 0, bos 1, eos 2); byte_fallback so any text
    encodes (unknown characters become <0xNN> byte pieces, 256 ids of the vocabulary); identity
    normalization and kept whitespace so "\\n" and double spaces round-trip through decode.
    """
    import sentencepiece as spm

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=str(corpus_path),
        model_prefix=str(out_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return Path(f"{out_prefix}.model")
