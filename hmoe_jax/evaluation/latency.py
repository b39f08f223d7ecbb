"""Latency: one hybrid forward versus N-token greedy generation, JAX and transformers.

Same model, same backend, one prompt at a time (batch 1, as the reference timed), one warm-up run
excluded, medians over prompts, each prompt raw (as the reference timed) or in the checkpoint's chat
format (`prompt_format="chat"`: longer prompts; every generation still runs exactly N tokens, so both
sides do the same work):
- JAX generation: `model.generate`, N greedy tokens with the sliding-window KV cache;
- hybrid forward: the forward up to and including the hybrid layer (extraction, exact formulas,
  projection), the whole cost of a Hybrid MoE answer. The same loaded model is made hybrid after the
  generation timing, so one copy of the weights is ever resident;
- transformers: a full forward and `generate(max_new_tokens=N, do_sample=False)` on the same HF
  checkpoint, where it fits in memory (transformers decodes every MXFP4 expert to float32: ~84 GB for
  gpt-oss-20b); otherwise skipped, and the report says why.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from ..checkpoint.chat import ChatFormat
from ..checkpoint.loading import from_pretrained
from ..checkpoint.location import CheckpointError, locate_checkpoint, resolve_checkpoint
from ..checkpoint.tokenizer import load_tokenizer
from ..data.prompts import bucket_length, pad_token_id, prompt_batches, tokenize
from ..domains import Domain, load_domain, resolve_domain
from ..hybrid.artifacts import hybrid_layer_of, probe_run_identity
from ..hybrid.inference import make_hybrid_from_run
from ..hybrid.layer import HybridConfig, make_hybrid
from ..model.generate import generate
from ..model.transformer import default_position_ids
from ..runtime.files import save_figure, user_path, write_json_atomically, write_text_atomically
from ..runtime.options import RunOptions

PAPER_SPEEDUP_256 = 173.2857041583295  # shared/reference/single_latency.json, one B200
# The transformers reference holds every parameter decoded to float32, plus activations and the
# framework: it runs where that fits in this share of the machine's memory.
TORCH_MEMORY_SHARE = 0.7


def _timed(fn: Callable, runs) -> list[float]:
    fn()  # warm-up: compilation, caches
    times = []
    for args in runs:
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return times


def _physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def torch_reference_fits(config) -> tuple[bool, str]:
    """Whether the transformers reference (float32, experts decoded) fits in memory, and why not."""
    c = config
    attention = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    experts = c.num_local_experts * 3 * c.hidden_size * c.intermediate_size
    params = 2 * c.vocab_size * c.hidden_size + c.num_hidden_layers * (attention + experts)
    need, have = 4 * params, TORCH_MEMORY_SHARE * _physical_memory_bytes()
    if need <= have:
        return True, ""
    return False, (f"the transformers reference needs ~{need / 2**30:.0f} GiB (float32, experts decoded), more "
                   f"than {have / 2**30:.0f} GiB of this machine's memory: skipped")


def measure_latency(checkpoint: str | Path, *, probes: str | Path | None = None, layer: int | None = None,
                    n_prompts: int = 20, new_tokens: int = 256, torch_reference: bool = True,
                    options: RunOptions | None = None, prompt_format: str = "raw",
                    domain: str | Domain | None = None) -> dict[str, Any]:
    """Every timing (seconds per prompt) and the prompts' setup; see the module doc. The prompts are the
    domain's (its generator at the reference's eval seed, 43); with `probes`, the probe run's domain."""
    if prompt_format not in ("raw", "chat"):
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose raw or chat")
    checkpoint = resolve_checkpoint(checkpoint)
    domain = (resolve_domain(domain, probe_run_identity(probes).get("domain"), f"probe run {probes}")
              if probes is not None else load_domain(domain))
    chat = ChatFormat.of(checkpoint) if prompt_format == "chat" else None
    prompts = [r["input_prompt"] for r in domain.generate(n_prompts, 43)]
    tokenizer = load_tokenizer(checkpoint)
    model = from_pretrained(checkpoint, options)
    c = model.config
    ids = tokenize(tokenizer, prompts, c.vocab_size, chat=chat)
    # Every prompt left-padded to one bucketed length: one compiled program for all of them.
    length = bucket_length(max(t.size for t in ids), 32)
    runs = [(b.input_ids, b.attention_mask) for b in prompt_batches(ids, 1, length, pad_token_id(c))]
    res: dict[str, Any] = {"n_prompts": len(runs), "new_tokens": new_tokens, "device": jax.devices()[0].platform,
                           "prompt_format": prompt_format, "prompt_tokens": length,
                           "options": model.options.to_dict()}

    res["jax_generate_s"] = _timed(
        lambda ids=runs[0][0], mask=runs[0][1]: jax.block_until_ready(generate(model, ids, mask,
                                                                                max_new_tokens=new_tokens)), runs)
    if probes is not None:
        layer = hybrid_layer_of(make_hybrid_from_run(model, probes))
    else:
        layer = layer if layer is not None else c.num_hidden_layers // 2
        make_hybrid(model, HybridConfig(layers=(layer,)))
    res["layer"] = layer

    def hybrid_forward(ids=runs[0][0], mask=runs[0][1]):
        out = model(ids, attention_mask=mask, position_ids=default_position_ids(mask), output_layer_info=True,
                    stop_after_layer=layer + 1)
        jax.block_until_ready(out.hidden_states[-1])

    res["jax_hybrid_forward_s"] = _timed(hybrid_forward, runs)
    if torch_reference:
        fits, why = torch_reference_fits(c)
        if fits:
            res.update(_torch_latency(checkpoint, runs, new_tokens, pad_token_id(c)))
        else:
            res["torch_skipped"] = why
    return _summarise(res)


