"""Measured peak memory of a real training step on the CPU, for tests/test_memory.py.

`measure_step_peak` runs optimizer steps through train.py's own code (train.wrap, on a one-rank
gloo DDP group or without DDP, train.build_optimizer, train.train_step) and measures the peak of
live CPU bytes during the third step: by then the AdamW state exists and DDP has rebuilt its
buckets (in the second forward), as on every later step of a run. torch.profiler's allocation
records (profile_memory=True) see every allocation, kernel scratch buffers included, and every
free but those of gloo's worker threads (live_sums makes up for them). The peak is measured as what is live when the step starts (the weights, the
AdamW state, DDP's buckets and the batch, counted from the tensors themselves and DDP's own
bucket sizes) plus the largest rise of live bytes during the step; without
DDP also as the running sum of a profiler started before the model is built (the two agree).

NOTE: with DDP the running sum cannot start before the model: DDP's constructor broadcasts a
flat copy of the weights through gloo, and when gloo's worker thread drops the last reference,
the free is not recorded (the profiler records the main thread's frees), so a sum started there
is sometimes a whole model too high for the rest of the run.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile, record_function

import train
from model import Qwen2, Qwen2Config

WINDOW = "measured step"


def synthetic_batch(B: int, S: int, n_supervised: int, vocab: int, seed: int = 0) -> dict:
    """B rows of S tokens without padding, as four context/response turns: a row's supervised
    tokens are the last ones of each quarter of it. n_supervised (<= B * (S - 1)) tokens are
    supervised in all (token 0 never is: it has no prediction)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    loss_mask = torch.zeros(B, S, dtype=torch.bool)
    quarter = max(S // 4, 1)
    order = sorted(range(1, S), key=lambda t: (quarter - 1 - t % quarter, t))  # quarter ends first
    for b in range(B):
        n_row = n_supervised // B + (b < n_supervised % B)
        loss_mask[b, order[:n_row]] = True
    return {"input_ids": ids, "attention_mask": torch.ones(B, S, dtype=torch.bool), "loss_mask": loss_mask}


def allocation_records(prof) -> list[tuple[int, int, int]]:
    """(time ns, bytes: + allocated / - freed, address) of every allocation record, in time order."""
    records, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if type(event.extra_fields).__name__ == "_ExtraFields_Allocation":
            records.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.ptr))
    return sorted(records)


def live_sums(records):
    """(time, live bytes) after each record: the running sum of the records, with each block freed
    at the latest when its address is allocated again.

    NOTE: the profiler records the frees of the main thread and autograd's, not those of gloo's
    worker threads. A collective's buffer is freed by whichever of the main thread (done with it
    after `wait()`) and gloo's worker (done running it) drops it last, and which one does varies
    from run to run: FSDP's gathered and reduce-scattered layers are sometimes freed unrecorded,
    and a plain running sum then keeps them forever (a 2-rank FSDP step measured up to 12 % high).
    An address allocated twice without a free between proves the free; placing it at the second
    allocation gave, in every run, the peak of the runs where no free was missed."""
    live, total, sums = {}, 0, []
    for t, n, ptr in records:
        if n > 0:
            total += n - live.get(ptr, 0)  # an unrecorded free of the block that held this address
            live[ptr] = n
        else:
            total -= live.pop(ptr, -n)  # the free of a block allocated before the records started
        sums.append((t, total))
    return sums


def window_span(prof, name: str = WINDOW) -> tuple[int, int]:
    """(start, end) ns of the record_function window `name`."""
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.name == name:
            return event.start_time_ns, event.end_time_ns
        stack.extend(event.children)
    raise LookupError(f"no profiler event named {name!r}")


def rise_in_window(prof, name: str = WINDOW) -> int:
    """The largest rise of live bytes (live_sums) inside the record_function window `name`, from
    where it opens."""
    start, end = window_span(prof, name)
    sums = live_sums([r for r in allocation_records(prof) if start <= r[0] <= end])
    return max((total for _, total in sums), default=0)


