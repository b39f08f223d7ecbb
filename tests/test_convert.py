"""`python -m convert` and the Flax checkpoint format, against `transformers` 5.23 on the same weights.

Fixtures are tiny random gpt-oss checkpoints written by `transformers` itself (`hmoe_jax.checkpoint.synthetic`),
built once per module. Logit errors are relative: max |ours - ref| / max |ref|. The issue's fp32 parity
bound is 1e-4; conversion is exact, so the model's own ~5e-7 shows through and we hold it to 1e-5.
"""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from comparisons import rel_err
from original_layout import write_original_layout
from safetensors.torch import load_file, save_file

import hmoe_jax
from convert.__main__ import main as convert_main
from hmoe_jax.checkpoint import synthetic
from hmoe_jax.checkpoint.convert import convert_checkpoint, export_hf
from hmoe_jax.checkpoint.flax_format import open_flax_checkpoint
from hmoe_jax.checkpoint.layouts import hf_tensor_shapes
from hmoe_jax.checkpoint.location import CheckpointError
from hmoe_jax.hybrid.artifacts import convert_any, convert_probe, load_probe
from hmoe_jax.hybrid.probe import probe_apply
from hmoe_jax.model.config import GptOssConfig

FP32_REL = 1e-5
IDS = np.random.default_rng(0).integers(0, 128, (2, 24))  # 3 sliding windows of the tiny config


def torch_logits(path) -> np.ndarray:
    with torch.no_grad():
        return synthetic.load_torch_reference(path)(torch.from_numpy(IDS)).logits.float().numpy()


def jax_logits(model) -> np.ndarray:
    return np.asarray(model(IDS).logits)


def assert_no_output(dst):
    """Neither DST nor a temporary sibling survives a failed conversion."""
    assert not dst.exists()
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


# ------------------------------------------------------------------ fixtures (built once)

@pytest.fixture(scope="module")
def hf_mxfp4(tmp_path_factory):
    return synthetic.write_hf_checkpoint(tmp_path_factory.mktemp("hf_mxfp4"), synthetic.tiny_config(), experts="mxfp4",
                                         seed=3)


@pytest.fixture(scope="module")
def hf_mxfp4_logits(hf_mxfp4):
    return torch_logits(hf_mxfp4)


@pytest.fixture(scope="module")
def flax_dense(hf_mxfp4, tmp_path_factory):
    dst = tmp_path_factory.mktemp("flax") / "dense"
    convert_checkpoint(hf_mxfp4, dst, group_bytes=64 << 10)  # small groups: many orbax partial saves
    return dst


@pytest.fixture(scope="module")
def flax_packed(hf_mxfp4, tmp_path_factory):
    dst = tmp_path_factory.mktemp("flax") / "packed"
    convert_checkpoint(hf_mxfp4, dst, keep_mxfp4=True)
    return dst


@pytest.fixture(scope="module")
def dense_logits(flax_dense):
    return jax_logits(hmoe_jax.from_pretrained(flax_dense))


def rewrite_tensors(src, dst, edit):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------ parity after conversion

def test_hf_mxfp4_converts_to_logits_matching_transformers(flax_dense, dense_logits, hf_mxfp4_logits):
    checkpoint = open_flax_checkpoint(flax_dense)
    # MXFP4 decodes exactly into bfloat16 and the rest of this fixture is float32: lossless keeps float32.
    assert checkpoint.meta["param_dtype"] == "float32" and not checkpoint.packed_experts
    # Stored in the model's layout, [E, out, in], as the MXFP4 source holds them.
    c = checkpoint.config
    e, h, i = c.num_local_experts, c.hidden_size, c.intermediate_size
    assert checkpoint.shapes["layers/0/mlp/experts/gate_up_proj"][0] == (e, 2 * i, h)
    assert checkpoint.shapes["layers/0/mlp/experts/down_proj"][0] == (e, h, i)
    assert rel_err(dense_logits, hf_mxfp4_logits) < FP32_REL


