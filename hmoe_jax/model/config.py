"""`GptOssConfig`: the one place a checkpoint's `config.json` becomes a model configuration.

Two layouts are read:
- Hugging Face (`model_type: gpt_oss`), with RoPE given either as `rope_parameters` (transformers 5.x)
  or as `rope_scaling` + `rope_theta` (older exports);
- OpenAI's `original/config.json` (`num_experts`, `experts_per_token`, `rope_scaling_factor`, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A checkpoint configuration that cannot describe a gpt-oss model; the message names file and key."""


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    # RoPE scaling: "default" (plain RoPE) or "yarn".
    rope_type: str = "yarn"
    rope_factor: float = 32.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_max_position_embeddings: int = 4096
    rope_truncate: bool = False
    # None: derived from the factor as YaRN prescribes (0.1 ln(factor) + 1).
    rope_attention_factor: float | None = None
    max_position_embeddings: int = 131072
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            raise ConfigError(f"layer_types contains unknown attention types {unknown}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_local_experts="
                f"{self.num_local_experts}]"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rotate-half RoPE")
        if self.rope_type not in ("default", "yarn"):
            raise ConfigError(f"unsupported rope type {self.rope_type!r} (gpt-oss uses 'yarn')")

    @property
    def attention_scaling(self) -> float:
        """The factor YaRN multiplies cos and sin by (1.0 for plain RoPE)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return float(self.rope_attention_factor)
        return 1.0 if self.rope_factor <= 1 else 0.1 * math.log(self.rope_factor) + 1.0

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        return tuple(t == SLIDING for t in self.layer_types)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` of this model, in transformers 5.x spelling (`rope_parameters`);
        `_from_hf` reads it back to an equal config."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "yarn":
            rope.update(
                factor=self.rope_factor,
                beta_fast=self.rope_beta_fast,
                beta_slow=self.rope_beta_slow,
                truncate=self.rope_truncate,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
            if self.rope_attention_factor is not None:
                rope["attention_factor"] = self.rope_attention_factor
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "swiglu_limit": self.swiglu_limit,
            "swiglu_alpha": self.swiglu_alpha,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "GptOssConfig":
        """Build from either checkpoint layout (or from `to_dict`'s own output)."""
        if "hidden_size" in d and "rope_type" in d and "rope_factor" in d:  # our own to_dict
            fields = {f.name for f in dataclasses.fields(cls)}
            kw = {k: v for k, v in d.items() if k in fields}
            kw["layer_types"] = tuple(kw["layer_types"])
            if isinstance(kw.get("eos_token_id"), list):
                kw["eos_token_id"] = tuple(kw["eos_token_id"])
            return cls(**kw)
        if "model_type" not in d and ("experts_per_token" in d or "num_experts" in d):
            return _from_openai_original(d, source)
        return _from_hf(d, source)


def _require(d: dict, key: str, source: str, kind=None):
    if key not in d or d[key] is None:
        raise ConfigError(f"{source}: required key {key!r} is missing")
    value = d[key]
    wrong_type = kind is not None and (not isinstance(value, kind) or isinstance(value, bool))
    if wrong_type:
        raise ConfigError(f"{source}: key {key!r} has value {value!r}, expected {getattr(kind, '__name__', kind)}")
    return value


def _default_layer_types(n: int) -> tuple[str, ...]:
    # gpt-oss alternates, starting with a sliding layer at index 0.
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n))


def _sizes(d: dict, source: str) -> dict[str, int]:
    """The sizes both layouts spell alike."""
    hidden = _require(d, "hidden_size", source, int)
    heads = _require(d, "num_attention_heads", source, int)
    return dict(
        vocab_size=_require(d, "vocab_size", source, int),
        hidden_size=hidden,
        intermediate_size=_require(d, "intermediate_size", source, int),
        num_hidden_layers=_require(d, "num_hidden_layers", source, int),
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        sliding_window=_require(d, "sliding_window", source, int),
    )


def _from_hf(d: dict, source: str) -> GptOssConfig:
    model_type = d.get("model_type")
    if model_type != "gpt_oss":
        raise ConfigError(f"{source}: unknown model_type {model_type!r}; expected 'gpt_oss'")
    sizes = _sizes(d, source)
    n_layers = sizes["num_hidden_layers"]
    n_experts = d.get("num_local_experts", d.get("num_experts"))
    if n_experts is None:
        raise ConfigError(f"{source}: required key 'num_local_experts' is missing")
    layer_types = d.get("layer_types") or _default_layer_types(n_layers)

    # transformers 5.x: `rope_parameters` holds theta too; older: `rope_scaling` + `rope_theta`.
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.get("rope_theta", d.get("rope_theta", 150000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default" if not rope else "yarn"))
    original_max = rope.get("original_max_position_embeddings") or d.get("max_position_embeddings", 131072)
    factor = rope.get("factor")
    if rope_type == "yarn" and factor is None:
        factor = d.get("max_position_embeddings", 131072) / original_max
    eos = d.get("eos_token_id")
    return GptOssConfig(
        **sizes,
        num_local_experts=n_experts,
        num_experts_per_tok=_require(d, "num_experts_per_tok", source, int),
        layer_types=tuple(layer_types),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_factor=float(factor if factor is not None else 1.0),
        rope_beta_fast=float(rope.get("beta_fast") or 32.0),
        rope_beta_slow=float(rope.get("beta_slow") or 1.0),
        rope_original_max_position_embeddings=int(original_max),
        # transformers treats a missing `truncate` as True; gpt-oss's own config says False.
        rope_truncate=bool(rope.get("truncate", True)),
        rope_attention_factor=rope.get("attention_factor"),
        max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
        swiglu_limit=float(d.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
        attention_bias=bool(d.get("attention_bias", True)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        pad_token_id=d.get("pad_token_id"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )


def _from_openai_original(d: dict, source: str) -> GptOssConfig:
    sizes = _sizes(d, source)
    original_max = int(d.get("initial_context_length", 4096))
    factor = float(d.get("rope_scaling_factor", 32.0))
    return GptOssConfig(
        **sizes,
        num_local_experts=_require(d, "num_experts", source, int),
        num_experts_per_tok=_require(d, "experts_per_token", source, int),
        layer_types=_default_layer_types(sizes["num_hidden_layers"]),
        rope_theta=float(d.get("rope_theta", 150000.0)),
        rope_type="yarn" if factor > 1 else "default",
        rope_factor=factor,
        # OpenAI names: ntk_alpha is YaRN's beta_slow, ntk_beta its beta_fast.
        rope_beta_fast=float(d.get("rope_ntk_beta", 32.0)),
        rope_beta_slow=float(d.get("rope_ntk_alpha", 1.0)),
        rope_original_max_position_embeddings=original_max,
        rope_truncate=False,
        max_position_embeddings=int(original_max * factor),
        swiglu_limit=float(d.get("swiglu_limit", 7.0)),
        swiglu_alpha=1.702,
    )


def load_config(path: str | Path) -> GptOssConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return GptOssConfig.from_dict(d, source=str(file))
