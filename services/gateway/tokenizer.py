"""Tokenizer and chat template, from an HF folder (tokenizer.json) or a GGUF file's metadata."""

from __future__ import annotations

import json
import os
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from neo_common.gguf_file import open_gguf

# llama.cpp's pre-tokenizer names -> the HF pre-tokenizer each stands for.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gguf_pre_tokenizer(name: str) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return byte_level


class TextTokenizer:
    """Encodes prompts, renders chat templates and decodes output tokens.

    ``special_ids`` are control tokens (never shown in output text); ``eos_token_ids`` end generation.
    """

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None, bos_token: str | None,
                 eos_token: str | None, eos_token_ids: tuple[int, ...], add_bos: bool) -> None:
        self.tok = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.added_tokens = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        self._template = env.from_string(chat_template) if chat_template else None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_hf_folder(cls, folder: str) -> "TextTokenizer":
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        cfg: dict[str, Any] = {}
        path = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(path):
            with open(path) as f:
                cfg = json.load(f)
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        eos_ids = set()
        if eos and tok.token_to_id(eos) is not None:
            eos_ids.add(tok.token_to_id(eos))
        gen_path = os.path.join(folder, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                gen_eos = json.load(f).get("eos_token_id")
            eos_ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        # tokenizer.json's post-processor adds BOS itself where the model wants it.
        return cls(tok, template, bos, eos, tuple(sorted(eos_ids)), add_bos=False)

    @classmethod
    def from_gguf(cls, path: str) -> "TextTokenizer":
        meta = open_gguf(path).metadata
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (gpt2/BPE)")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
        # Control (3) and user-defined (4) tokens match as whole units in text, as in HF tokenizers.
        specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
        tok.add_special_tokens(specials)
        bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = {eos_id} if eos_id is not None else set()
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None:
            eos_ids.add(eot)
        return cls(tok, meta.get("tokenizer.chat_template"),
                   tokens[bos_id] if bos_id is not None else None,
                   tokens[eos_id] if eos_id is not None else None,
                   tuple(sorted(eos_ids)), add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def load(cls, kind: str, path: str) -> "TextTokenizer":
        return cls.from_gguf(path) if kind == "gguf" else cls.from_hf_folder(path)

    def save(self, folder: str) -> None:
        """Write an HF-style folder (tokenizer.json + tokenizer_config.json) that loads back the same."""
        os.makedirs(folder, exist_ok=True)
        self.tok.save(os.path.join(folder, "tokenizer.json"))
        cfg = {"chat_template": self.chat_template, "bos_token": self.bos_token or None,
               "eos_token": self.eos_token or None}
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f)
        if self.eos_token_ids:
            with open(os.path.join(folder, "generation_config.json"), "w") as f:
                json.dump({"eos_token_id": list(self.eos_token_ids)}, f)

    # -- use ----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The batch call releases the GIL while it works (``encode`` holds it: seconds for a long
        # prompt, during which no other thread, the event loop's included, runs); same ids.
        ids = self._encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:
        """Text of ``ids``. With special tokens kept and ``spaces_between_special_tokens`` off, an
        added token right after another is its bare content, without the separator the decoder may
        put between tokens (vLLM's fast detokenizer does the same)."""
        if skip_special_tokens or spaces_between_special_tokens:
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        # token by token as a decode stream would (only this rare case pays the quadratic cost; the
        # incremental detokenizer decodes windows of a few tokens)
        pieces, before = [], ""
        for i in range(len(ids)):
            upto = self.tok.decode(ids[:i + 1], skip_special_tokens=False)
            adjacent = i > 0 and ids[i] in self.added_tokens and ids[i - 1] in self.added_tokens
            pieces.append(self.added_tokens[ids[i]] if adjacent else upto[len(before):])
            before = upto
        return "".join(pieces)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")