def test_hf_plain_bf16_experts_convert_losslessly_to_bfloat16(tmp_path):
    src = synthetic.write_hf_checkpoint(tmp_path / "hf", synthetic.tiny_config(), experts="bf16", dtype="bfloat16",
                                        seed=5)
    convert_checkpoint(src, tmp_path / "flax")
    checkpoint = open_flax_checkpoint(tmp_path / "flax")
    assert checkpoint.meta["param_dtype"] == "bfloat16"  # every source tensor is bf16: nothing lost
    assert checkpoint.shapes["layers/0/mlp/experts/gate_up_proj"][1] == jnp.bfloat16
    c = checkpoint.config  # HF's [E, in, out] transposed into the model's [E, out, in]
    assert checkpoint.shapes["layers/0/mlp/experts/gate_up_proj"][0] == (c.num_local_experts, 2 * c.intermediate_size,
                                                                         c.hidden_size)
    # fp32 compute on both sides, on the same bf16 weights.
    ours = jax_logits(hmoe_jax.from_pretrained(tmp_path / "flax", dtype=jnp.float32))
    assert rel_err(ours, torch_logits(src)) < FP32_REL
    # And back: the very same tensors, experts transposed back to [E, in, out].
    export_hf(tmp_path / "flax", tmp_path / "back")
    source, back = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(source) == sorted(back)
    for key in source:
        assert source[key].dtype == back[key].dtype and torch.equal(source[key], back[key]), key


def test_openai_original_layout_converts_to_the_same_model(hf_mxfp4, hf_mxfp4_logits, dense_logits, tmp_path):
    repo = tmp_path / "repo"
    write_original_layout(hf_mxfp4, repo / "original")
    # A parent holding only original/ (a download of `original/*`) is read from original/.
    summary = convert_checkpoint(repo, tmp_path / "flax")
    assert summary.source_layout == "original"
    ours = jax_logits(hmoe_jax.from_pretrained(tmp_path / "flax"))
    assert rel_err(ours, hf_mxfp4_logits) < FP32_REL
    np.testing.assert_array_equal(ours, dense_logits)  # the same numbers as from the HF layout
    # The original/ directory itself loads directly too, also with its experts kept packed.
    np.testing.assert_array_equal(jax_logits(hmoe_jax.from_pretrained(repo / "original")), dense_logits)
    convert_checkpoint(repo / "original", tmp_path / "packed", keep_mxfp4=True)
    np.testing.assert_array_equal(jax_logits(hmoe_jax.from_pretrained(tmp_path / "packed")), dense_logits)


