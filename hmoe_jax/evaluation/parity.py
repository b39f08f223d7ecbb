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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..checkpoint.flax_format import open_flax_checkpoint
from ..checkpoint.layout_reading import SafetensorsReader, safetensors_files
from ..checkpoint.loading import fill_model
from ..checkpoint.location import CheckpointError, locate_checkpoint, resolve_checkpoint
from ..checkpoint.tokenizer import load_tokenizer
from ..checkpoint.weight_source import WeightSource
from ..model.config import GptOssConfig, load_config
from ..model.layers import BlockContext, RMSNorm, attention_masks
from ..model.rope import rope_tables
from ..model.transformer import (
    UNEMBED_CHUNK,
    DecoderLayer,
    EmbeddingAndHead,
    GptOssForCausalLM,
    embed_tokens,
    parameter_bytes,
    unembed,
)
from ..runtime.files import save_figure, user_path, write_json_atomically, write_text_atomically
from ..runtime.options import RunOptions


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


def _storage_options(dtype: str, packed: bool, kernels: str = "auto", config: GptOssConfig | None = None
                     ) -> RunOptions:
    """Our layers as parity runs them: weights stored in the compute dtype, one program per layer, the
    kernel path asked for ("auto": what the whole model of `config` would take: the Pallas kernels where
    they compile on a GPU, the C++ kernel for a large model on a CPU)."""
    options = RunOptions(dtype=dtype, param_dtype=dtype, experts="packed" if packed else "dense", kernels=kernels,
                         execution="program")
    size = 0 if config is None else parameter_bytes(nnx.eval_shape(
        lambda: GptOssForCausalLM(config, options.replace(kernels="xla"), rngs=nnx.Rngs(0))))
    return options.resolved(param_bytes=size)


def _abstract_layer(config: GptOssConfig, i: int, options: RunOptions) -> DecoderLayer:
    return nnx.eval_shape(lambda: DecoderLayer(config, i, options, rngs=nnx.Rngs(0)))


# ------------------------------------------------------------------ the transformers side

class Reference:
    """transformers modules built one at a time from an HF directory's tensors."""

    def __init__(self, path: Path, dtype: str):
        import torch
        from transformers import GptOssConfig as HFConfig

        location = locate_checkpoint(path)
        if location.layout != "hf":
            raise CheckpointError(
                f"{location.path}: the transformers reference needs an HF checkpoint directory (got "
                f"{location.layout}); "
                "pass the HF source with --source"
            )
        raw = json.loads((location.path / "config.json").read_text())
        raw.pop("quantization_config", None)
        skip = ("model_type", "architectures", "transformers_version")
        self.hf_config = HFConfig(**{k: v for k, v in raw.items() if k not in skip})
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

    def from_ours(self, x):
        """A stream of ours as the reference's input (a torch tensor in its dtype)."""
        import torch

        return torch.from_numpy(np.array(x, np.float32)).to(self.torch_dtype)

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        return x.float().numpy()

    def run_layer(self, i: int, x, mask, rope, positions):
        """Layer i on the reference's own stream: (output, attention residual as numpy, top-k experts as
        numpy [B, T, k]), through hooks on its attention and router. The layer is freed afterwards."""
        import torch

        layer = self.layer(i)
        captured = {}
        hooks = [
            layer.self_attn.register_forward_hook(lambda m, a, out: captured.__setitem__("attn", out[0])),
            layer.mlp.router.register_forward_hook(lambda m, a, out: captured.__setitem__("topk", out[2])),
        ]
        with torch.no_grad():
            out = layer(x, attention_mask=mask, position_embeddings=rope, position_ids=positions)
        for h in hooks:
            h.remove()
        attention_residual = self.to_numpy(x + captured["attn"])
        topk = captured["topk"].numpy().reshape(*x.shape[:2], -1)
        del layer
        gc.collect()
        return out, attention_residual, topk


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
    kernels: str = "xla"  # our layers' kernel path (RunOptions.kernels, resolved)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d


@jax.jit
def _run_layer(graphdef, state, x, ctx: BlockContext):
    """Our decoder block: (its attention residual, its output, its router's top-k experts)."""
    layer = nnx.merge(graphdef, state)
    h, _ = layer.attention_residual(x, ctx)
    out, info = layer.moe_residual(h, x, ctx)
    return h, out, info["expert_indices"]


