"""Layer-by-layer parity of this project's gpt-oss against `transformers`' `GptOssForCausalLM`.

Streams: one decoder layer of each implementation is in memory at a time (the transformers layer is
built, run and freed before ours is loaded), so a full-size gpt-oss-20b checks on a 24 GiB machine.

For every layer i, with x_ref the reference's own residual stream and x_ours ours:
- `teacher_forced`: both layers fed the SAME input x_ref; errors of the residual after attention and
  after the MoE, and the router's top-k agreement. This isolates layer i.
- `drift`: x_ours vs x_ref after layer i, each implementation running on its own outputs.
At the end: logits error, top-1 agreement and KL(ref || ours), each chain's final norm and lm_head.

Errors are relative: max |ours - ref| / max |ref|. When our weights come from a converted checkpoint
paired with its source, every tensor of a failing layer is also compared with the source, so a
corrupted conversion is named down to the parameter.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoint import (
    CheckpointError,
    SafetensorsReader,
    hf_rules,
    locate_checkpoint,
    read_params,
    safetensors_files,
)
from .config import GptOssConfig, load_config
from .flax_checkpoint import open_flax_checkpoint
from .loading import fill_model, path_key
from .model import DecoderLayer, RMSNorm, _precision, attention_masks
from .rope import rope_tables


@dataclasses.dataclass(frozen=True)
class Bounds:
    residual_rel: float  # teacher-forced residual stream, every layer
    router_agreement: float  # fraction of tokens whose top-k expert SET matches
    logits_rel: float
    top1: float
    kl: float  # mean KL(ref || ours), nats

    def to_dict(self):
        return dataclasses.asdict(self)


# fp32: the port agrees to ~5e-7 on random models; 1e-4 is the project's parity bound.
# bf16: both sides round differently (our softmax and attention scores stay fp32) and a near-tie in a
# router can flip an expert; these bounds hold with margin on random models, see README.
DEFAULT_BOUNDS = {
    "float32": Bounds(residual_rel=1e-4, router_agreement=0.99, logits_rel=1e-4, top1=0.99, kl=1e-6),
    "bfloat16": Bounds(residual_rel=5e-2, router_agreement=0.9, logits_rel=0.5, top1=0.9, kl=5e-3),
}


def abs_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max())


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    return float(np.abs(ours - ref).max() / scale) if scale > 0 else float(np.abs(ours).max())


# ------------------------------------------------------------------ weights of one layer

class WeightSource:
    """Our parameters, layer by layer, from an HF directory or a converted (Flax) checkpoint."""

    def __init__(self, path: Path, config: GptOssConfig, dtype):
        self.location = locate_checkpoint(path)
        self.config = config
        self.dtype = dtype
        if self.location.layout == "flax":
            self.flax = open_flax_checkpoint(self.location.path)
            self.packed = self.flax.packed_experts
        elif self.location.layout == "hf":
            self.reader = SafetensorsReader(safetensors_files(self.location.path))
            self.rules = hf_rules(config, set(self.reader.keys()))
            self.packed = False
        else:
            raise CheckpointError(f"{self.location.path}: parity reads HF or converted checkpoints, not {self.location.layout!r}")

    def params(self, prefix: str, abstract: nnx.Module) -> dict[str, np.ndarray]:
        """Every parameter whose path starts with `prefix` (e.g. 'layers/3/'), keyed without it."""
        return dict(self.stream(prefix, abstract))

    def stream(self, prefix: str, abstract: nnx.Module):
        """(path without `prefix`, array) pairs, one tensor in memory at a time."""
        _, state = nnx.split(abstract)
        wanted = {prefix + path_key(p): v for p, v in nnx.to_flat_state(state)}
        if self.location.layout == "flax":
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            abstract_arrays = {t: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for t, v in wanted.items()}
            for t, a in self.flax.read(abstract_arrays):
                yield t[len(prefix):], np.asarray(a)
            return
        rules = [r for r in self.rules if r.target in wanted]
        expected = {t: (tuple(v.shape), np.dtype(v.dtype)) for t, v in wanted.items()}
        for target, value in read_params(self.reader, rules, self.config, expected, check=False, widen_later=True):
            yield target[len(prefix):], value


    def _vocab_param(self, target: str, abstract: nnx.Module):
        _, state = nnx.split(abstract)
        variable = dict((path_key(p), v) for p, v in nnx.to_flat_state(state))[target]
        axes = tuple(getattr(variable, "axes", None) or ())
        if "vocab" not in axes:
            raise ValueError(f"parameter {target!r} has no 'vocab' axis (axes {axes})")
        return variable, axes.index("vocab")

    def _whole(self, target: str, abstract: nnx.Module) -> np.ndarray:
        return dict(self.stream("", abstract))[target]

    def vocab_rows(self, target: str, rows: np.ndarray, abstract: nnx.Module) -> np.ndarray:
        """`target` (e.g. 'embed_tokens') at the vocabulary entries `rows`, in our layout; from an HF
        directory only those entries' bytes are read."""
        variable, axis = self._vocab_param(target, abstract)
        if self.location.layout == "flax":
            return np.take(self._whole(target, abstract), rows, axis=axis)
        return np.concatenate([self._hf_vocab_slice(target, int(r), int(r) + 1, variable, axis) for r in rows], axis)

    def vocab_chunks(self, target: str, abstract: nnx.Module, chunk: int):
        """(start, stop, slice) over `target`'s vocabulary axis in chunks of `chunk` entries, our
        layout. From an HF directory one chunk is in memory at a time; a converted checkpoint is read
        whole once (orbax restores whole arrays)."""
        variable, axis = self._vocab_param(target, abstract)
        size = variable.shape[axis]
        whole = self._whole(target, abstract) if self.location.layout == "flax" else None
        for start in range(0, size, chunk):
            stop = min(start + chunk, size)
            if whole is not None:
                yield start, stop, np.take(whole, np.arange(start, stop), axis=axis)
            else:
                yield start, stop, self._hf_vocab_slice(target, start, stop, variable, axis)

    def _hf_vocab_slice(self, target, start, stop, variable, axis) -> np.ndarray:
        """Our rule's transform applied to rows [start, stop) of its (single) source tensor, whose
        first axis is the vocabulary (true of gpt-oss's embedding and lm_head in both layouts)."""
        rule = next((r for r in self.rules if r.target == target), None)
        if rule is None or len(rule.sources) != 1:
            raise CheckpointError(f"{self.location.path}: no single-tensor rule reads {target!r}")
        source = self.reader.get_rows(rule.sources[0], start, stop)
        value = np.asarray(rule.transform([source], self.config))
        shape = list(variable.shape)
        shape[axis] = stop - start
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.reader.file_of(rule.sources[0])}: tensor {rule.sources[0]!r} rows {start}:{stop} give shape "
                f"{value.shape} for {target!r}, expected {tuple(shape)}"
            )
        return value.astype(variable.dtype)


