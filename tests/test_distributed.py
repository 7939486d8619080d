"""monet under torch.distributed on CPU: DDP and FSDP2 over two gloo ranks (loopback only).

One spawn runs every scenario on both ranks, each rank on its own data; the
ranks save what they saw to files and the tests compare them here:

- ``DistributedDataParallel(monet.optimize(model, 0.8, (x,)))`` against DDP over
  the eager model with the same weights: the same gradients on every rank, at
  every step, with a plan that recomputes something;
- the same with the plan made lazily, on the first call inside DDP's forward;
- a plan made with ``reserve=monet.ddp_bucket_bytes(model)`` inside DDP: the
  rank's measured peak, DDP's gradient buckets included, within the budget;
- FSDP2 ``fully_shard`` over the module ``optimize`` returns, against
  ``fully_shard`` over the eager model;
- ``fully_shard`` applied to the model first and ``optimize`` over it.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import monet

WORLD = 2
STEPS = 2
BATCH = 256
WIDE = 128
SPAWN_TIMEOUT = 120


class MLP(nn.Module):
    """Two linear layers around a LayerNorm, a ReLU and a dropout of p=0."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.dropout = nn.Dropout(0.0)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc2(self.dropout(torch.relu(self.norm(self.fc1(x)))))


def wide_mlp() -> nn.Sequential:
    """Parameters about as large as the activations, so that DDP's buckets matter."""
    torch.manual_seed(0)
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(WIDE, WIDE), nn.GELU()) for _ in range(4)), nn.Linear(WIDE, 4)
    )