@dataclasses.dataclass
class _Setup:
    """Both implementations' weights and everything both streams share."""

    ours: WeightSource
    source: WeightSource | None  # the HF source of a converted checkpoint, to name corrupted tensors
    ref: Reference
    options: RunOptions
    real: np.ndarray  # [B, T] real tokens
    ctx: BlockContext  # our layers' context for [reference stream; our stream]
    ref_masks: dict[str, Any]
    ref_rope: Any
    ref_positions: Any


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
    kernels: str = "auto",
) -> ParityReport:
    """Compare layers [a, b) (all by default) of `model` (HF dir or converted checkpoint) with
    transformers on `source` (default: `model` itself, which must then be an HF dir); our layers run on
    the `kernels` path (`RunOptions.kernels`)."""
    bounds = bounds or DEFAULT_BOUNDS[dtype]
    model, source = resolve_checkpoint(model), resolve_checkpoint(source) if source is not None else None
    ours = WeightSource(model, config_of(model), jnp.dtype(dtype))
    config = ours.config
    start, stop = layers or (0, config.num_hidden_layers)
    if not 0 <= start < stop <= config.num_hidden_layers:
        raise ValueError(f"layers {start}:{stop} outside the model's 0:{config.num_hidden_layers}")
    ids, mask = np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64)
    x_ours = _embeddings(ours, ids, jnp.dtype(dtype))
    setup = _setup(ours, source, dtype, x_ours, mask, kernels)
    x_ref = setup.ref.from_ours(x_ours)
    reports, failures = [], []
    for i in range(start, stop):
        if progress:
            progress(f"layer {i}")
        report, abstract, x_ref, x_ours = _compare_layer(setup, i, x_ref, x_ours)
        reports.append(report)
        failures += _layer_failures(setup, report, abstract, bounds)
    logits = _compare_logits(ours, setup.ref, config, x_ours, x_ref, setup.real, jnp.dtype(dtype)) \
        if stop == config.num_hidden_layers else None
    failures += _logit_failures(logits, bounds)
    logits_rel, logits_abs, top1, kl = logits or (None,) * 4
    return ParityReport(
        model=str(model), source=str(source) if source else None, dtype=dtype, n_prompts=int(ids.shape[0]),
        n_tokens=int(setup.real.sum()), layers=reports, logits_rel=logits_rel, top1=top1, kl=kl, bounds=bounds,
        failures=failures, logits_abs=logits_abs, kernels=setup.options.kernels,
    )


def _embeddings(ours: WeightSource, ids: np.ndarray, dtype) -> jax.Array:
    """The prompts' embeddings from our weights, reading only the rows of the tokens they use: the same
    gather both implementations do, so both streams start from these."""
    used, inverse = np.unique(ids, return_inverse=True)
    abstract = nnx.eval_shape(lambda: EmbeddingAndHead(ours.config, _storage_options(dtype.name, False),
                                                       rngs=nnx.Rngs(0)))
    rows = ours.vocab_rows("embed_tokens", used, abstract)
    return embed_tokens(jnp.asarray(rows), jnp.asarray(inverse.reshape(ids.shape)), dtype)


def _setup(ours: WeightSource, source: Path | None, dtype: str, x_ours, mask: np.ndarray, kernels: str) -> _Setup:
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    config = ours.config
    ref = Reference(source or ours.location.path, dtype)
    paired = source is not None and ours.location.layout == "flax"
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    # The reference's masks and rotary exactly as GptOssModel.forward builds them.
    t_mask, t_pos = torch.from_numpy(mask), torch.from_numpy(positions)
    x_ref = ref.from_ours(x_ours)
    kw = dict(config=ref.hf_config, inputs_embeds=x_ref, attention_mask=t_mask, past_key_values=None)
    ref_masks = {"full_attention": create_causal_mask(**kw),
                 "sliding_attention": create_sliding_window_causal_mask(**kw)}
    # Ours: both streams at once, [reference stream; our stream] along the batch.
    both = np.concatenate([mask, mask])
    full, sliding = attention_masks(jnp.asarray(both), config.sliding_window)
    cos, sin = rope_tables(jnp.asarray(np.concatenate([positions, positions])), config, jnp.dtype(dtype))
    return _Setup(ours=ours, source=WeightSource(source, config, jnp.dtype(dtype)) if paired else None, ref=ref,
                  options=_storage_options(dtype, ours.packed, kernels, config), real=mask.astype(bool),
                  ctx=BlockContext(cos, sin, jnp.asarray(both), full, sliding), ref_masks=ref_masks,
                  ref_rope=GptOssRotaryEmbedding(ref.hf_config)(x_ref, t_pos), ref_positions=t_pos)