def _torch_latency(checkpoint: Path, runs, new_tokens: int, pad: int) -> dict[str, list[float]]:
    import torch

    from ..checkpoint.synthetic import load_torch_reference

    if locate_checkpoint(checkpoint).layout != "hf":
        raise CheckpointError(f"{checkpoint}: the transformers side needs an HF checkpoint (or pass --no-torch)")
    ref = load_torch_reference(checkpoint)

    def torch_forward(ids=runs[0][0], mask=runs[0][1]):
        with torch.no_grad():
            ref(torch.from_numpy(np.asarray(ids, np.int64)),
                attention_mask=torch.from_numpy(np.asarray(mask, np.int64)))

    def torch_generate(ids=runs[0][0], mask=runs[0][1]):
        with torch.no_grad():
            ref.generate(torch.from_numpy(np.asarray(ids, np.int64)),
                         attention_mask=torch.from_numpy(np.asarray(mask, np.int64)), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    return {"torch_forward_s": _timed(torch_forward, runs), "torch_generate_s": _timed(torch_generate, runs)}


def _summarise(res: dict[str, Any]) -> dict[str, Any]:
    n = res["new_tokens"]
    med = {k[:-2]: statistics.median(v) * 1000 for k, v in res.items() if k.endswith("_s")}
    res["median_ms"] = med
    res["jax_generate_tokens_per_s"] = n / (med["jax_generate"] / 1000)
    res["hybrid_vs_generation_speedup"] = med["jax_generate"] / med["jax_hybrid_forward"]
    if "torch_generate" in med:
        res["torch_generate_tokens_per_s"] = n / (med["torch_generate"] / 1000)
        res["jax_vs_torch_generation"] = med["torch_generate"] / med["jax_generate"]
    return res


def report_markdown(res: dict[str, Any]) -> str:
    n, med = res["new_tokens"], res["median_ms"]
    lines = [f"# Latency ({res['n_prompts']} prompts, batch 1, {n} new tokens, {res['device']}; medians after one "
             "warm-up)", "", f"Prompts: {res.get('prompt_format', 'raw')}, left-padded to "
             f"{res.get('prompt_tokens', '?')} tokens.", "", "| what | median ms |", "|---|---:|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.1f} |" for k, v in med.items()]
    lines += ["", f"Hybrid forward vs {n}-token generation (JAX): **{res['hybrid_vs_generation_speedup']:.0f}x** "
                  f"faster (the paper: {PAPER_SPEEDUP_256:.0f}x for 256 tokens on a B200, full forward vs generate).",
              f"JAX generation: {res['jax_generate_tokens_per_s']:.1f} tokens/s."]
    if "torch_generate" in med:
        lines.append(f"transformers generate: {res['torch_generate_tokens_per_s']:.1f} tokens/s; JAX is "
                     f"**{res['jax_vs_torch_generation']:.2f}x** its throughput (target >= 2x).")
    elif "torch_skipped" in res:
        lines.append(f"transformers: {res['torch_skipped']}.")
    return "\n".join(lines) + "\n"


def write_report(res: dict[str, Any], out: str | Path) -> Path:
    """latency.json, latency.md and latency.png in `out`."""
    out = user_path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "latency.json", res)
    write_text_atomically(out / "latency.md", report_markdown(res))
    _plot(res["median_ms"], out / "latency.png")
    return out


def _plot(med: dict[str, float], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend is chosen

    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    names = list(med)
    ax.barh(names, [med[k] for k in names], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("median ms (log)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