def live_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def ddp_bucket_bytes(step_module) -> int:
    """The size of DDP's gradient buckets (= the gradients, with gradient_as_bucket_view), as DDP
    reports them (after the rebuild of the second forward when there was one)."""
    info = step_module._get_ddp_logging_data()
    sizes = info.get("rebuilt_bucket_sizes") or info["bucket_sizes"]
    return sum(int(s) for s in str(sizes).split(","))


def running_peak(prof, name: str = WINDOW) -> int:
    """The largest live bytes (live_sums) from the profiler's start, inside the record_function
    window `name`: the peak of live bytes there if the profiler started first."""
    start, end = window_span(prof, name)
    return max((total for t, total in live_sums(allocation_records(prof)) if start <= t <= end), default=0)


@dataclass
class StepPeak:
    held_plus_rise: int  # live at the step's start (from the tensors) + the largest rise in it
    from_start: int | None  # without DDP: the running sum of a profiler started before the model


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP's parameters, gradients and AdamW state), else t."""
    return t.to_local() if isinstance(t, DTensor) else t


def measure_step_peak(model_config: Qwen2Config, cfg: train.TrainConfig, batches: list[dict], ddp: bool = True,
                      rank: int = 0, world: int = 1, store=None) -> StepPeak:
    """Peak live CPU bytes of this rank during the third of three train.train_step calls on
    `batches` (the step's micro-batches), under a gloo group of `world` ranks (ddp: DDP, ZeRO-1
    if cfg asks, or FSDP2 if cfg.fsdp; one rank: a HashStore) or as one process without
    torchrun (then measured both ways)."""
    rt = train.Runtime(rank=rank, world=world, device=torch.device("cpu"), distributed=ddp)
    if ddp:
        dist.init_process_group("gloo", store=store or dist.HashStore(), rank=rank, world_size=world)
    whole = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if not ddp else None
    try:
        if whole:
            whole.start()
        if cfg.fsdp:
            model, step_module = train.wrap_fsdp(cfg, rt, model_config)
        else:
            model = train.build_model(cfg, rt, model_config)
            step_module = train.wrap(model, cfg, rt)
        optimizer, scheduler = train.build_optimizer(model, cfg, rt, total_steps=10)
        generator = torch.Generator().manual_seed(cfg.seed)
        for _ in range(2):
            train.train_step(step_module, model, optimizer, scheduler, batches, generator, cfg, rt)
        gc.collect()
        with contextlib.nullcontext(whole) if whole else profile(activities=[ProfilerActivity.CPU],
                                                                  profile_memory=True) as prof:
            with record_function(WINDOW):
                train.train_step(step_module, model, optimizer, scheduler, batches, generator, cfg, rt)
        adamw = getattr(optimizer, "optim", optimizer)  # ZeRO-1: this rank's AdamW (its shard of the state)
        state = [local(t) for s in adamw.state.values() for t in s.values() if torch.is_tensor(t)]
        # the gradients at the step's start: DDP's buckets (.grad are views of them); none otherwise
        held = live_bytes([*map(local, model.parameters()), *state, *(t for b in batches for t in b.values())])
        held += ddp_bucket_bytes(step_module) if ddp and not cfg.fsdp else 0
    finally:
        if whole:
            whole.stop()
        if ddp:
            step_module = optimizer = None  # DDP before the process group (train.finish says why)
            gc.collect()
            dist.destroy_process_group()
    return StepPeak(held + rise_in_window(prof), running_peak(prof) if whole else None)


def _rank_main(rank: int, world: int, path: str, model_config, cfg, batches, results):
    torch.set_num_threads(1)
    store = dist.FileStore(path, world)
    results[rank] = measure_step_peak(model_config, cfg, batches, ddp=True, rank=rank, world=world, store=store)


def measure_ranks_peak(model_config: Qwen2Config, cfg: train.TrainConfig, batches: list[dict], world: int,
                       tmp_path) -> list[StepPeak]:
    """measure_step_peak on each of `world` gloo ranks, one process each (the same micro-batches on
    every rank); their peaks, by rank."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank_main, args=(world, str(tmp_path / "store"), model_config, cfg, batches, results),
                           nprocs=world, start_method="spawn")
        return [results[r] for r in range(world)]
