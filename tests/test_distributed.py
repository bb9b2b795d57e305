"""Data-parallel scoring on ``torch.distributed`` equals a single-process run.

The end-to-end test starts two CPU processes with ``torchrun`` (gloo on 127.0.0.1, a free port),
each running this file as a script (``--worker``): every rank loads the tiny GQA checkpoint, scores
its shard of the prompts, and writes the merged ``HeadScores`` it returned to ``rank<r>.pt``. The
parent compares every rank's table with ``score_heads`` run here in one process on all prompts.

Tolerance: 1e-6 absolute plus 1e-6 relative, on values and standard errors. The sums themselves are
float64 and exact to ~1e-15, but a prompt's float32 pattern can differ in its last bits depending on
which other prompts share its padded batch (different matmul shapes); ``mean_distance`` is in
tokens (up to ~20), hence the relative part. Counts of prompts must match exactly.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lens_attn
from lens_attn import distributed
from lens_attn.ablation.sweep import ablation_sweep
from lens_attn.compat import HAS_HOOKED
from lens_attn.probes import Probe, induction_probes, repeated_token_probes
from lens_attn.scoring.runner import score_heads

# case name -> (number of prompts, how the process group is found, query_chunk)
CASES = {
    "detected-7": (
        7,
        "detect",
        None,
    ),  # torchrun's environment; 7 prompts: 4 on rank 0, 3 on rank 1
    "explicit-8": (8, "explicit", None),  # process_group=dist.group.WORLD
    "chunked-5": (5, "explicit", 4),  # data-parallel and query-chunked together
}
# query_chunk needs HookedTransformer, which TransformerLens 4 removed: those cases are not run there
RUN = {case: spec for case, spec in CASES.items() if HAS_HOOKED or spec[2] is None}
TIMEOUT_S = 180  # two cold Python processes importing torch on a busy 2-core machine


def _prompts(model, n: int) -> list[Probe]:
    """The same ``n`` probes in every process: lengths 11, 19 and 12 (padded batches)."""
    probes = induction_probes(model, periods=(5, 9), n_per_period=4, seed=1)
    probes += repeated_token_probes(model, n=2, length=12, seed=1)
    return probes[:n]


def _table(scores) -> dict:
    return {
        "values": scores.values,
        "stderr": scores.stderr,
        "counts": scores.counts,
        "world_size": scores.provenance["world_size"],
        "n_prompts": scores.provenance["n_prompts"],
    }


def _sweep_table(sweep) -> dict:
    return {"baseline": sweep.baseline_per_prompt, "ablated": sweep.ablated_per_prompt,
            "stderr": sweep.stderr, "world_size": sweep.provenance["world_size"]}  # fmt: skip


# ------------------------------------------------------------------------- worker (one per rank)


def _worker(checkpoint: str, out: str) -> None:
    import torch.distributed as dist

    from lens_attn.loading import load_model

    torch.manual_seed(0)
    model = load_model(checkpoint, device="cpu")
    results = {}
    try:
        for case, (n, group, chunk) in RUN.items():
            process_group = dist.group.WORLD if group == "explicit" else None
            scores = score_heads(
                model,
                _prompts(model, n),
                batch_size=2,
                query_chunk=chunk,
                process_group=process_group,
                progress=False,
            )
            results[case] = _table(scores)
            # what this rank scored itself: its deterministic shard
            results[case]["shard"] = len(distributed.shard(list(range(n)), dist.group.WORLD))
        sweep = ablation_sweep(model, _prompts(model, 7), metric="loss", method="mean",
                               reference=_prompts(model, 8), max_batch=6)  # fmt: skip
        results["ablation"] = _sweep_table(sweep)
        results["is_main"] = distributed.is_main()
        rank = dist.get_rank()
        tmp = Path(out) / f"rank{rank}.pt.tmp"
        torch.save(results, tmp)
        tmp.rename(Path(out) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------ parent (pytest)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(process: subprocess.Popen) -> None:
    """End torchrun and every rank it started (they share its session), stragglers included."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue


def _run_torchrun(checkpoint: Path, out: Path, nproc: int = 2) -> str:
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()),
        __file__, "--worker", str(checkpoint), str(out),
    ]  # fmt: skip
    env = os.environ | {
        "GLOO_SOCKET_IFNAME": "lo",  # loopback only
        "OMP_NUM_THREADS": "1",  # two ranks on two cores
        "PYTHONPATH": os.pathsep.join([str(Path(lens_attn.__file__).parents[1]), *sys.path]),
    }
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, so the ranks can be killed with it
    )  # fmt: skip
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s; killed it and its ranks")
    finally:
        _kill_group(process)  # a no-op when everything has exited
    if process.returncode != 0:
        pytest.fail(f"torchrun failed with exit code {process.returncode}:\n{log[-4000:]}")
    return log