def _abstract_layer(config: GptOssConfig, i: int, dtype, packed: bool) -> DecoderLayer:
    return nnx.eval_shape(
        lambda: DecoderLayer(config, i, dtype=dtype, param_dtype=dtype, moe_backend="auto", packed_experts=packed,
                             rngs=nnx.Rngs(0))
    )


# ------------------------------------------------------------------ the transformers side

class Reference:
    """transformers modules built one at a time from an HF directory's tensors."""

    def __init__(self, path: Path, dtype: str):
        import torch
        from transformers import GptOssConfig as HFConfig

        location = locate_checkpoint(path)
        if location.layout != "hf":
            raise CheckpointError(
                f"{location.path}: the transformers reference needs an HF checkpoint directory (got {location.layout}); "
                "pass the HF source with --source"
            )
        raw = json.loads((location.path / "config.json").read_text())
        raw.pop("quantization_config", None)
        self.hf_config = HFConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures", "transformers_version")})
        self.hf_config._attn_implementation = "eager"
        self.hf_config._experts_implementation = "eager"
        self.torch_dtype = getattr(torch, dtype)
        self.reader = SafetensorsReader(safetensors_files(location.path))
        self.keys = set(self.reader.keys())

    def tensor(self, key: str):
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.reader.get(key)).astype(np.float32)).to(self.torch_dtype)

    def layer(self, i: int):
        import torch
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer

        layer = GptOssDecoderLayer(self.hf_config, i).eval()
        prefix = f"model.layers.{i}."
        state = {}
        for name in layer.state_dict():
            key = prefix + name
            if key in self.keys:
                state[name] = self.tensor(key)
            elif key + "_blocks" in self.keys:  # MXFP4 experts, decoded by transformers' own routine
                blocks = torch.from_numpy(self.reader.get(key + "_blocks"))
                scales = torch.from_numpy(self.reader.get(key + "_scales"))
                # One expert at a time into the output: on the whole tensor the routine's int32 index
                # and transposed temporaries cost about 2.5x the decoded float32 tensor.
                n_experts, n_out, n_groups, per_block = blocks.shape
                decoded = torch.empty((n_experts, n_groups * per_block * 2, n_out), dtype=self.torch_dtype)
                for e in range(n_experts):
                    decoded[e] = convert_moe_packed_tensors(blocks[e:e + 1], scales[e:e + 1], dtype=torch.float32)[0]
                del blocks, scales
                state[name] = decoded
            else:
                raise CheckpointError(f"{self.reader.files[0].parent}: tensor {key!r} is missing")
        # assign: the module takes these tensors instead of copying them into its random init.
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.to(self.torch_dtype)


