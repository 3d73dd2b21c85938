"""Benchmark: a training step with the loss on every position (LLaVA's way) against the loss on
the label positions only (VLM.forward), at Qwen1.5-0.5B and CLIP-L/336 shapes.

The models are random-init, built from configs alone (nothing downloaded): Qwen1.5-0.5B's
shapes (hidden 1024, 24 layers, 16 heads, MLP 2816, vocabulary 151,936, tied embeddings) and
CLIP-L/336's (24 layers, width 1024, patch 14, 336 px), QueCC between them. A step is what
train.py does per micro-batch: forward (vision tower included), backward, gradients freed;
the optimizer step, the same for both losses, is left out. Three settings:
  stage 1, V = 4:   the projector trains, the LLM is frozen (gradients flow through it)
  stage 2, V = 4 and V = 576: projector and LLM train
each with "all" (logits at every position, then the loss: the computation VLM.forward replaced)
and "labels" (VLM.forward), timed round-robin (a burst of load on a shared machine hits both).
Synthetic samples, shaped like LLaVA's data rendered with Qwen's chat template: stage 1 a
28-token prompt around the image and a 16-token caption (BLIP captions are about a dozen
words); stage 2 112 prompt tokens and 112 answer tokens, so at V = 576 one position in seven
carries a label. The second sample of a micro-batch is 3/4 as long: padding, as in training.
--packing compares instead, in stage 2, the labels-only step on the micro-batch padded (train.py's
default) and packed (--packing: rows of up to 2048 tokens, each sample attending to itself alone).
Peak memory: on CUDA torch's peak allocation, on CPU the process's peak resident set (Linux
VmHWM, reset before each step), both including the weights; step_mem_gb is the part above
what was resident when the step began (it grows with the micro-batch, the weights do not).

    python bench/bench_train_step.py --out out/bench_train_step.json
    python bench/bench_train_step.py --packing --micro-batch 4 --out out/bench_train_step_packing.json
"""
import contextlib
import ctypes
import time

import torch

from common import (CLIP_L_336, QWEN1_5_0_5B, clock, common_args, machine, print_table, real_shape_models, setup,
                    swap_projector, sync, timing_rounds, write_json)

import constants  # noqa: E402  (common put the repository on the path)
import conversation  # noqa: E402
import modeling_vlm  # noqa: E402
import train  # noqa: E402
import vlm  # noqa: E402

# (stage, V): text tokens before the image, after it (question, template), answer tokens (labels)
SAMPLES = {1: (14, 14, 16), 2: (14, 98, 112)}
SETTINGS = ((1, 4), (2, 4), (2, 576))
PACKING_SETTINGS, PACKED_ROW = ((2, 4), (2, 576)), 2048  # rows of train.py's default --max-length


def all_positions_loss(model, batch):
    """The computation VLM.forward replaced (LLaVA's, the paper release's): logits at every
    position, then the loss where labels are. -> (sum of token losses, number of label tokens)."""
    with model.inputs(batch["input_ids"], batch["query_ids"], batch["query_mask"], batch["has_image"],
                      batch.get("pixel_values"), batch.get("features")) as ids:
        masking = modeling_vlm.attention_inputs(batch["attention_mask"], batch.get("position_ids"))
        logits = model.llm(input_ids=ids, **masking).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=constants.IGNORE, reduction="sum")
    return loss, (targets != constants.IGNORE).sum()


def synthetic_batch(stage, tokens, micro_batch, image_size, vocab, seed=0):
    """A right-padded micro-batch (conversation.collate) of synthetic_samples."""
    return conversation.collate(synthetic_samples(stage, tokens, micro_batch, image_size, vocab, seed), pad_id=0)


def synthetic_samples(stage, tokens, micro_batch, image_size, vocab, seed=0):
    """Samples (conversation.tokenize's, with pixels) of random ids in the layout of SAMPLES."""
    generator = torch.Generator().manual_seed(seed)
    before, after, answer = SAMPLES[stage]
    samples = []
    for i in range(micro_batch):
        scale = 1 - 0.25 * (i % 2)  # every other sample shorter: padding
        counts = [round(n * scale) for n in (before, after, answer)]
        text = torch.randint(3, vocab, (sum(counts),), generator=generator).tolist()
        ids = text[:counts[0]] + [constants.IMAGE_SLOT] * tokens + text[counts[0]:]
        prompt = counts[0] + tokens + counts[1]
        samples.append(dict(input_ids=ids, labels=[constants.IGNORE] * prompt + ids[prompt:],
                            query_ids=text[counts[0]:prompt - tokens],  # the text after the image
                            pixel_values=torch.randn(3, image_size, image_size, generator=generator)))
    return samples