def _compare_layer(setup: _Setup, i: int, x_ref, x_ours) -> tuple[LayerReport, DecoderLayer, Any, jax.Array]:
    """Layer i of both implementations: the reference on its own stream, ours teacher-forced (on the
    reference's stream) and on its own. Returns the report, our layer's abstract module (its parameter
    paths) and both streams after the layer."""
    ref_mask = setup.ref_masks[setup.ours.config.layer_types[i]]
    ref_out, ref_attn_residual, ref_topk = setup.ref.run_layer(i, x_ref, ref_mask, setup.ref_rope, setup.ref_positions)
    abstract = _abstract_layer(setup.ours.config, i, setup.options)
    ours_layer = fill_model(abstract, setup.ours.stream(f"layers/{i}/", abstract))
    both = jnp.concatenate([jnp.asarray(setup.ref.to_numpy(x_ref)).astype(x_ours.dtype), x_ours])
    h, out, topk = _run_layer(*nnx.split(ours_layer), both, setup.ctx)
    b, real = x_ours.shape[0], setup.real
    ref_np = setup.ref.to_numpy(ref_out)
    f32 = lambda a: np.asarray(a, np.float32)[real]  # noqa: E731
    agree = np.sort(np.asarray(topk[:b]), -1) == np.sort(ref_topk, -1)
    report = LayerReport(
        layer=i,
        attention_rel=rel_err(f32(h[:b]), ref_attn_residual[real]),
        residual_rel=rel_err(f32(out[:b]), ref_np[real]),
        router_agreement=float(agree.all(-1)[real].mean()),
        drift_rel=rel_err(f32(out[b:]), ref_np[real]),
        residual_abs=abs_err(f32(out[:b]), ref_np[real]),
        drift_abs=abs_err(f32(out[b:]), ref_np[real]),
    )
    del ours_layer
    gc.collect()
    return report, abstract, ref_out, out[b:]


def _layer_failures(setup: _Setup, report: LayerReport, abstract: DecoderLayer, bounds: Bounds) -> list[str]:
    """The layer's failure, if it is past a bound, naming the first stage off and (for a converted
    checkpoint paired with its source) every tensor that differs from the source."""
    i = report.layer
    if report.residual_rel <= bounds.residual_rel and report.router_agreement >= bounds.router_agreement:
        return []
    if setup.source is not None:
        params = setup.ours.params(f"layers/{i}/", abstract)
        src = setup.source.params(f"layers/{i}/", abstract)
        diffs = {k: float(np.abs(params[k].astype(np.float64) - src[k].astype(np.float64)).max())
                 for k in params if params[k].dtype != np.uint8 or not np.array_equal(params[k], src[k])}
        report.tensors = {k: v for k, v in diffs.items() if v > 0}
    where = (", tensors differing from the source: " + ", ".join(
        f"layers/{i}/{k} (max abs diff {v:.3g})" for k, v in sorted(report.tensors.items(), key=lambda kv: -kv[1])
    )) if report.tensors else ""
    stage = "attention" if report.attention_rel > bounds.residual_rel else "MoE"
    return [f"layer {i}: residual error {report.residual_rel:.3g} (bound {bounds.residual_rel:g}), router "
            f"agreement {report.router_agreement:.3f} (bound {bounds.router_agreement:g}); first off in the "
            f"{stage}{where}"]


def _logit_failures(logits, bounds: Bounds) -> list[str]:
    if logits is None:
        return []
    logits_rel, _, top1, kl = logits
    failures = []
    if logits_rel > bounds.logits_rel:
        failures.append(f"logits: relative error {logits_rel:.3g} (bound {bounds.logits_rel:g})")
    if top1 < bounds.top1:
        failures.append(f"logits: top-1 agreement {top1:.3f} (bound {bounds.top1:g})")
    if kl > bounds.kl:
        failures.append(f"logits: mean KL {kl:.3g} (bound {bounds.kl:g})")
    return failures