# ------------------------------------------------------------------ the check

@dataclasses.dataclass
class LayerReport:
    layer: int
    attention_rel: float
    residual_rel: float
    router_agreement: float
    drift_rel: float
    residual_abs: float = 0.0  # max |ours - ref| of the teacher-forced residual stream
    drift_abs: float = 0.0  # the same for each implementation on its own stream
    tensors: dict[str, float] = dataclasses.field(default_factory=dict)  # param -> max abs diff vs source


@dataclasses.dataclass
class ParityReport:
    model: str
    source: str | None
    dtype: str
    n_prompts: int
    n_tokens: int
    layers: list[LayerReport]
    logits_rel: float | None
    top1: float | None
    kl: float | None
    bounds: Bounds
    failures: list[str]
    logits_abs: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d


def _jax_layer_fn():
    @jax.jit
    def run(graphdef, state, x, cos, sin, allowed, mask):
        layer = nnx.merge(graphdef, state)
        h = x + layer.self_attn(layer.input_layernorm(x), cos, sin, allowed)
        y, info = layer.mlp(layer.post_attention_layernorm(h), block_input=x, token_mask=mask)
        return h, h + y, info["expert_indices"]

    return run


def check_parity(
    model: str | Path,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    source: str | Path | None = None,
    dtype: str = "float32",
    layers: tuple[int, int] | None = None,
    bounds: Bounds | None = None,
    progress: Callable[[str], None] | None = None,
) -> ParityReport:
    """Compare layers [a, b) (all by default) of `model` (HF dir or converted checkpoint) with
    transformers on `source` (default: `model` itself, which must then be an HF dir)."""
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    bounds = bounds or DEFAULT_BOUNDS[dtype]
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    model, source = Path(model), Path(source) if source is not None else None
    ours_source = WeightSource(model, _config_for(model), jdtype)
    config = ours_source.config
    ref = Reference(source or model, dtype)
    paired = source is not None and ours_source.location.layout == "flax"
    source_weights = WeightSource(source, config, jdtype) if paired else None

    n = config.num_hidden_layers
    start, stop = layers or (0, n)
    if not 0 <= start < stop <= n:
        raise ValueError(f"layers {start}:{stop} outside the model's 0:{n}")

    ids = np.asarray(input_ids, np.int64)
    mask = np.asarray(attention_mask, np.int64)
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    real = mask.astype(bool)

    # Embeddings, once, from our weights (the same gather both implementations do): only the rows of
    # the prompts' tokens are read.
    used, inverse = np.unique(ids, return_inverse=True)
    rows = ours_source.vocab_rows("embed_tokens", used, _embed_abstract(config, jdtype))
    x_ours = jnp.asarray(rows[inverse.reshape(ids.shape)]).astype(jdtype)
    x_ref = torch.from_numpy(np.array(x_ours, np.float32)).to(ref.torch_dtype)
    del rows

    # Reference masks/rotary exactly as GptOssModel.forward builds them.
    t_mask, t_pos = torch.from_numpy(mask), torch.from_numpy(positions)
    kw = dict(config=ref.hf_config, inputs_embeds=x_ref, attention_mask=t_mask, past_key_values=None)
    ref_masks = {"full_attention": create_causal_mask(**kw), "sliding_attention": create_sliding_window_causal_mask(**kw)}
    ref_rope = GptOssRotaryEmbedding(ref.hf_config)(x_ref, t_pos)
    full, sliding = attention_masks(jnp.asarray(mask), config.sliding_window)
    cos, sin = rope_tables(jnp.asarray(positions), config, jdtype)
    jmask = jnp.asarray(mask)
    run = _jax_layer_fn()

    reports, failures = [], []
    for i in range(start, stop):
        if progress:
            progress(f"layer {i}")
        # Reference layer i on its own stream, with hooks for the attention residual and the router.
        layer = ref.layer(i)
        captured = {}
        hooks = [
            layer.self_attn.register_forward_hook(lambda m, a, out: captured.__setitem__("attn", out[0])),
            layer.mlp.router.register_forward_hook(lambda m, a, out: captured.__setitem__("topk", out[2])),
        ]
        with torch.no_grad():
            ref_out = layer(x_ref, attention_mask=ref_masks[config.layer_types[i]], position_embeddings=ref_rope,
                            position_ids=t_pos)
        for h in hooks:
            h.remove()
        ref_attn_residual = (x_ref + captured["attn"]).float().numpy()
        ref_topk = captured["topk"].numpy().reshape(*ids.shape, -1)
        del layer
        gc.collect()

        # Our layer i on both streams at once: [reference input; our input].
        abstract = _abstract_layer(config, i, jdtype, ours_source.packed)
        ours_layer = fill_model(abstract, ours_source.stream(f"layers/{i}/", abstract))
        graphdef, state = nnx.split(ours_layer)
        both = jnp.concatenate([jnp.asarray(x_ref.float().numpy()).astype(jdtype), x_ours])
        allowed = sliding if config.is_sliding[i] else full
        h, out, topk = run(graphdef, state, both, *(jnp.concatenate([a, a]) for a in (cos, sin, allowed, jmask)))
        b = ids.shape[0]
        ours_attn_residual, ours_tf, ours_own, ours_topk = h[:b], out[:b], out[b:], np.asarray(topk[:b])

        ref_np = ref_out.float().numpy()
        agree = np.sort(ours_topk, -1) == np.sort(ref_topk, -1)
        report = LayerReport(
            layer=i,
            attention_rel=rel_err(np.asarray(ours_attn_residual, np.float32)[real], ref_attn_residual[real]),
            residual_rel=rel_err(np.asarray(ours_tf, np.float32)[real], ref_np[real]),
            router_agreement=float(agree.all(-1)[real].mean()),
            drift_rel=rel_err(np.asarray(ours_own, np.float32)[real], ref_np[real]),
            residual_abs=abs_err(np.asarray(ours_tf, np.float32)[real], ref_np[real]),
            drift_abs=abs_err(np.asarray(ours_own, np.float32)[real], ref_np[real]),
        )
        failed = report.residual_rel > bounds.residual_rel or report.router_agreement < bounds.router_agreement
        if failed:
            if source_weights is not None:
                params = ours_source.params(f"layers/{i}/", abstract)
                src = source_weights.params(f"layers/{i}/", abstract)
                report.tensors = {
                    k: float(np.abs(params[k].astype(np.float64) - src[k].astype(np.float64)).max())
                    for k in params if params[k].dtype != np.uint8 or not np.array_equal(params[k], src[k])
                }
                report.tensors = {k: v for k, v in report.tensors.items() if v > 0}
            where = (", tensors differing from the source: " + ", ".join(
                f"layers/{i}/{k} (max abs diff {v:.3g})" for k, v in sorted(report.tensors.items(), key=lambda kv: -kv[1])
            )) if report.tensors else ""
            stage = "attention" if report.attention_rel > bounds.residual_rel else "MoE"
            failures.append(
                f"layer {i}: residual error {report.residual_rel:.3g} (bound {bounds.residual_rel:g}), router "
                f"agreement {report.router_agreement:.3f} (bound {bounds.router_agreement:g}); first off in the {stage}{where}"
            )
        reports.append(report)
        x_ref, x_ours = ref_out, ours_own
        del ours_layer, state, abstract  # the abstract module holds the filled arrays too
        gc.collect()

    logits_rel = logits_abs = top1 = kl = None
    if stop == n:
        logits_rel, logits_abs, top1, kl = _compare_logits(ours_source, ref, config, x_ours, x_ref, real, jdtype)
        if logits_rel > bounds.logits_rel:
            failures.append(f"logits: relative error {logits_rel:.3g} (bound {bounds.logits_rel:g})")
        if top1 < bounds.top1:
            failures.append(f"logits: top-1 agreement {top1:.3f} (bound {bounds.top1:g})")
        if kl > bounds.kl:
            failures.append(f"logits: mean KL {kl:.3g} (bound {bounds.kl:g})")
    return ParityReport(
        model=str(model), source=str(source) if source else None, dtype=dtype, n_prompts=int(ids.shape[0]),
        n_tokens=int(real.sum()), layers=reports, logits_rel=logits_rel, top1=top1, kl=kl, bounds=bounds,
        failures=failures, logits_abs=logits_abs,
    )


