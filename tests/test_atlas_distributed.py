"""The atlas under ``torchrun``: two CPU processes (gloo) give the atlas one process gives.

Each rank runs this file as a script (``--worker``) on the bundled model and the texts of
tests/test_atlas.py, and saves what its merged ``HeadAtlas`` holds; the parent compares both ranks
with ``lens_attn.atlas`` run here in one process. Top examples and decile samples must be the same
positions (the samples are chosen by a hash of the position, not by the order the corpus arrives
in); activations and metrics equal to float32 rounding (a window's activations can differ in the
last bits with the batch it is padded into).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TEXTS = [
    "The cat sat on the mat. The cat sat on the mat, and the dog lay by the door.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "A function is defined with the def keyword. A function is defined with the def keyword.",
    "Paris is the capital of France.",
    "One two three four five. One two three four five. One two three.",
]
KWARGS = dict(k=4, per_decile=2, batch_size=2, circuits=False, pca=False, probes=False,
              progress=False)  # fmt: skip
TIMEOUT_S = 180  # two cold Python processes importing torch on a busy 2-core machine


def _summary(head_atlas) -> dict:
    heads = [f"L{layer}H{head}" for layer in range(head_atlas.n_layers)
             for head in range(head_atlas.n_heads)]  # fmt: skip
    columns = ["doc", "query_pos"]
    return {
        "top": {h: head_atlas.top_examples(h)[columns].values.tolist() for h in heads},
        "top_activation": {h: head_atlas.top_examples(h)["activation"].tolist() for h in heads},
        "deciles": {h: head_atlas.decile_examples(h)[columns].values.tolist() for h in heads},
        "metrics": {k: v.clone() for k, v in head_atlas.metrics.items()},
        "n_tokens": head_atlas.provenance["n_tokens"],
    }


def _worker(out: str) -> None:
    import torch.distributed as dist

    import lens_attn

    model = lens_attn.load_model(device="cpu")
    try:
        result = _summary(lens_attn.atlas(model, TEXTS, **KWARGS))
        tmp = Path(out) / f"rank{dist.get_rank()}.pt.tmp"
        torch.save(result, tmp)
        tmp.rename(Path(out) / f"rank{dist.get_rank()}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_atlas_of_one(tmp_path):
    from test_distributed import _free_port, _kill_group

    import lens_attn

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               __file__, "--worker", str(tmp_path)]  # fmt: skip
    env = os.environ | {
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(lens_attn.__file__).parents[1]), *sys.path]),
    }
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s")
    finally:
        _kill_group(process)
    assert process.returncode == 0, log[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = _summary(lens_attn.atlas(lens_attn.load_model(device="cpu"), TEXTS, **KWARGS))
    for got in ranks:
        assert got["n_tokens"] == one["n_tokens"]
        assert got["top"] == one["top"] and got["deciles"] == one["deciles"]
        for head, values in one["top_activation"].items():
            assert got["top_activation"][head] == pytest.approx(values, rel=1e-5, abs=1e-6)
        for name, grid in one["metrics"].items():
            # float32 patterns, float64 sums: 1e-5 relative
            assert torch.allclose(got["metrics"][name], grid, rtol=1e-5, atol=1e-6, equal_nan=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
