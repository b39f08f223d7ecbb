"""OpenAI's `original/` checkpoint layout, written by hand from the spec for the tests that read it."""

import json

import torch
from safetensors.torch import load_file, save_file


def write_original_layout(hf_dir, out_dir):
    """OpenAI's `original/` layout of an HF MXFP4 checkpoint, written here by hand from the spec
    (independently of the converter's key table): fused qkv rows q|k|v, mlp1 = gate_up and mlp2 = down
    with the same MXFP4 bytes, `norm.scale`, `embedding`/`unembedding`, OpenAI's config keys."""
    hf = load_file(str(hf_dir / "model.safetensors"))
    cfg = json.loads((hf_dir / "config.json").read_text())
    out = {"embedding.weight": hf.pop("model.embed_tokens.weight"), "norm.scale": hf.pop("model.norm.weight"),
           "unembedding.weight": hf.pop("lm_head.weight")}
    for i in range(cfg["num_hidden_layers"]):
        h, b = f"model.layers.{i}.", f"block.{i}."
        attn = {k: hf.pop(h + f"self_attn.{k}") for k in
                ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias",
                 "o_proj.weight", "o_proj.bias", "sinks")}
        out[b + "attn.norm.scale"] = hf.pop(h + "input_layernorm.weight")
        out[b + "attn.qkv.weight"] = torch.cat([attn["q_proj.weight"], attn["k_proj.weight"], attn["v_proj.weight"]])
        out[b + "attn.qkv.bias"] = torch.cat([attn["q_proj.bias"], attn["k_proj.bias"], attn["v_proj.bias"]])
        out[b + "attn.out.weight"], out[b + "attn.out.bias"] = attn["o_proj.weight"], attn["o_proj.bias"]
        out[b + "attn.sinks"] = attn["sinks"]
        out[b + "mlp.norm.scale"] = hf.pop(h + "post_attention_layernorm.weight")
        out[b + "mlp.gate.weight"] = hf.pop(h + "mlp.router.weight")
        out[b + "mlp.gate.bias"] = hf.pop(h + "mlp.router.bias")
        for ours, theirs in (("gate_up_proj", "mlp1"), ("down_proj", "mlp2")):
            out[b + f"mlp.{theirs}_weight.blocks"] = hf.pop(h + f"mlp.experts.{ours}_blocks")
            out[b + f"mlp.{theirs}_weight.scales"] = hf.pop(h + f"mlp.experts.{ours}_scales")
            out[b + f"mlp.{theirs}_bias"] = hf.pop(h + f"mlp.experts.{ours}_bias")
    assert not hf, f"unmapped HF tensors {sorted(hf)}"
    rope = cfg["rope_parameters"]
    original_cfg = {
        "num_hidden_layers": cfg["num_hidden_layers"], "num_experts": cfg["num_local_experts"],
        "experts_per_token": cfg["num_experts_per_tok"], "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
        "swiglu_limit": cfg["swiglu_limit"], "head_dim": cfg["head_dim"],
        "num_attention_heads": cfg["num_attention_heads"], "num_key_value_heads": cfg["num_key_value_heads"],
        "sliding_window": cfg["sliding_window"], "initial_context_length": rope["original_max_position_embeddings"],
        "rope_theta": rope["rope_theta"], "rope_scaling_factor": rope["factor"],
        "rope_ntk_alpha": rope["beta_slow"], "rope_ntk_beta": rope["beta_fast"],
    }
    out_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(original_cfg))
    return out_dir
