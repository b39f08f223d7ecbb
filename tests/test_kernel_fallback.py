"""A kernel that does not compile costs speed, not the run: "pallas-or-xla" (what "auto" picks on a GPU)
falls back to the XLA path per kernel with one warning, "pallas" fails loudly, and `eval doctor`
reports it.

On this CPU the failure is real: a Pallas kernel compiled (not interpreted) does not lower for a CPU
("Only interpret mode is supported"), exactly as a GPU, driver or Triton version that rejects a kernel
makes it fail at lowering or compile time. A failure of one kernel alone is simulated by making it raise
while it is traced, as a lowering rule would."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hmoe_jax
from eval import doctor_cli
from hmoe_jax.checkpoint import synthetic
from hmoe_jax.evaluation import doctor
from hmoe_jax.model import kernel_dispatch

CONFIG = synthetic.tiny_config(vocab_size=128, num_hidden_layers=2)
# Where a compiled Pallas kernel cannot lower: the real failure these tests fall back from.
on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="compiled kernels lower on this backend")
IDS = np.array([[0, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
                [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]], np.int32)
MASK = (IDS != 0).astype(np.int32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")  # the checkpoint is written by transformers' save_pretrained
    return synthetic.write_hf_checkpoint(tmp_path_factory.mktemp("fallback") / "ckpt", CONFIG, experts="mxfp4", seed=4)


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """Each test sees the kernels' compile verdicts and warnings anew, and traces its programs anew (a
    compiled program holds the verdicts it was traced with)."""
    monkeypatch.setattr(kernel_dispatch, "_VERDICTS", {})
    monkeypatch.setattr(kernel_dispatch, "_WARNED", set())
    jax.clear_caches()


def pallas_calls(model) -> int:
    graphdef, state = nnx.split(model)
    forward = lambda s: nnx.merge(graphdef, s).forward(jnp.asarray(IDS), jnp.asarray(MASK)).logits  # noqa: E731
    return str(jax.make_jaxpr(forward)(state)).count("pallas_call")


def logits(model):
    return np.asarray(model(IDS, MASK).logits)[MASK == 1]


@on_cpu
def test_a_kernel_that_does_not_compile_falls_back_with_one_warning(checkpoint):
    xla = logits(hmoe_jax.from_pretrained(checkpoint, experts="packed", kernels="xla"))
    model = hmoe_jax.from_pretrained(checkpoint, experts="packed", kernels="pallas-or-xla")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = logits(model)
        again = logits(model)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, kernel_dispatch.KernelFallbackWarning)]
    # One warning per kernel (sliding and full attention are one kernel), naming the kernel, the device
    # and the error; none on the second call.
    assert len(fallbacks) == 2, fallbacks
    assert any(m.startswith("the Pallas kernel sink_attention") for m in fallbacks)
    assert any(m.startswith("the Pallas kernel expert_ffn_mxfp4") for m in fallbacks)
    assert all("on cpu (cpu)" in m and "Only interpret mode" in m for m in fallbacks)
    np.testing.assert_array_equal(out, xla)
    np.testing.assert_array_equal(again, xla)
    assert pallas_calls(model) == 0


def test_the_fallback_is_per_kernel_and_explicit_pallas_fails_loudly(checkpoint, monkeypatch):
    """With the kernels compiling (interpreted here), a simulated lowering failure of the attention kernel
    leaves the MoE kernel running; kernels="pallas" raises the failure instead."""
    real = kernel_dispatch.sink_attention

    def rejected(*args, **kwargs):
        raise NotImplementedError("simulated: Triton has no lowering for this op on this GPU")

    xla = logits(hmoe_jax.from_pretrained(checkpoint, experts="packed", kernels="xla"))
    monkeypatch.setattr(kernel_dispatch, "interpret_flag", lambda mode: True)
    model = hmoe_jax.from_pretrained(checkpoint, experts="packed", kernels="pallas-or-xla")
    both = pallas_calls(model)
    monkeypatch.setattr(kernel_dispatch, "sink_attention", rejected)
    kernel_dispatch._VERDICTS.clear()  # as in a process where the kernel never compiled
    jax.clear_caches()
    with pytest.warns(kernel_dispatch.KernelFallbackWarning, match="sink_attention.*simulated"):
        out = logits(model)
    assert 0 < pallas_calls(model) < both  # the MoE kernel still runs
    np.testing.assert_allclose(out, xla, rtol=0, atol=1e-5 * np.abs(xla).max())
    explicit = hmoe_jax.from_pretrained(checkpoint, experts="packed", kernels="pallas")
    with pytest.raises(NotImplementedError, match="simulated"):
        explicit(IDS, MASK)
    monkeypatch.setattr(kernel_dispatch, "sink_attention", real)


@on_cpu
def test_the_fallback_judges_each_devices_shard_on_a_mesh(checkpoint):
    """Under a data x tensor mesh the kernel is compiled at the shapes one device runs."""
    mesh = hmoe_jax.make_mesh(data=2, tensor=2, expert=2)
    model = hmoe_jax.from_pretrained(checkpoint, experts="packed", kernels="pallas-or-xla", mesh=mesh)
    xla = hmoe_jax.from_pretrained(checkpoint, experts="packed", kernels="xla", mesh=mesh)
    with jax.set_mesh(mesh), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = np.asarray(model(IDS, MASK).logits)
        ref = np.asarray(xla(IDS, MASK).logits)
    np.testing.assert_array_equal(out, ref)
    attention = next(str(w.message) for w in caught if "sink_attention" in str(w.message))
    heads, kv = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]
    assert f"(1, 16, {heads // 2}, {CONFIG['head_dim']})" in attention and f"(1, 16, {kv // 2}," in attention


@on_cpu
def test_doctor_reports_the_paths_the_checks_and_the_fit(checkpoint, tmp_path, monkeypatch, capsys):
    """From another directory, with a relative --model: every kernel at tiny and 20b shapes fails to compile
    on a CPU (reported, not a problem: the XLA path runs), interpret mode agrees at tiny shapes, and the
    checkpoint fits."""
    monkeypatch.chdir(checkpoint.parent)
    assert doctor_cli.main(["--model", "ckpt", "--interpret", "--out", "doctor_out"]) == 0
    report = json.loads((checkpoint.parent / "doctor_out" / "doctor.json").read_text())
    assert report["ok"] and report["environment"]["backend"] == "cpu"
    assert report["environment"]["devices"][0]["memory_bytes"] > 0
    assert report["kernel_paths"] == {"sink_attention": "xla", "expert_ffn_mxfp4": "xla", "expert_ffn_mxfp4_cpu": "xla"}
    shapes = {c["shapes"] for c in report["checks"]}
    assert shapes == {"tiny", "gpt-oss-20b", "checkpoint"}
    pallas = [c for c in report["checks"] if c["kernel"] != "expert_ffn_mxfp4_cpu"]
    assert all(not c["compiles"] and "interpret mode" in c["compile_error"] for c in pallas)
    tiny = [c for c in pallas if c["shapes"] == "tiny"]
    assert tiny and all(c["agrees"] and c["interpreted"] for c in tiny)
    cpu_kernel = [c for c in report["checks"] if c["kernel"] == "expert_ffn_mxfp4_cpu"]  # built and run here
    assert {c["shapes"] for c in cpu_kernel} == shapes and all(c["compiles"] and c["agrees"] for c in cpu_kernel)
    assert report["checkpoint"]["fits_one_device"] is True and report["checkpoint"]["parameter_bytes"] > 0
    text = capsys.readouterr().out
    assert "sink_attention" in text and "fits" in text
    # Under the GPU default the path is the XLA one, as the kernels do not compile here.
    auto_on_gpu = doctor.run_doctor(options=hmoe_jax.RunOptions(kernels="pallas-or-xla"), shape_sets=("tiny",))
    pallas_paths = lambda report: {v for k, v in report.kernel_paths.items() if k != "expert_ffn_mxfp4_cpu"}  # noqa: E731
    assert auto_on_gpu.ok and pallas_paths(auto_on_gpu) == {"xla (the kernel does not compile here)"}
    assert auto_on_gpu.kernel_paths["expert_ffn_mxfp4_cpu"] == "not used (kernels=pallas-or-xla)"
    # The CPU default for the 20b (no checkpoint named: judged at gpt-oss-20b's size): the C++ kernel.
    on_cpu = doctor.run_doctor(shape_sets=("tiny",))
    assert on_cpu.ok and on_cpu.options["kernels"] == "xla"  # judged at the tiny config's size
    native = doctor.run_doctor(options=hmoe_jax.RunOptions(kernels="native"), shape_sets=("tiny",))
    assert native.ok and native.kernel_paths == {"sink_attention": "xla (no CPU kernel)",
                                                 "expert_ffn_mxfp4": "not used (kernels=native)",
                                                 "expert_ffn_mxfp4_cpu": "native"}
    assert all(c.agrees for c in native.checks if c.kernel == "expert_ffn_mxfp4_cpu")
    # "pallas" asked for runs the kernels interpreted on a CPU: no problem. On a GPU where they do not
    # compile (simulated: the platform reads "gpu", and compiled kernels cannot lower here), a run would
    # fail: a problem, exit status 1.
    assert doctor_cli.main(["--kernels", "pallas", "--shapes", "tiny"]) == 0
    assert "pallas, interpreted" in capsys.readouterr().out
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    failing = doctor.run_doctor(options=hmoe_jax.RunOptions(kernels="pallas"), shape_sets=("tiny",))
    assert not failing.ok and pallas_paths(failing) == {"pallas: FAILS (does not compile here)"}
    assert all("does not compile here: a run would fail" in p for p in failing.problems)


def test_doctor_exits_nonzero_when_a_kernel_disagrees_with_xla(monkeypatch, capsys):
    real = kernel_dispatch.sink_attention
    monkeypatch.setattr(kernel_dispatch, "sink_attention", lambda *a, **k: real(*a, **k) * 1.01)
    assert doctor_cli.main(["--interpret", "--shapes", "tiny"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS FOUND" in out and "sink_attention (tiny, float32" in out and "disagrees" in out


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU, where the kernels compile")
def test_compiled_kernels_run_without_fallback_on_a_gpu(checkpoint):
    """What "auto" gives on a GPU: both kernels compiled and run, no warning, the XLA path's logits."""
    xla = logits(hmoe_jax.from_pretrained(checkpoint, experts="packed", kernels="xla", dtype="float32"))
    model = hmoe_jax.from_pretrained(checkpoint, experts="packed", dtype="float32")
    assert model.options.kernels == "pallas-or-xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernel_dispatch.KernelFallbackWarning)
        out = logits(model)
    assert pallas_calls(model) > 0
    np.testing.assert_allclose(out, xla, rtol=0, atol=1e-4 * np.abs(xla).max())