def memory_gb(device):
    """-> (now, peak since the last reset): torch's allocation on CUDA, the process's resident set on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 1e9, torch.cuda.max_memory_allocated() / 1e9
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(status[key].split()[0]) * 1024 / 1e9 for key in ("VmRSS", "VmHWM"))


@contextlib.contextmanager
def peak_memory(device, into):
    """Appends (peak, peak above the start) in GB of the enclosed code to `into`; the peak is
    reset first. On CPU (Linux, glibc): malloc_trim hands the memory freed by earlier steps back
    (kept, the next step would reuse it without raising the resident set, and both losses would
    read the same peak), then writing 5 to /proc/self/clear_refs resets the peak resident set."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    before, _ = memory_gb(device)
    yield
    peak = memory_gb(device)[1]
    into.append((peak, peak - before))


def step(model, batch, loss_on, device, optimizer=None):
    """Forward and backward of one micro-batch (train.py's, autocast bf16 on CUDA), then the
    optimizer's step if one is given, gradients freed."""
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        loss, count = all_positions_loss(model, batch) if loss_on == "all" else model(**batch)
    (loss / count).backward()
    if optimizer:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss.item() / count.item()


def measure(model, stage, tokens, args, rounds):
    """The two steps compared on the same micro-batch, round-robin -> two rows: the loss on every
    position and on the labels only, or (--packing) the labels-only step padded and packed."""
    model.llm.requires_grad_(stage == 2)
    swap_projector(model, "quecc", tokens).train()
    samples = synthetic_samples(stage, tokens, args.micro_batch, CLIP_L_336["image_size"], QWEN1_5_0_5B["vocab_size"])
    padded = conversation.collate(samples, pad_id=0)
    if args.packing:
        variants = {"padded": (padded, "labels"), "packed": (conversation.collate_packed(samples, 0, PACKED_ROW, 1)[0], "labels")}
    else:
        variants = {"all": (padded, "all"), "labels": (padded, "labels")}
    variants = {name: ({k: v.to(args.device) for k, v in batch.items()}, loss_on)
                for name, (batch, loss_on) in variants.items()}
    seconds, peaks, losses, now = {name: [] for name in variants}, {name: [] for name in variants}, {}, clock(args.device)
    for r in range(rounds + 1):  # round 0 warms up
        for name, (batch, loss_on) in variants.items():
            with peak_memory(args.device, peaks[name]):
                sync(args.device)
                start = now()
                losses[name] = step(model, batch, loss_on, args.device)
                sync(args.device)
            if r:
                seconds[name].append(now() - start)
    label_tokens = (padded["labels"][:, 1:] != constants.IGNORE).sum().item()
    rows = []
    for name, (batch, loss_on) in variants.items():
        step_s = sorted(seconds[name])[len(seconds[name]) // 2]  # the upper median: of 2, the slower
        sequence_tokens = batch["attention_mask"].sum().item()
        peak, above = max(peaks[name][1:])
        row = dict(stage=stage, tokens=tokens, variant=name, loss_on=loss_on, step_s=step_s, peak_mem_gb=peak,
                   step_mem_gb=above, tokens_per_s=sequence_tokens / step_s, micro_batch=args.micro_batch,
                   sequence_tokens=sequence_tokens, padded_tokens=batch["attention_mask"].numel(),
                   label_tokens=label_tokens, loss=losses[name])
        if args.peak_flops:  # the all-position step's FLOPs for both: the ratio of MFUs is the speed-up
            per_token = train.training_flops_per_token(model.llm, stage == 2, sequence_tokens / args.micro_batch)
            row["mfu"] = per_token * sequence_tokens / step_s / args.peak_flops
        rows.append(row)
    return rows


def measure_precision(model, args, rounds):
    """Stage 2, V = 4, labels only, a whole optimizer step (AdamW at stage 2's lr 2e-5): the LLM
    held in fp32, as train.py holds what trains, against bf16, as a bf16 hub checkpoint (Qwen1.5)
    trained before it did. -> one row each, with the share of one layer's weights the last step
    changed (the rest rounded away)."""
    batch = synthetic_batch(2, 4, args.micro_batch, CLIP_L_336["image_size"], QWEN1_5_0_5B["vocab_size"])
    batch = {k: v.to(args.device) for k, v in batch.items()}
    swap_projector(model, "quecc", 4).train()
    rows = []
    for weights in (torch.float32, torch.bfloat16):
        model.llm.to(weights).requires_grad_(True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
        probe = model.llm.model.layers[len(model.llm.model.layers) // 2].mlp.down_proj.weight
        seconds, peaks, now = [], [], clock(args.device)
        for r in range(rounds + 1):  # round 0 warms up and creates the optimizer's states
            before = probe.detach().clone()
            with peak_memory(args.device, peaks):
                sync(args.device)
                start = now()
                loss = step(model, batch, "labels", args.device, optimizer)
                sync(args.device)
            seconds.append(now() - start)
        changed = (probe.detach() != before).float().mean().item()
        step_s = sorted(seconds[1:])[len(seconds[1:]) // 2]
        state = {v.dtype for s in optimizer.state.values() for v in s.values() if v.dim()}
        rows.append(dict(weights=str(weights).removeprefix("torch."), optimizer_states=sorted(map(str, state)),
                         step_s=step_s, peak_mem_gb=max(p for p, _ in peaks[1:]), weights_changed=changed, loss=loss))
        del optimizer
    print_table(["LLM weights", "step s (with AdamW)", "peak GB", "weights a step changes", "loss"],
                [[r["weights"], f"{r['step_s']:.2f}", f"{r['peak_mem_gb']:.2f}", f"{100 * r['weights_changed']:.1f}%",
                  f"{r['loss']:.4f}"] for r in rows])
    fp32, bf16 = rows
    print(f"fp32 weights: {fp32['step_s'] / bf16['step_s']:.2f}x the step time, {fp32['peak_mem_gb'] / bf16['peak_mem_gb']:.2f}x "
          f"the peak memory of bf16 weights; a step changes {100 * fp32['weights_changed']:.1f}% of a layer's weights, "
          f"against {100 * bf16['weights_changed']:.1f}%")
    return rows


def main():
    p = common_args(__doc__.split("\n")[0], models=False)
    p.add_argument("--micro-batch", type=int, default=1,
                   help="samples per step (every other one 3/4 as long: padding from 2 on)")
    p.add_argument("--precision", action="store_true", help="instead: stage 2 with its optimizer step, the "
                   "LLM held in fp32 (train.py) against bf16 (a bf16 checkpoint trained as loaded)")
    p.add_argument("--packing", action="store_true", help="instead: stage 2, labels only, the micro-batch padded "
                   "against packed (train.py --packing)")
    args = setup(p)
    if args.packing and args.micro_batch < 2:
        p.error("--packing packs the samples of a micro-batch: give --micro-batch 2 or more")
    args.peak_flops = next((v for k, v in train.BF16_PEAK_FLOPS.items() if k in torch.cuda.get_device_name()),
                           None) if args.device.startswith("cuda") else None
    rounds = timing_rounds(args, 10, 2)
    llm, vision = real_shape_models()
    model = vlm.assemble(llm, vision, 4, "quecc", "Qwen1.5-0.5B shapes (random)", "CLIP-L/336 shapes (random)")
    model.to(args.device)
    info = machine(args)
    print(f"LLM {sum(p.numel() for p in llm.parameters()) / 1e6:.0f}M parameters, vision "
          f"{sum(p.numel() for p in vision.parameters()) / 1e6:.0f}M; micro-batch {args.micro_batch}, "
          f"upper median of {rounds} rounds after one warm-up\n{info}")

    if args.precision:
        return write_json(args.out, dict(benchmark="train_step_precision", machine=info, micro_batch=args.micro_batch,
                                         rounds=rounds, rows=measure_precision(model, args, rounds)))
    settings = PACKING_SETTINGS if args.packing else SETTINGS
    rows = []
    for stage, tokens in settings:
        start = time.time()
        rows += measure(model, stage, tokens, args, rounds)
        print(f"stage {stage}, V = {tokens}: {time.time() - start:.0f} s")
    print_table(["stage", "V", "step", "tokens", "with padding", "labels", "step s", "tokens/s", "peak GB",
                 "of it the step", "loss", *(["MFU"] if args.peak_flops else [])],
                [[str(r["stage"]), str(r["tokens"]), r["variant"], str(r["sequence_tokens"]), str(r["padded_tokens"]),
                  str(r["label_tokens"]),
                  f"{r['step_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_mem_gb']:.2f}", f"{r['step_mem_gb']:.2f}",
                  f"{r['loss']:.4f}", *([f"{100 * r['mfu']:.1f}%"] if args.peak_flops else [])] for r in rows])
    ratios = []
    for stage, tokens in settings:
        before, after = (r for r in rows if r["stage"] == stage and r["tokens"] == tokens)
        ratios.append(dict(stage=stage, tokens=tokens, speedup=before["step_s"] / after["step_s"],
                           memory=after["peak_mem_gb"] / before["peak_mem_gb"],
                           step_memory=after["step_mem_gb"] / before["step_mem_gb"]))
        print(f"stage {stage}, V = {tokens}: {after['variant']} is {ratios[-1]['speedup']:.2f}x as fast as "
              f"{before['variant']}, {ratios[-1]['memory']:.2f}x the peak memory ({ratios[-1]['step_memory']:.2f}x "
              "the step's own)")
    write_json(args.out, dict(benchmark="train_step_packing" if args.packing else "train_step", machine=info,
                              micro_batch=args.micro_batch, rounds=rounds,
                              samples={f"stage {s}": dict(zip(("before_image", "after_image", "answer"), SAMPLES[s]))
                                       for s in SAMPLES}, rows=rows, ratios=ratios))


if __name__ == "__main__":
    main()