def _config_for(path: Path) -> GptOssConfig:
    location = locate_checkpoint(path)
    if location.layout == "flax":
        return open_flax_checkpoint(location.path).config
    return load_config(location.path)


class _Head(nnx.Module):
    """The final norm and lm_head, as `GptOssForCausalLM` holds them (same parameter paths)."""

    def __init__(self, config: GptOssConfig, dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
        self.lm_head = nnx.Param(jnp.zeros((config.hidden_size, config.vocab_size), dtype), axes=("embed", "vocab"))


class _Embed(nnx.Module):
    def __init__(self, config: GptOssConfig, dtype):
        self.embed_tokens = nnx.Param(jnp.zeros((config.vocab_size, config.hidden_size), dtype), axes=("vocab", "embed"))


def _embed_abstract(config, dtype):
    return nnx.eval_shape(lambda: _Embed(config, dtype))


LOGITS_CHUNK = 16384  # vocabulary entries per lm_head chunk: 16384 x 2880 float32 = 189 MB


class _FinalNorm(nnx.Module):
    def __init__(self, config: GptOssConfig, rngs: nnx.Rngs):
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)


def _compare_logits(ours_source, ref, config, x_ours, x_ref, real, jdtype, chunk: int | None = None):
    """Logits error, top-1 agreement and mean KL(ref || ours) over the real tokens. Both lm_heads are
    applied one vocabulary chunk at a time, so neither 2.3 GB float32 matrix is ever whole in memory
    (from an HF directory)."""
    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    norm_abstract = nnx.eval_shape(lambda: _FinalNorm(config, nnx.Rngs(0)))
    hidden_ours = fill_model(norm_abstract, ours_source.stream("", norm_abstract)).norm(x_ours)
    hidden_ours = hidden_ours[jnp.asarray(real)]  # [N, H], real tokens only
    norm = GptOssRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    with torch.no_grad():
        norm.weight.copy_(ref.tensor("model.norm.weight").float())
        hidden_ref = norm(x_ref).to(ref.torch_dtype)[torch.from_numpy(real)]
    lm_key = "lm_head.weight" if "lm_head.weight" in ref.keys else "model.embed_tokens.weight"
    head_abstract = nnx.eval_shape(lambda: _Head(config, jdtype, nnx.Rngs(0)))
    matmul = jax.jit(lambda h, w: jnp.einsum("ne,ev->nv", h, w, precision=_precision(jdtype)))
    chunk = chunk or LOGITS_CHUNK

    n, vocab = int(real.sum()), config.vocab_size
    ours = np.empty((n, vocab), np.float64)
    refl = np.empty((n, vocab), np.float64)
    for start, stop, w in ours_source.vocab_chunks("lm_head", head_abstract, chunk):
        ours[:, start:stop] = np.asarray(matmul(hidden_ours, jnp.asarray(w)), np.float64)
        del w
        w_ref = torch.from_numpy(np.ascontiguousarray(ref.reader.get_rows(lm_key, start, stop)).astype(np.float32))
        with torch.no_grad():
            refl[:, start:stop] = (hidden_ref @ w_ref.to(ref.torch_dtype).T).double().numpy()
        del w_ref
    logits_rel, logits_abs = rel_err(ours, refl), abs_err(ours, refl)
    top1 = float((ours.argmax(-1) == refl.argmax(-1)).mean())
    lp_ref = refl - np.logaddexp.reduce(refl, -1, keepdims=True)
    lp_ours = ours - np.logaddexp.reduce(ours, -1, keepdims=True)
    kl = float((np.exp(lp_ref) * (lp_ref - lp_ours)).sum(-1).mean())
    return logits_rel, logits_abs, top1, max(kl, 0.0)