def config_of(path: str | Path) -> GptOssConfig:
    location = locate_checkpoint(path)
    if location.layout == "flax":
        return open_flax_checkpoint(location.path).config
    return load_config(location.path)


def _compare_logits(ours_source, ref, config, x_ours, x_ref, real, jdtype, chunk: int | None = None):
    """Logits error, top-1 agreement and mean KL(ref || ours) over the real tokens. Both lm_heads are
    applied one vocabulary chunk at a time, so neither 2.3 GB float32 matrix is ever whole in memory
    (from an HF directory)."""
    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    # Our head: the model's final RMSNorm and `unembed`, on the lm_head one vocabulary chunk at a time.
    norm_abstract = nnx.eval_shape(lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=nnx.Rngs(0)))
    hidden_ours = fill_model(norm_abstract, ours_source.stream("norm/", norm_abstract))(x_ours)
    hidden_ours = hidden_ours[jnp.asarray(real)]  # [N, H], real tokens only
    norm = GptOssRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    with torch.no_grad():
        norm.weight.copy_(ref.tensor("model.norm.weight").float())
        hidden_ref = norm(x_ref).to(ref.torch_dtype)[torch.from_numpy(real)]
    lm_key = "lm_head.weight" if "lm_head.weight" in ref.keys else "model.embed_tokens.weight"
    head_abstract = nnx.eval_shape(lambda: EmbeddingAndHead(config, _storage_options(jdtype.name, False),
                                                            rngs=nnx.Rngs(0)))
    logits = jax.jit(unembed, static_argnums=2)
    chunk = chunk or UNEMBED_CHUNK

    n, vocab = int(real.sum()), config.vocab_size
    ours = np.empty((n, vocab), np.float64)
    refl = np.empty((n, vocab), np.float64)
    for start, stop, w in ours_source.vocab_chunks("lm_head", head_abstract, chunk):
        ours[:, start:stop] = np.asarray(logits(hidden_ours, jnp.asarray(w), jdtype), np.float64)
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


def prompt_inputs(prompts: Sequence[str], checkpoints: Sequence[str | Path], vocab_size: int, seed: int,
                  warn: Callable[[str], None] = lambda msg: None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and mask from the first of `checkpoints` with a tokenizer; without one, random
    ids of the prompts' character lengths (the weights are checked either way), and a warning."""
    for checkpoint in checkpoints:
        try:
            tokenizer = load_tokenizer(checkpoint)
        except CheckpointError:
            continue
        seqs = [tokenizer.encode(p).ids for p in prompts]
        break
    else:
        rng = np.random.default_rng(seed)
        seqs = [list(rng.integers(0, vocab_size, max(1, min(len(p), 64)))) for p in prompts]
        warn("no tokenizer.json beside the checkpoint: using random token ids")
    t = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), t), np.int64)
    mask = np.zeros((len(seqs), t), np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


# ------------------------------------------------------------------ reports

def write_report(report: ParityReport, out_dir: str | Path) -> None:
    out_dir = user_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out_dir / "parity.json", report.to_dict())
    lines = [
        f"# Parity: {report.model}" + (f" (source {report.source})" if report.source else ""),
        "",
        f"dtype {report.dtype}, kernels {report.kernels}; {report.n_prompts} prompts, {report.n_tokens} real tokens; "
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
        lines += ["", f"Logits: relative error {report.logits_rel:.3g} (max abs {report.logits_abs:.3g}), "
                      f"top-1 agreement {report.top1:.4f}, "
                      f"mean KL(ref || ours) {report.kl:.3g} nats."]
    lines += ["", "Bounds: " + ", ".join(f"{k} {v:g}" for k, v in report.bounds.to_dict().items())]
    if report.failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report.failures]
    write_text_atomically(out_dir / "parity.md", "\n".join(lines) + "\n")
    _plot(report, out_dir / "parity.png")


def _plot(report: ParityReport, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend is chosen

    layers = [r.layer for r in report.layers]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    floor = 1e-12  # log axis: an exact zero shows at the floor
    ax.semilogy(layers, [max(r.residual_rel, floor) for r in report.layers], "o-", label="teacher-forced residual")
    ax.semilogy(layers, [max(r.drift_rel, floor) for r in report.layers], "s--", label="drift (own stream)")
    ax.axhline(report.bounds.residual_rel, color="red", lw=1, label="bound")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error")
    ax.set_title(f"parity vs transformers ({report.dtype})")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
