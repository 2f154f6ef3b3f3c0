"""Tokenizer files for a package: `tokenizer.json` (Hugging Face's format) and the
`tokenizer_config.json` that tells a runtime's tokenizer (onnxruntime-extensions, as
onnxruntime-genai loads it) which tokenizer class it is and its special tokens.

A `tokenizer_config.json` (and `config.json` / `generation_config.json`, for the token ids) beside
the given tokenizer.json is used; otherwise one is written: the class from the tokenizer's
pre-tokenizer/model (byte-level BPE: GPT2Tokenizer, Metaspace BPE: LlamaTokenizer, WordPiece:
BertTokenizer), the special tokens found in its added tokens.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgeq.packaging.folder import PackageError

# Special tokens in the order they are tried when no config names them.
EOS_TOKENS = ("</s>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<eos>", "<|endoftext|>")
BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>", "<|im_start|>", "<|endoftext|>")
# Classes onnxruntime-extensions knows; transformers 5 writes a generic backend name instead.
_KNOWN_CLASSES = ("GPT2Tokenizer", "LlamaTokenizer", "BertTokenizer", "CodeGenTokenizer", "GemmaTokenizer",
                  "Qwen2Tokenizer", "PreTrainedTokenizerFast", "T5Tokenizer", "XLMRobertaTokenizer")


@dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None


def read_tokenizer(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"tokenizer '{path}' does not exist", fix="give the path of a tokenizer.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise PackageError(f"'{path}' is not a tokenizer.json ({err})", fix="give a Hugging Face tokenizer.json") from err
    if not isinstance(data, dict) or "model" not in data:
        raise PackageError(f"'{path}' is not a tokenizer.json (no 'model')", fix="give a Hugging Face tokenizer.json")
    return data


def special_tokens(path: Path) -> SpecialTokens:
    """bos/eos/pad ids: from config.json or generation_config.json beside the tokenizer, else
    from tokenizer_config.json's token strings, else the usual special tokens in its vocabulary."""
    path = Path(path)
    data = read_tokenizer(path)
    vocab = _token_ids(data)
    found: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    for config_name in ("generation_config.json", "config.json"):
        config = _json_beside(path, config_name)
        for key in found:
            value = config.get(key)
            if found[key] is None and isinstance(value, int):
                found[key] = value
            elif found[key] is None and isinstance(value, list) and value and isinstance(value[0], int):
                found[key] = value[0]
    config = _json_beside(path, "tokenizer_config.json")
    for key in found:
        token = _token_text(config.get(key.removesuffix("_id")))
        if found[key] is None and token in vocab:
            found[key] = vocab[token]
    if found["eos_token_id"] is None:
        found["eos_token_id"] = next((vocab[t] for t in EOS_TOKENS if t in vocab), None)
    if found["bos_token_id"] is None:
        found["bos_token_id"] = next((vocab[t] for t in BOS_TOKENS if t in vocab), None)
    if found["pad_token_id"] is None:
        found["pad_token_id"] = found["eos_token_id"]
    return SpecialTokens(**found)


def write_tokenizer(path: Path, folder: Path, tokens: SpecialTokens) -> list[str]:
    """tokenizer.json and a tokenizer_config.json the runtime reads, into `folder`."""
    path = Path(path)
    data = read_tokenizer(path)
    shutil.copyfile(path, folder / "tokenizer.json")
    config = _json_beside(path, "tokenizer_config.json")
    if config.get("tokenizer_class") not in _KNOWN_CLASSES:
        config["tokenizer_class"] = tokenizer_class(data)
    names = {v: k for k, v in _token_ids(data).items()}
    for key, token_id in (("bos_token", tokens.bos_token_id), ("eos_token", tokens.eos_token_id),
                          ("pad_token", tokens.pad_token_id)):
        if key not in config and token_id is not None and token_id in names:
            config[key] = names[token_id]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json"]


def tokenizer_class(data: dict) -> str:
    model = data.get("model") or {}
    pre = json.dumps(data.get("pre_tokenizer") or {}) + json.dumps(data.get("decoder") or {})
    if model.get("type") == "WordPiece":
        return "BertTokenizer"
    if model.get("type") == "BPE" and "ByteLevel" in pre:
        return "GPT2Tokenizer"
    if model.get("type") in ("BPE", "Unigram") and ("Metaspace" in pre or "Replace" in pre):
        return "LlamaTokenizer"
    return "PreTrainedTokenizerFast"


def _token_ids(data: dict) -> dict[str, int]:
    vocab = dict((data.get("model") or {}).get("vocab") or {}) if isinstance((data.get("model") or {}).get("vocab"), dict) else {}
    for token in data.get("added_tokens") or []:
        vocab[token["content"]] = int(token["id"])
    return vocab


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _json_beside(path: Path, name: str) -> dict:
    other = path.with_name(name)
    if other == path or not other.is_file():
        return {}
    try:
        data = json.loads(other.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