def test_keep_mxfp4_gives_identical_outputs_with_a_third_of_the_expert_memory(flax_packed, hf_mxfp4, dense_logits):
    packed = hmoe_jax.from_pretrained(flax_packed)
    np.testing.assert_array_equal(jax_logits(packed), dense_logits)  # bit-identical decode in the forward
    # From the HF directory directly, without converting.
    np.testing.assert_array_equal(jax_logits(hmoe_jax.from_pretrained(hf_mxfp4, experts="packed")), dense_logits)
    experts = packed.layers[0].mlp.experts
    packed_bytes = sum(getattr(experts, n)[...].nbytes for n in
                       ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"))
    c = packed.config
    bf16_bytes = 2 * c.num_local_experts * 3 * c.hidden_size * c.intermediate_size
    assert packed_bytes / bf16_bytes < 0.27  # 4.25 bits per value against 16


def test_converted_checkpoint_loads_sharded_onto_a_mesh(flax_packed, dense_logits):
    mesh = hmoe_jax.make_mesh(data=1, expert=4, tensor=2)
    model = hmoe_jax.from_pretrained(flax_packed, mesh=mesh)
    blocks = model.layers[0].mlp.experts.gate_up_proj_blocks[...]
    assert blocks.sharding.spec[:2] == ("expert", "tensor")
    assert len(blocks.addressable_shards) == 8
    assert rel_err(jax_logits(model), dense_logits) < 1e-6


def test_packed_checkpoint_refuses_a_dense_request(flax_packed):
    with pytest.raises(CheckpointError, match="packed MXFP4 experts but experts='dense'"):
        hmoe_jax.from_pretrained(flax_packed, experts="dense")


def _with_format_version(src, dst, version):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    meta["format_version"] = version
    (dst / "config.json").write_text(json.dumps(meta))
    return dst


def test_older_converted_checkpoint_with_dense_experts_asks_to_reconvert(flax_dense, flax_packed, hf_mxfp4,
                                                                          dense_logits, tmp_path):
    """Format 1 stored dense experts [E, in, out]; reading it as today's [E, out, in] would be wrong
    (and for square experts not even a shape error), so it is refused with the command that redoes it."""
    old = _with_format_version(flax_dense, tmp_path / "old", 1)
    match = (r"old/config\.json: written by an older hmoe_jax\.convert \(format_version 1\).*\[E, in, out\].*"
             rf"Re-convert .*python -m convert {hf_mxfp4}")
    with pytest.raises(CheckpointError, match=match):
        hmoe_jax.from_pretrained(old)
    with pytest.raises(CheckpointError, match=match):
        export_hf(old, tmp_path / "hf")
    assert_no_output(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"format_version 3, this code reads 2: re-convert"):
        hmoe_jax.from_pretrained(_with_format_version(flax_dense, tmp_path / "newer", 3))
    # Packed MXFP4 experts are the same bytes in both versions: still read.
    old_packed = _with_format_version(flax_packed, tmp_path / "old_packed", 1)
    np.testing.assert_array_equal(jax_logits(hmoe_jax.from_pretrained(old_packed)), dense_logits)


def test_dtype_option_stores_bfloat16(hf_mxfp4, tmp_path):
    convert_checkpoint(hf_mxfp4, tmp_path / "bf16", dtype="bfloat16")
    checkpoint = open_flax_checkpoint(tmp_path / "bf16")
    assert checkpoint.shapes["embed_tokens"][1] == jnp.bfloat16
    assert checkpoint.shapes["norm/weight"][1] == jnp.float32  # norms stay float32, as in the model


# ------------------------------------------------------------------ export back to HF

def test_round_trip_to_hf_plain_experts_reproduces_the_logits(flax_dense, hf_mxfp4_logits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative destination (orbax wants absolute paths: the library resolves them)
    assert convert_main(["--to", "hf", str(flax_dense), "hf"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    np.testing.assert_array_equal(torch_logits(tmp_path / "hf"), hf_mxfp4_logits)


def test_round_trip_to_hf_mxfp4_repacks_exactly(flax_dense, flax_packed, hf_mxfp4, hf_mxfp4_logits, tmp_path):
    export_hf(flax_dense, tmp_path / "repacked", mxfp4=True, max_shard_bytes=100_000)  # dense -> MXFP4, 3 shards
    assert len(json.loads((tmp_path / "repacked" / "model.safetensors.index.json").read_text())["weight_map"]) == 41
    np.testing.assert_array_equal(torch_logits(tmp_path / "repacked"), hf_mxfp4_logits)
    export_hf(flax_packed, tmp_path / "copied", mxfp4=True)  # packed -> MXFP4: the bytes themselves
    source = load_file(str(hf_mxfp4 / "model.safetensors"))
    copied = load_file(str(tmp_path / "copied" / "model.safetensors"))
    assert sorted(source) == sorted(copied)
    for key in source:
        if key.endswith(("_blocks", "_scales")):
            assert torch.equal(source[key], copied[key]), key
    export_hf(flax_packed, tmp_path / "decoded")  # packed -> plain experts
    np.testing.assert_array_equal(torch_logits(tmp_path / "decoded"), hf_mxfp4_logits)


def test_hf_shape_table_matches_what_transformers_writes(hf_mxfp4):
    tensors = load_file(str(hf_mxfp4 / "model.safetensors"))
    config = GptOssConfig.from_dict(json.loads((hf_mxfp4 / "config.json").read_text()))
    assert {k: tuple(t.shape) for k, t in tensors.items()} == hf_tensor_shapes(config, "mxfp4")


# ------------------------------------------------------------------ probes

class _Probe(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d, 512), torch.nn.SiLU(), torch.nn.Dropout(0.1),
            torch.nn.Linear(512, 128), torch.nn.SiLU(), torch.nn.Dropout(0.05), torch.nn.Linear(128, 1),
        )


def test_probe_state_dict_converts_to_probe_params(tmp_path):
    torch.manual_seed(0)
    probe = _Probe(48).eval()
    torch.save(probe.state_dict(), tmp_path / "probe.pt")  # keys net.0.weight ... net.6.bias
    convert_main([str(tmp_path / "probe.pt"), str(tmp_path / "flax")])
    params = load_probe(tmp_path / "flax")
    assert {k: v.shape for k, v in params.items()} == {
        "w1": (48, 512), "b1": (512,), "w2": (512, 128), "b2": (128,), "w3": (128, 1), "b3": (1,)}
    x = np.random.default_rng(0).standard_normal((5, 48)).astype(np.float32)
    with torch.no_grad():
        ref = probe.net(torch.from_numpy(x)).numpy()
    assert rel_err(probe_apply(params, x), ref) < 1e-6
    # A probe converted by format 1 holds the same bytes: still read.
    old = _with_format_version(tmp_path / "flax", tmp_path / "old", 1)
    np.testing.assert_array_equal(np.asarray(load_probe(old)["w1"]), np.asarray(params["w1"]))


def test_bad_probe_files_are_refused(tmp_path):
    state = _Probe(16).state_dict()
    del state["net.3.bias"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing\.pt.*net\.3\.bias is missing"):
        convert_probe(tmp_path / "missing.pt", tmp_path / "out")
    state = _Probe(16).state_dict()
    state["net.3.weight"] = state["net.3.weight"][:, :-1]
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"shape\.pt.*net\.3\.weight \(128, 511\)"):
        convert_probe(tmp_path / "shape.pt", tmp_path / "out")
    # Not a plain state dict: weights_only loading refuses to run the pickle.
    torch.save({"probe": _Probe(16)}, tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"module\.pt.*weights-only"):
        convert_probe(tmp_path / "module.pt", tmp_path / "out")
    assert_no_output(tmp_path / "out")


# ------------------------------------------------------------------ bad input: clear error, nothing written

def test_wrong_path_and_directory_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in .*empty"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "out")
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated", "corrupt_header"])
def test_damaged_safetensors_is_named(hf_mxfp4, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(hf_mxfp4, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(data[:-1000])
        match = r"model\.safetensors: truncated safetensors file: tensor '.*' ends at byte"
    else:
        f.write_bytes(data[:8] + b"#" + data[9:])
        match = r"model\.safetensors: corrupt safetensors header"
    with pytest.raises(CheckpointError, match=match):
        convert_checkpoint(bad, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def _drop(key):
    return lambda t: t.pop(key)


def _add(key):
    return lambda t: t.__setitem__(key, torch.zeros(3))


def _reshape(key):
    return lambda t: t.__setitem__(key, t[key][..., :-1].contiguous())


def _retype(key):
    return lambda t: t.__setitem__(key, t[key].to(torch.int32))


@pytest.mark.parametrize("edit, key, match", [
    (_drop, "model.layers.1.self_attn.sinks",
     "tensor 'model.layers.1.self_attn.sinks' is missing from the checkpoint .*model.safetensors"),
    (_add, "model.layers.1.mlp.extra", r"model\.safetensors: unexpected tensor 'model.layers.1.mlp.extra'"),
    # In the last layer, so the failure comes after several groups have been written.
    (_reshape, "model.layers.1.self_attn.o_proj.weight",
     r"model\.safetensors: tensor\(s\) .*o_proj\.weight.*config implies"),
    (_retype, "model.layers.0.mlp.experts.down_proj_blocks",
     r"model\.safetensors: tensor '.*down_proj_blocks' has dtype int32, expected uint8"),
    (_retype, "model.norm.weight",
     r"model\.safetensors: tensor 'model\.norm\.weight' has dtype int32, expected a floating"),
], ids=["missing", "unexpected", "shape", "dtype_packed", "dtype_float"])
def test_bad_tensor_is_named_with_file_and_key(hf_mxfp4, tmp_path, edit, key, match):
    bad = rewrite_tensors(hf_mxfp4, tmp_path / "bad", edit(key))
    with pytest.raises(CheckpointError, match=match):
        convert_checkpoint(bad, tmp_path / "out", group_bytes=16 << 10)
    assert_no_output(tmp_path / "out")


def test_config_disagreeing_with_tensors_is_named(hf_mxfp4, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf_mxfp4, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*gate_up_proj_bias.*config implies \(4, 192\)"):
        convert_checkpoint(bad, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_metal_checkpoint_is_refused(tmp_path):
    (tmp_path / "repo" / "metal").mkdir(parents=True)
    (tmp_path / "repo" / "metal" / "model.bin").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="metal/ checkpoint is not supported"):
        convert_checkpoint(tmp_path / "repo" / "metal", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="only a metal/ checkpoint"):
        convert_checkpoint(tmp_path / "repo", tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_existing_destination_needs_overwrite(hf_mxfp4, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="out: exists and is not empty; pass --overwrite"):
        convert_checkpoint(hf_mxfp4, dst)
    assert (dst / "keep.txt").read_text() == "user data"
    assert convert_main([str(hf_mxfp4), str(dst)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(hf_mxfp4.parent))
    assert convert_main([f"~/{hf_mxfp4.name}", "out", "--overwrite", "--keep-mxfp4"]) == 0
    assert not (dst / "keep.txt").exists() and open_flax_checkpoint(dst).packed_experts
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_convert_any_refuses_options_that_do_not_apply(hf_mxfp4, tmp_path, capsys):
    torch.save(_Probe(8).state_dict(), tmp_path / "probe.pt")
    with pytest.raises(ValueError, match="--keep-mxfp4 applies to gpt-oss checkpoints, not to a probe"):
        convert_any(tmp_path / "probe.pt", tmp_path / "out", keep_mxfp4=True)
    assert convert_main([str(tmp_path / "probe.pt"), str(tmp_path / "out"), "--keep-mxfp4"]) == 2
    assert "convert: error: --keep-mxfp4 applies to gpt-oss checkpoints, not to a probe" in capsys.readouterr().err
    for options, match in ((dict(to="hf", keep_mxfp4=True), "--keep-mxfp4 applies to --to flax"),
                           (dict(mxfp4=True), "--mxfp4 applies to --to hf"),
                           (dict(to="torch"), "to must be 'flax' or 'hf'")):
        with pytest.raises(ValueError, match=match):
            convert_any(hf_mxfp4, tmp_path / "out", **options)
    assert_no_output(tmp_path / "out")


def test_cli_usage_errors_exit_2(hf_mxfp4, tmp_path):
    for argv in ([str(hf_mxfp4), str(tmp_path / "out"), "--mxfp4"],
                 ["--to", "hf", str(hf_mxfp4), str(tmp_path / "out"), "--keep-mxfp4"],
                 [str(hf_mxfp4), str(tmp_path / "out"), "--dtype", "float16"]):
        with pytest.raises(SystemExit) as exit_info:
            convert_main(argv)
        assert exit_info.value.code == 2
    assert convert_main(["--to", "hf", str(hf_mxfp4), str(tmp_path / "out")]) == 2  # not a Flax checkpoint
    assert_no_output(tmp_path / "out")


def test_interrupted_conversion_leaves_no_destination(hf_mxfp4, tmp_path, monkeypatch):
    from hmoe_jax.checkpoint import layout_reading as checkpoint

    real = checkpoint.SafetensorsReader.get
    calls = []

    def interrupted(self, key):
        calls.append(key)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(self, key)

    monkeypatch.setattr(checkpoint.SafetensorsReader, "get", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(hf_mxfp4, tmp_path / "out", group_bytes=16 << 10)
    assert_no_output(tmp_path / "out")
