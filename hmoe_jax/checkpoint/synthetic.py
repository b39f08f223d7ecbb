"""Random gpt-oss checkpoints in the real Hugging Face format, written by `transformers` itself.

Tests and the demo need checkpoints without downloading any: `write_hf_checkpoint` builds a
`GptOssForCausalLM` with random values in EVERY parameter (biases, sinks and norms included, so a
port that ignores one of them fails parity), saves it with `save_pretrained`, and optionally repacks
the experts as MXFP4 blocks/scales with this project's packer, as the released gpt-oss-20b stores them.
Requires the `torch` extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..model.mxfp4 import dequantize_mxfp4_np, quantize_mxfp4_np
from .chat import TEMPLATE_FILE, ChatFormat
from .layouts import MXFP4_MODULES_NOT_CONVERTED

# gpt-oss-20b's config.json as the HF checkpoint has it (the shapes of `bench/make_synthetic_checkpoint.py`'s
# full-size random checkpoint and of `eval doctor`'s kernel checks).
GPT_OSS_20B_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": MXFP4_MODULES_NOT_CONVERTED, "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 201088,
}

def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A small but complete gpt-oss `config.json` (YaRN with an explicit 4096 original context, as
    the real model; transformers would otherwise fall back to max_position_embeddings)."""
    config = dict(
        model_type="gpt_oss",
        architectures=["GptOssForCausalLM"],
        vocab_size=320,  # room for a byte-level tokenizer (`write_tokenizer`): 256 bytes, specials, merges
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
            truncate=False, original_max_position_embeddings=4096,
        ),
        swiglu_limit=7.0,
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.update(overrides)
    if "layer_types" not in overrides:
        config["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config["num_hidden_layers"])
        ]
    return config


def random_torch_model(config: dict[str, Any], seed: int = 0, std: float = 0.1):
    """A transformers `GptOssForCausalLM` (eager attention and experts) with every parameter random."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    hf_config = GptOssConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GptOssForCausalLM(hf_config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)  # unit-scale embeddings, as trained models roughly have
            else:
                p.copy_(std * noise)
    return model


def write_hf_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    experts: str = "bf16",
    dtype: str = "float32",
    max_shard_size: str | None = None,
    std: float = 0.1,
) -> Path:
    """Write a random gpt-oss checkpoint. `experts`: "bf16" (plain `gate_up_proj`/`down_proj`, in
    `dtype`) or "mxfp4" (`*_blocks`/`*_scales`, needs hidden and intermediate sizes divisible by 32).
    Returns the directory."""
    import torch

    config = config if config is not None else tiny_config()
    out_dir = Path(out_dir).expanduser()
    model = random_torch_model(config, seed=seed, std=std)
    if experts == "mxfp4":
        # Snap expert weights to MXFP4-representable values first, so the bf16 reference and the
        # packed checkpoint hold exactly the same numbers.
        with torch.no_grad():
            for layer in model.model.layers:
                for name in ("gate_up_proj", "down_proj"):
                    p = getattr(layer.mlp.experts, name)
                    blocks, scales = quantize_mxfp4_np(np.swapaxes(p.numpy(), 1, 2))
                    snapped = np.swapaxes(dequantize_mxfp4_np(blocks, scales), 1, 2)
                    p.copy_(torch.from_numpy(np.ascontiguousarray(snapped)))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = model.to(torch_dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    if experts == "mxfp4":
        _repack_experts_as_mxfp4(out_dir)
    elif experts != "bf16":
        raise ValueError(f"experts must be 'bf16' or 'mxfp4', got {experts!r}")
    return out_dir


def _repack_experts_as_mxfp4(out_dir: Path) -> None:
    """Rewrite every shard, replacing `*.experts.{gate_up,down}_proj` [E, in, out] by MXFP4
    `*_blocks` [E, out, in/32, 16] and `*_scales` [E, out, in/32], and mark the config quantized."""
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    index_path = out_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    for shard in sorted(out_dir.glob("model*.safetensors")):
        tensors = load_torch(str(shard))
        out = {}
        for key, t in tensors.items():
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                w = np.swapaxes(t.to(torch.float32).numpy(), 1, 2)  # [E, out, in]
                blocks, scales = quantize_mxfp4_np(w)
                # The packer keeps its input's memory order; safetensors needs contiguous tensors.
                out[key + "_blocks"] = torch.from_numpy(np.ascontiguousarray(blocks))
                out[key + "_scales"] = torch.from_numpy(np.ascontiguousarray(scales))
                if index is not None:
                    fname = index["weight_map"].pop(key)
                    index["weight_map"][key + "_blocks"] = fname
                    index["weight_map"][key + "_scales"] = fname
            else:
                out[key] = t
        save_torch(out, str(shard), metadata={"format": "pt"})
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MXFP4_MODULES_NOT_CONVERTED}
    config_path.write_text(json.dumps(config, indent=2))


def load_torch_reference(path: str | Path, dtype: str = "float32"):
    """The transformers reference on a checkpoint directory: eager attention and experts, MXFP4
    experts dequantized."""
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    kwargs: dict[str, Any] = dict(attn_implementation="eager", dtype=getattr(torch, dtype))
    if config.get("quantization_config", {}).get("quant_method") == "mxfp4":
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    try:
        model = GptOssForCausalLM.from_pretrained(path, experts_implementation="eager", **kwargs)
    except TypeError:
        model = GptOssForCausalLM.from_pretrained(path, **kwargs)
    return model.to(getattr(torch, dtype)).eval()


# Names of the special tokens a tiny tokenizer reserves, keyed by the config field holding their id.
_SPECIAL_TOKENS = {"pad_token_id": "<|pad|>", "bos_token_id": "<|startoftext|>", "eos_token_id": "<|endoftext|>"}
# harmony's message structure tokens (gpt-oss's tokenizer has them as added special tokens).
HARMONY_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
# A harmony-style chat template of our own for tiny checkpoints: the structure of gpt-oss's (a system
# message naming the channels, user turns, past assistant turns in the final channel, the assistant's
# turn opened), without its tool and date sections. gpt-oss ships its own as chat_template.jinja.
CHAT_TEMPLATE = """\
<|start|>system<|message|>Reasoning: {{ reasoning_effort | default("medium") }}