@pytest.fixture(scope="module")
def two_ranks(tiny_checkpoints, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    _run_torchrun(tiny_checkpoints["gqa"].path, out)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def single_process(tiny_checkpoints) -> dict:
    from lens_attn.loading import load_model

    model = load_model(tiny_checkpoints["gqa"].path, device="cpu")
    return {
        case: _table(score_heads(model, _prompts(model, n), query_chunk=chunk, progress=False))
        for case, (n, _, chunk) in RUN.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [case if case in RUN else pytest.param(case, marks=pytest.mark.hooked_only) for case in CASES],
)
def test_two_processes_equal_one(two_ranks, single_process, case):
    reference = single_process[case]
    n = CASES[case][0]
    for rank, results in enumerate(two_ranks):
        ours = results[case]
        assert ours["world_size"] == 2 and ours["n_prompts"] == n
        assert ours["shard"] == len(range(rank, n, 2))  # 7 prompts: 4 and 3
        assert sorted(ours["values"]) == sorted(reference["values"])
        for name in reference["values"]:
            for field in ("values", "stderr"):
                torch.testing.assert_close(
                    ours[field][name], reference[field][name], atol=1e-6, rtol=1e-6,
                    equal_nan=True, msg=f"rank {rank}, {case}: {name} {field}",
                )  # fmt: skip
            counts, expected = ours["counts"][name], reference["counts"][name]
            assert torch.equal(counts.nan_to_num(-1), expected.nan_to_num(-1)), name


@pytest.mark.slow
def test_only_rank_zero_is_main(two_ranks):
    assert [results["is_main"] for results in two_ranks] == [True, False]


# ------------------------------------------------------------------- helpers, in one process


def _pretend_rank(monkeypatch, rank: int, size: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda group: rank)
    monkeypatch.setattr(distributed, "world_size", lambda group: size)


@pytest.mark.parametrize("n", [7, 8, 3])
def test_shards_are_disjoint_and_cover_everything(monkeypatch, n):
    shards = []
    for rank in range(3):
        _pretend_rank(monkeypatch, rank, 3)
        shards.append(distributed.shard(list(range(n)), group=object()))
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(s) for s in shards] == [
        len(range(r, n, 3)) for r in range(3)
    ]  # sizes differ by <= 1


def test_fewer_prompts_than_processes_refused(monkeypatch):
    _pretend_rank(monkeypatch, 0, 4)
    with pytest.raises(ValueError, match="3 prompts for 4 processes"):
        distributed.shard([0, 1, 2], group=object())


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.current_group() is None
    assert distributed.world_size(None) == 1 and distributed.is_main()
    sentinel = object()
    assert distributed.current_group(sentinel) is sentinel  # an explicit group is used as given
    tensors = {"sum": torch.ones(2)}
    assert distributed.all_reduce_sum(tensors, None) is tensors


@pytest.mark.parametrize(
    ("local_rank", "device", "n_devices", "expected"),
    [
        ("3", None, 1, "cuda:3"),  # one GPU per rank
        ("1", "cuda", 2, "cuda:2"),  # a model split over 2 GPUs per rank: rank 1 has GPUs 2, 3
        ("1", "cpu", 1, "cpu"),  # an explicit choice is kept
        ("1", "cuda:5", 1, "cuda:5"),
        (None, None, 1, None),  # outside torchrun: load_model's default
    ],
)
def test_each_rank_gets_its_own_gpus(monkeypatch, local_rank, device, n_devices, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    chosen = distributed.process_device(device, n_devices=n_devices)
    if expected is None:
        assert chosen is None
    else:
        assert torch.device(chosen) == torch.device(expected)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3])


def test_two_processes_ablation_sweep_equals_one(two_ranks, tiny_checkpoints):
    from lens_attn.loading import load_model

    model = load_model(tiny_checkpoints["gqa"].path, device="cpu")
    reference = _sweep_table(ablation_sweep(model, _prompts(model, 7), metric="loss", method="mean",
                                            reference=_prompts(model, 8), max_batch=6))  # fmt: skip
    assert reference["world_size"] == 1
    for rank, results in enumerate(two_ranks):
        ours = results["ablation"]
        assert ours["world_size"] == 2
        for name in ("baseline", "ablated", "stderr"):
            # per-prompt losses: float32 logits of the same prompt in differently padded batches
            torch.testing.assert_close(ours[name], reference[name], atol=1e-5, rtol=1e-5,
                                       msg=f"rank {rank}: {name}")  # fmt: skip
