"""One process, `torchrun` or `accelerate launch`: the few collectives training and evaluation share.
Every function is a no-op (or the identity) in a single process."""
import os

import torch
import torch.distributed as dist


def setup_distributed():
    """-> (rank, world size, device), from the launcher's environment."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def accelerate_settings_not_taken(compute, precision_here, sharding_here):
    """`accelerate launch` hands its config to the script in environment variables; the scripts take
    only the launch from it (processes, ranks, the rendezvous): precision and FSDP are their own, and
    nothing is compiled. -> one line naming each setting accelerate passed that differs from what
    the script does, with what it does instead, or None. compute: the dtype the script computes in."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    on = (lambda name: env.get(name, "").lower() in ("1", "true", "yes"))
    notes = []
    precision = env.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if precision and {"no": torch.float32, "bf16": torch.bfloat16}.get(precision) != compute:
        notes.append(f"mixed_precision {precision} (here: {precision_here})")
    if on("ACCELERATE_USE_FSDP"):
        options = ", ".join(f"{k.removeprefix('FSDP_').lower()} {v}" for k, v in sorted(env.items()) if k.startswith("FSDP_"))
        notes.append(f"FSDP{f' ({options})' if options else ''} (here: {sharding_here})")
    if on("ACCELERATE_USE_DEEPSPEED"):
        notes.append(f"DeepSpeed (here: {sharding_here})")
    if env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() != "no":
        notes.append(f"dynamo_backend {env['ACCELERATE_DYNAMO_BACKEND']} (here: not compiled)")
    if on("ACCELERATE_USE_CPU") and torch.cuda.is_available():
        notes.append("cpu (here: the GPU)")
    if notes:
        return "accelerate launch: settings of accelerate's config not taken: " + "; ".join(notes)
    return None


def all_reduce_sum(value, device):
    """A number summed over all ranks."""
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.item()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def from_rank0(value):
    """Rank 0's value on every rank (a collective: every rank calls it; also a barrier)."""
    if dist.is_initialized():
        shared = [value]
        dist.broadcast_object_list(shared)
        value = shared[0]
    return value


def all_ranks(value):
    """[each rank's value], in rank order (a collective: every rank calls it)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def end_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()