# Valid channels: analysis, commentary, final.<|end|>
{%- for message in messages %}
{%- if message.role == "user" %}
<|start|>user<|message|>{{ message.content }}<|end|>
{%- elif message.role == "assistant" %}
<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>
{%- else %}
{{- raise_exception("this template has user and assistant messages only, not " + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|start|>assistant
{%- endif %}
"""


# Bytes a byte-level tokenizer must spell on its own (each is one token before any merge).
BYTE_ALPHABET_SIZE = 256


def write_tokenizer(out_dir: str | Path, texts: list[str], config: dict[str, Any] | None = None, *,
                    chat: bool = True) -> Path:
    """Train a small byte-level BPE tokenizer on `texts` and save it as `tokenizer.json` +
    `tokenizer_config.json` beside a tiny checkpoint, so the pipeline reads it exactly as it reads
    gpt-oss's own tokenizer.

    Byte-level, as gpt-oss's is: every string encodes, and decodes back to itself, whatever characters
    the training texts held (a character-level BPE silently drops one it never saw: "E = ½ m v²" came
    back as "E   m v"). Its 256 byte symbols, the special tokens and the merges learned on `texts` fit
    in the config's `vocab_size` (every id is a row of the embedding), which must therefore leave room
    for them. The config's pad/bos/eos ids get named special tokens. Digits are split one per token
    before the bytes are, so amounts reach the model digit by digit. Like gpt-oss's, it adds no BOS.
    With `chat`, harmony's special tokens follow those and `CHAT_TEMPLATE` is saved as
    `chat_template.jinja`, where `transformers` and `checkpoint.chat` read a checkpoint's template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    config = config if config is not None else tiny_config()
    specials = sorted((config[key], name) for key, name in _SPECIAL_TOKENS.items() if config.get(key) is not None)
    if [token_id for token_id, _ in specials] != list(range(len(specials))):
        raise ValueError(f"special token ids must be 0..{len(specials) - 1} for a trained tokenizer, got {specials}")
    vocab_size = config["vocab_size"]
    if chat:  # the template's own words are part of what the tokenizer learns to merge
        specials += [(len(specials) + i, name) for i, name in enumerate(HARMONY_TOKENS)]
        texts = list(texts) + [_template_words()]
    if len(specials) + BYTE_ALPHABET_SIZE > vocab_size:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {len(specials) + BYTE_ALPHABET_SIZE} "
                         f"({BYTE_ALPHABET_SIZE} bytes + {len(specials)} special tokens), got {vocab_size}")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[name for _, name in specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    names = {key: name for key, name in _SPECIAL_TOKENS.items() if config.get(key) is not None}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                        "model_max_length": config["max_position_embeddings"]}
    for key, name in names.items():
        tokenizer_config[key.removesuffix("_id")] = name
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if chat:
        (out_dir / TEMPLATE_FILE).write_text(CHAT_TEMPLATE)
    return out_dir


def _template_words() -> str:
    """The text CHAT_TEMPLATE renders around its special tokens, at every reasoning effort."""
    chat = ChatFormat(CHAT_TEMPLATE, Path(TEMPLATE_FILE), {})
    efforts = ("low", "medium", "high")
    text = " ".join(chat.with_variables(reasoning_effort=effort).render([""])[0] for effort in efforts)
    for token in HARMONY_TOKENS:
        text = text.replace(token, " ")
    return text + " user assistant final"