# ------------------------------------------------------------------ reports

def write_report(report: ParityReport, out_dir: Path) -> None:
    from .data import write_json_atomically

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out_dir / "parity.json", report.to_dict())
    lines = [
        f"# Parity: {report.model}" + (f" (source {report.source})" if report.source else ""),
        "",
        f"dtype {report.dtype}; {report.n_prompts} prompts, {report.n_tokens} real tokens; "
        f"**{'PASSED' if report.passed else 'FAILED'}**",
        "",
        "Teacher-forced: both layers get the reference's input residual. Drift: each runs on its own stream.",
        "",
        "| layer | attention rel. err | residual rel. err | residual max abs err | router top-k agreement "
        "| drift rel. err | drift max abs err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.layers:
        lines.append(f"| {r.layer} | {r.attention_rel:.3g} | {r.residual_rel:.3g} | {r.residual_abs:.3g} | "
                     f"{r.router_agreement:.4f} | {r.drift_rel:.3g} | {r.drift_abs:.3g} |")
    if report.logits_rel is not None:
        lines += ["", f"Logits: relative error {report.logits_rel:.3g} (max abs {report.logits_abs:.3g}), top-1 agreement {report.top1:.4f}, "
                      f"mean KL(ref || ours) {report.kl:.3g} nats."]
    lines += ["", "Bounds: " + ", ".join(f"{k} {v:g}" for k, v in report.bounds.to_dict().items())]
    if report.failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report.failures]
    (out_dir / "parity.md").write_text("\n".join(lines) + "\n")
    _plot(report, out_dir / "parity.png")


def _plot(report: ParityReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r.layer for r in report.layers]
    fig, ax = plt.subplots(figsize=(7, 4))
    floor = 1e-12  # log axis: an exact zero shows at the floor
    ax.semilogy(layers, [max(r.residual_rel, floor) for r in report.layers], "o-", label="teacher-forced residual")
    ax.semilogy(layers, [max(r.drift_rel, floor) for r in report.layers], "s--", label="drift (own stream)")
    ax.axhline(report.bounds.residual_rel, color="red", lw=1, label="bound")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error")
    ax.set_title(f"parity vs transformers ({report.dtype})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