def _recording_buckets(ddp: nn.Module) -> dict[int, torch.Tensor]:
    """DDP's flat gradient buckets, recorded by a comm hook that all-reduces as DDP does."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buckets: dict[int, torch.Tensor] = {}

    def hook(state, bucket):
        buckets[bucket.index()] = bucket.buffer()
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    return buckets


def _ddp_step_peak(ddp: nn.Module, model: nn.Module, x: torch.Tensor, buckets: dict) -> int:
    """Measured peak of one DDP step on this rank, the buckets (alive before it) counted."""
    from monet.measure import measure_peak_memory

    def step():
        for p in model.parameters():
            p.grad = None
        ddp(x).square().mean().backward()

    step()
    return measure_peak_memory(step, [*model.parameters(), x, *buckets.values()]).peak_bytes


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(wrapped: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> dict:
    """STEPS SGD steps; per step the full gradients, then the final parameters."""
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    grads = []
    for x in batches:
        optimizer.zero_grad(set_to_none=True)
        wrapped(x).square().mean().backward()
        grads.append({n: _full(p.grad) for n, p in model.named_parameters()})
        optimizer.step()
    params = {n: _full(p) for n, p in model.named_parameters()}
    return {"grads": grads, "params": params}


def _plan_info(optimized: monet.OptimizedModule) -> dict:
    return {
        "plans": len(optimized.plans),
        "recomputed": [len(p.schedule.recompute) for p in optimized.plans.values()],
    }


def _scenario(name: str, rank: int, results: dict, run) -> None:
    try:
        results[name] = run()
    except Exception as error:  # noqa: BLE001 (recorded, compared in the parent)
        results[name] = {
            "error_type": f"{type(error).__module__}.{type(error).__qualname__}",
            "error": str(error),
            "traceback": traceback.format_exc(),
        }


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # One profile cache per rank (see the note on shared caches in the report).
    os.environ["MONET_CACHE_DIR"] = os.path.join(out, f"cache{rank}")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    batches = [torch.randn(BATCH, 16, generator=generator) for _ in range(STEPS)]
    wide_batches = [torch.randn(BATCH, WIDE, generator=generator) for _ in range(STEPS)]

    def pair() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        model = MLP()
        return model, copy.deepcopy(model)

    results: dict = {}

    def ddp_eager():
        _, reference = pair()
        return _train(DDP(reference), reference, batches)

    def ddp_monet(lazy: bool):
        def run():
            model, _ = pair()
            example = None if lazy else (batches[0],)
            optimized = monet.optimize(model, 0.8, example, measure=False, time_limit=5)
            trained = _train(DDP(optimized), model, batches)
            return {**trained, **_plan_info(optimized)}
        return run

    def ddp_reserved(reserve: bool):
        def run():
            from monet.measure import storage_bytes

            model = wide_mlp()
            reserved = monet.ddp_bucket_bytes(model) if reserve else 0
            # Without the reserve: the same budget in bytes as the run with it.
            budget = 0.8 if reserve else results["ddp_reserved"]["budget"]
            optimized = monet.optimize(
                model, budget, (wide_batches[0],), reserve=reserved, measure=False, time_limit=5
            )
            ddp = DDP(optimized)
            buckets = _recording_buckets(ddp)
            # Two steps first: DDP rebuilds its buckets after the first.
            trained = _train(ddp, model, wide_batches)
            report = optimized.report()
            return {
                **trained, "reserve": reserved, "bucket_bytes": storage_bytes(buckets.values()),
                "budget": report.budget, "predicted_peak": report.predicted_peak,
                "ddp_peak": _ddp_step_peak(ddp, model, wide_batches[0], buckets),
            }
        return run

    def ddp_wide_eager():
        reference = wide_mlp()
        return _train(DDP(reference), reference, wide_batches)

    def fsdp_eager():
        _, reference = pair()
        return _train(fully_shard(reference), reference, batches)

    def fsdp_monet():
        model, _ = pair()
        optimized = monet.optimize(model, 0.8, (batches[0],), measure=False, time_limit=5)
        trained = _train(fully_shard(optimized), model, batches)
        return {**trained, **_plan_info(optimized)}

    def fsdp_inside():
        model, _ = pair()
        fully_shard(model)
        optimized = monet.optimize(model, 0.8, (batches[0],), measure=False, time_limit=5)
        return _train(optimized, model, batches)

    _scenario("ddp_eager", rank, results, ddp_eager)
    _scenario("ddp_monet", rank, results, ddp_monet(lazy=False))
    _scenario("ddp_monet_lazy", rank, results, ddp_monet(lazy=True))
    _scenario("ddp_wide_eager", rank, results, ddp_wide_eager)
    _scenario("ddp_reserved", rank, results, ddp_reserved(reserve=True))
    _scenario("ddp_unreserved", rank, results, ddp_reserved(reserve=False))
    _scenario("fsdp_eager", rank, results, fsdp_eager)
    _scenario("fsdp_monet", rank, results, fsdp_monet)
    _scenario("fsdp_inside", rank, results, fsdp_inside)  # last: it fails part-way
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    context = mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD}-rank run did not finish in {SPAWN_TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _ok(result: dict) -> dict:
    assert "error" not in result, f"{result['error_type']}: {result['error']}\n{result['traceback']}"
    return result


def _assert_same(actual: dict, expected: dict) -> None:
    for step, (got, want) in enumerate(zip(actual["grads"], expected["grads"], strict=True)):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, s=step, n=name: f"step {s} grad {n}: {m}")
    for name in expected["params"]:
        torch.testing.assert_close(actual["params"][name], expected["params"][name],
                                   rtol=1e-5, atol=1e-6)


def test_ranks_saw_different_data_and_reduced_their_gradients(ranks):
    # All-reduced gradients agree across ranks; the ranks' data differ, so a
    # missing all-reduce would show.
    for scenario in ("ddp_eager", "ddp_monet", "fsdp_eager", "fsdp_monet"):
        first, second = (_ok(r[scenario]) for r in ranks)
        _assert_same(first, second)


@pytest.mark.parametrize("scenario", ["ddp_monet", "ddp_monet_lazy"])
def test_ddp_over_monet_matches_ddp_over_eager(ranks, scenario):
    for rank in ranks:
        result = _ok(rank[scenario])
        assert result["plans"] == 1
        assert result["recomputed"][0] > 0, "the 0.8 plan should recompute something"
        _assert_same(result, _ok(rank["ddp_eager"]))


def test_a_reserve_for_ddp_buckets_keeps_the_rank_within_the_budget(ranks):
    # The budget is per rank and DDP's gradient buckets (one copy of every
    # gradient, alive from DDP's construction on) are outside monet's plan:
    # optimize(..., reserve=monet.ddp_bucket_bytes(model)) holds them back.
    for rank in ranks:
        result = _ok(rank["ddp_reserved"])
        _assert_same(result, _ok(rank["ddp_wide_eager"]))
        assert result["reserve"] == result["bucket_bytes"] > 0
        assert result["ddp_peak"] <= result["budget"]
        # What DDP adds to the plan's peak is the buckets.
        assert result["ddp_peak"] <= result["predicted_peak"] + result["bucket_bytes"]
        # Without the reserve the same budget is exceeded by the buckets.
        unreserved = _ok(rank["ddp_unreserved"])
        assert unreserved["budget"] == result["budget"]
        assert unreserved["ddp_peak"] > unreserved["budget"]


def test_fsdp2_over_monet_matches_fsdp2_over_eager(ranks):
    # fully_shard on the module optimize returns: FSDP's pre-forward hook
    # all-gathers the parameters into the wrapped model, whose plan (same
    # shapes, same signature) runs on them; the gradients reduce-scatter as usual.
    for rank in ranks:
        result = _ok(rank["fsdp_monet"])
        assert result["plans"] == 1 and result["recomputed"][0] > 0
        _assert_same(result, _ok(rank["fsdp_eager"]))


def test_optimize_over_a_fully_sharded_model_says_what_to_do(ranks):
    # FSDP2's hooks all-gather real shards while AOTAutograd traces with fake
    # tensors: monet refuses such a model and says to shard its result instead.
    for rank in ranks:
        result = rank["fsdp_inside"]
        assert "error" in result
        assert result["error_type"] == "monet.capture.CaptureError", result["traceback"]
        assert "fully_shard" in result["error"]


def test_reserve_is_bytes_and_leaves_some_budget():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="reserve is bytes"):
        monet.optimize(model, "1MiB", reserve=0.5)
    with pytest.raises(ValueError, match="reserve 2.00 MiB leaves nothing of the budget 1.00 MiB"):
        monet.optimize(model, "1MiB", reserve="2MiB")
    assert monet.ddp_bucket_bytes(model.requires_grad_(False)) == 0
