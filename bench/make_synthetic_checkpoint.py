"""Write a full-size gpt-oss-20b HF checkpoint with random values, for conversion and loading benchmarks.

    python bench/make_synthetic_checkpoint.py OUT_DIR [--seed 0]

Same key names (459 tensors), shapes, dtypes (bf16, MXFP4 uint8 experts), shard layout (three files
named `model-0000{0,1,2}-of-00002.safetensors` as in the release, plus the index) and `config.json`
(old `rope_scaling` spelling, `quantization_config`) as the released gpt-oss-20b: about 13.8 GB.
Written tensor by tensor with `hmoe_jax.checkpoint.safetensors_file.SafetensorsWriter` (numpy +
ml_dtypes, no torch), so it needs about one tensor of memory. Values: bf16 ~ N(0, 0.02^2) (norms ~ 1),
random MXFP4 codes with scale bytes 115..124, a spread like real expert weights, so every decoded value
is finite. Key names and shapes come from `hmoe_jax.checkpoint.layouts.hf_tensor_shapes`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from hmoe_jax.checkpoint.layouts import hf_tensor_shapes
from hmoe_jax.checkpoint.safetensors_file import SafetensorsWriter
from hmoe_jax.checkpoint.synthetic import GPT_OSS_20B_CONFIG
from hmoe_jax.model.config import GptOssConfig

N_LAYERS = GPT_OSS_20B_CONFIG["num_hidden_layers"]
N_SHARDS = 3
# Random normals are made this many at a time, so a 580 M-value embedding needs no float32 copy.
_CHUNK = 1 << 24


def _random_tensor(rng: np.random.Generator, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key.endswith("_blocks"):
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if key.endswith("_scales"):
        return rng.integers(115, 125, shape, dtype=np.uint8)
    out = np.empty(math.prod(shape), ml_dtypes.bfloat16)
    is_norm = key.endswith("norm.weight")
    for start in range(0, out.size, _CHUNK):
        chunk = rng.standard_normal(min(_CHUNK, out.size - start), dtype=np.float32)
        out[start:start + chunk.size] = 1.0 + 0.1 * chunk if is_norm else 0.02 * chunk
    return out.reshape(shape)


def _split(keys: list[str], nbytes: dict[str, int], n: int) -> list[list[str]]:
    """Consecutive runs of about equal byte size: each key goes where its middle byte falls."""
    total, before = sum(nbytes.values()), 0
    shards: list[list[str]] = [[] for _ in range(n)]
    for key in keys:
        shards[min(n - 1, int((before + nbytes[key] / 2) * n / total))].append(key)
        before += nbytes[key]
    return shards


def write_checkpoint(out_dir: Path, seed: int = 0) -> None:
    out_dir.mkdir(parents=True, exist_ok=False)
    config = GptOssConfig.from_dict(GPT_OSS_20B_CONFIG)
    shapes = hf_tensor_shapes(config, "mxfp4")
    dtypes = {k: np.dtype(np.uint8) if k.endswith(("_blocks", "_scales")) else np.dtype(ml_dtypes.bfloat16)
              for k in shapes}
    nbytes = {k: math.prod(s) * dtypes[k].itemsize for k, s in shapes.items()}
    # The release orders each shard's tensors by name; layers spread over the shards in order.
    keys = sorted(shapes, key=lambda k: (int(k.split(".")[2]) if k.startswith("model.layers.") else -1, k))
    shards = _split(keys, nbytes, N_SHARDS)
    names = [f"model-{n:05d}-of-{N_SHARDS - 1:05d}.safetensors" for n in range(N_SHARDS)]
    rng = np.random.default_rng(seed)
    start, done = time.perf_counter(), 0
    for name, shard in zip(names, shards):
        shard = sorted(shard)
        with SafetensorsWriter(out_dir / name, [(k, shapes[k], dtypes[k]) for k in shard], {"format": "pt"}) as writer:
            for key in shard:
                writer.write(key, _random_tensor(rng, key, shapes[key]))
                done += nbytes[key]
        print(f"{name}: {len(shard)} tensors, {sum(nbytes[k] for k in shard) / 1e9:.2f} GB "
              f"({done / 1e6 / (time.perf_counter() - start):.0f} MB/s)", flush=True)
    index = {"metadata": {"total_size": sum(nbytes.values())},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(GPT_OSS_20B_CONFIG, indent=2) + "\n")
    print(f"wrote {len(shapes)} tensors, {sum(nbytes.values()) / 1e9:.2f} GB to {out_dir}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_checkpoint(args.out_dir, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
