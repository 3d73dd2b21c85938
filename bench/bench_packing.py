"""Benchmark: padding and real (non-padding) tokens per second of a training step on LLaVA-665K's
length mix, at V = 4 and V = 576: plain (train.py's default), --group-by-length and --packing, side
by side in one run; and packing with transformers' block-diagonal mask under sdpa in place of
modeling_vlm.attend_per_sample (packing_mask).

The lengths. docs/data.md records no token lengths of llava_v1_5_mix665k.json (the file is not
here), so they are synthesised: the released file's records per image folder (COCO 364,100, VG
86,417, GQA 72,140, OCR-VQA 80,000, TextVQA 21,953, text-only 40,688; LLaVA issue #657) split into
the sources of the LLaVA-1.5 paper's Table 7, and per source the turns and the question and answer
tokens that SOURCES assumes (an image's several VQA questions taken as one multi-turn
conversation; ShareGPT long and multi-turn), rendered as vicuna_v1 (a 35-token system line, 6
tokens of markers a turn, EOS after each answer, loss on the answers), cut at --max-length.

The step. What train.py runs for each micro-batch (VLM.forward, label-only loss, then backward;
the optimizer step, the same in every mode, left out), for rank 0's share of a global batch of
--batch-size over --world devices, at micro-batch --micro-batch. By default one device's step of
32 samples in 4 micro-batches of 8 (train.py's micro-batch): a device's share of LLaVA-1.5's 128 on
4 devices, on one device so that every mode runs the same samples (group_by_length sorts the
global batch before dealing it to the devices). plain and group_by_length split the share into
micro-batches (train.micro_batches; group_by_length given the exact token lengths, its best case),
packing packs it (conversation.collate_packed). Every micro-batch of the first --steps steps is
timed, the modes taking turns micro-batch by micro-batch, best of --rounds; real tokens/s is their
real tokens over their time (on a CPU with one thread, CPU time: common.clock).

The model is a slice of Qwen1.5-0.5B: its layer shapes (width 1024, 16 heads, MLP 2816), --layers
of its 24 layers and the same share of its 151,936-word vocabulary (the label-only head keeps its
share of the step), QueCC at V, and the vision tower's features of CLIP-L/336's shapes given as a
feature cache gives them (the tower's cost is the same in every mode). QueCC's projector and
question pass keep their full per-sample cost, the same in every mode too: with fewer layers they
weigh more, and the ratios come out lower than the real model's. --layers 24 is the real LLM.
Padding: over --padding-steps steps, and for other layouts (LAYOUTS).

    python bench/bench_packing.py --out out/bench/packing.json
"""
import math
import random
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

from common import CLIP_L_336, QWEN1_5_0_5B, clock, common_args, int_list, machine, print_table, setup, sync, write_json

import conversation  # noqa: E402  (common put the repository on the path)
import modeling_vlm  # noqa: E402
import train  # noqa: E402
import vlm  # noqa: E402
from bench_train_step import step  # noqa: E402
from constants import IGNORE, IMAGE_SLOT  # noqa: E402

SYSTEM, MARKERS = 35, 6  # vicuna_v1: the system line; " USER: ", " ASSISTANT:" and the separator, a turn
# source: (records, has an image, turns (fewest, most), question tokens, answer tokens); tokens are
# lognormal (mean, sigma). COCO's 364,100 records are the Table 7 sources on COCO images, scaled to them
COCO = 364_100 / 330_000
SOURCES = {
    "llava_conversation": (58_000 * COCO, True, (2, 8), (14, 0.5), (55, 0.6)),
    "llava_detail": (23_000 * COCO, True, (1, 1), (12, 0.2), (110, 0.35)),
    "llava_reasoning": (77_000 * COCO, True, (1, 1), (20, 0.4), (135, 0.35)),
    "vqav2": (83_000 * COCO, True, (1, 10), (19, 0.2), (2, 0.4)),  # the question + "Answer the question using a single word or phrase."
    "okvqa": (9_000 * COCO, True, (1, 2), (21, 0.2), (2, 0.4)),
    "a_okvqa": (50_000 * COCO, True, (1, 1), (45, 0.3), (1, 0.0)),  # options and "Answer with the option's letter ..."
    "refcoco": (30_000 * COCO, True, (1, 6), (25, 0.3), (20, 0.2)),  # a phrase or a box; a box or a phrase
    "gqa": (72_140, True, (4, 20), (21, 0.2), (2, 0.4)),
    "ocr_vqa": (80_000, True, (3, 6), (19, 0.2), (6, 0.7)),
    "textcaps": (21_953, True, (1, 1), (12, 0.1), (14, 0.3)),
    "vg": (86_417, True, (3, 10), (30, 0.1), (6, 0.4)),  # region descriptions with their boxes
    "sharegpt": (40_688, False, (1, 8), (60, 1.0), (250, 0.8)),
}
MODES = ("plain", "group_by_length", "packing")
TIMED = MODES + ("packing_mask",)
# (devices, global batch, micro-batch): padding only, beside the timed layout
LAYOUTS = ((1, 128, 8), (2, 128, 8), (8, 128, 8), (8, 128, 16), (8, 256, 16))


def lognormal(rng, mean, sigma):
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma ** 2 / 2, sigma)))


def synthesise(count, tokens, vocab, max_length, seed=0):
    """`count` samples of the mix (SOURCES), as conversation.tokenize gives them: input_ids with V
    IMAGE_SLOT ids in the first turn, labels on the answers and their EOS, QueCC's question."""
    rng = random.Random(seed)
    names = list(SOURCES)
    samples = []
    for name in rng.choices(names, weights=[SOURCES[n][0] for n in names], k=count):
        _, image, (fewest, most), question, answer = SOURCES[name]
        ids, labels, query = [], [], None
        for turn in range(rng.randint(fewest, most)):
            asked = [rng.randrange(3, vocab) for _ in range(lognormal(rng, *question))]
            answered = [rng.randrange(3, vocab) for _ in range(lognormal(rng, *answer))] + [2]  # EOS
            query = asked if query is None else query
            prompt = ([IMAGE_SLOT] * tokens if image and turn == 0 else []) + asked + [1] * MARKERS
            ids += prompt + answered
            labels += [IGNORE] * len(prompt) + answered
        ids, labels = [1] * SYSTEM + ids, [IGNORE] * SYSTEM + labels
        samples.append(dict(input_ids=ids[:max_length], labels=labels[:max_length], query_ids=query,
                            pixel_values=None, image=image))
    return samples


def micro_batches(mode, samples, batch, world, micro, max_length):
    """Rank 0's micro-batches of one global batch (indices into samples), without images."""
    if mode.startswith("packing"):
        share = [samples[i] for i in batch[::world]]
        return conversation.collate_packed(share, 0, max_length, len(share) // micro)
    lengths = [len(s["input_ids"]) for s in samples] if mode == "group_by_length" else None
    return [conversation.collate([samples[i] for i in part], 0)
            for part in train.micro_batches([batch], 0, world, micro, lengths)]


def padding(samples, world, batch_size, micro, max_length, steps):
    """-> {mode: padding fraction} over `steps` global batches of rank 0 (train.global_batches)."""
    batches = train.global_batches(len(samples), batch_size, seed=0, epochs=1)[:steps]
    out = {}
    for mode in MODES:
        real = total = 0
        for batch in batches:
            for b in micro_batches(mode, samples, batch, world, micro, max_length):
                real += b["attention_mask"].sum().item()
                total += b["attention_mask"].numel()
        out[mode] = 1 - real / total
    return out


def with_features(sample, grid, width, generator):
    """The sample with random features of the frozen tower (patches, multi-level), as a cache gives."""
    if not sample["image"]:
        return sample
    patches = grid * grid
    return dict(sample, features=(torch.randn(patches, width, generator=generator),
                                  torch.randn(patches, 4 * width, generator=generator)))


def sliced_model(layers, tokens, device):
    """Qwen1.5-0.5B's layer shapes, `layers` of its 24 layers and as much of its vocabulary; QueCC at
    V = tokens; CLIP-L/336's config (its weights are never run: the features come cached)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = dict(QWEN1_5_0_5B, num_hidden_layers=layers,
                      vocab_size=QWEN1_5_0_5B["vocab_size"] * layers // QWEN1_5_0_5B["num_hidden_layers"])
        llm = Qwen2ForCausalLM(Qwen2Config(**config))
        vision = CLIPVisionModel(CLIPVisionConfig(**dict(CLIP_L_336, num_hidden_layers=1)))
        vision.config.num_hidden_layers = CLIP_L_336["num_hidden_layers"]  # the key layers of the real tower
        model = vlm.assemble(llm, vision, tokens, "quecc", "Qwen1.5-0.5B slice (random)", "CLIP-L/336 features")
    return model.to(device).train()


def on_device(batch, device):
    return {key: train.to_device(value, device) for key, value in batch.items()}


def measure(args, tokens, rounds):
    """One V: rank 0's first --steps steps in each mode (TIMED), micro-batch by micro-batch in turn -> rows."""
    model = sliced_model(args.layers, tokens, args.device)
    vocab = model.llm.config.vocab_size
    largest = max(args.batch_size, *(batch_size for _, batch_size, _ in LAYOUTS))
    samples = synthesise(largest * args.padding_steps, tokens, vocab, args.max_length)
    pads = padding(samples, args.world, args.batch_size, args.micro_batch, args.max_length, args.padding_steps)
    generator = torch.Generator().manual_seed(0)
    batches = train.global_batches(len(samples), args.batch_size, seed=0, epochs=1)[:args.steps]
    step_samples = list(samples)
    for i in (i for batch in batches for i in batch[::args.world]):  # rank 0's shares
        step_samples[i] = with_features(samples[i], model.config.grid, CLIP_L_336["hidden_size"], generator)
    timed = {mode: [on_device(b, args.device) for batch in batches for b in
                    micro_batches(mode, step_samples, batch, args.world, args.micro_batch, args.max_length)]
             for mode in TIMED}
    seconds, now = {mode: [math.inf] * len(timed[mode]) for mode in TIMED}, clock(args.device)
    warm_up = conversation.collate([next(s for s in step_samples if "features" in s)], 0)
    step(model, on_device(warm_up, args.device), "labels", args.device)
    for _ in range(rounds):
        for k in range(len(timed["plain"])):
            for mode in TIMED:  # packing_mask: sdpa under the block-diagonal mask, every row's whole square
                model.llm.config._attn_implementation = "sdpa" if mode == "packing_mask" else modeling_vlm.PER_SAMPLE
                sync(args.device)
                start = now()
                step(model, timed[mode][k], "labels", args.device)
                sync(args.device)
                seconds[mode][k] = min(seconds[mode][k], now() - start)
    model.llm.config._attn_implementation = modeling_vlm.PER_SAMPLE
    rows = []
    for mode in TIMED:
        real = sum(b["attention_mask"].sum().item() for b in timed[mode])
        rows.append(dict(tokens=tokens, mode=mode, padding_fraction=pads[mode.removesuffix("_mask")],
                         real_tokens_per_s=real / sum(seconds[mode]), seconds=sum(seconds[mode]),
                         real_tokens=real, tokens_with_padding=sum(b["attention_mask"].numel() for b in timed[mode])))
    return rows, samples


def main():
    p = common_args(__doc__.split("\n")[0], models=False)
    p.add_argument("--tokens", type=int_list, default=[4, 576], help="visual tokens V, comma-separated")
    p.add_argument("--world", type=int, default=1, help="devices the global batch is split over (rank 0 measured)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--micro-batch", type=int, default=8, help="per device (train.py's default: 8)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of Qwen1.5-0.5B's 24 (24: the real shape)")
    p.add_argument("--steps", type=int, default=1, help="steps timed")
    p.add_argument("--padding-steps", type=int, default=100, help="global batches the padding is measured over")
    args = setup(p)
    rounds = args.rounds or 1
    info = machine(args)
    accumulation = args.batch_size // (args.world * args.micro_batch)
    print(f"Qwen1.5-0.5B slice: {args.layers} of 24 layers; global batch {args.batch_size} on {args.world} device(s), "
          f"micro-batch {args.micro_batch} x {accumulation}; rank 0's first {args.steps} step(s), best of {rounds} "
          f"round(s)\n{info}")
    rows, layouts, mixes = [], [], []
    for tokens in args.tokens:
        start = time.time()
        measured, samples = measure(args, tokens, rounds)
        rows += measured
        lengths = sorted(len(s["input_ids"]) for s in samples)
        mixes.append(dict(tokens=tokens, mean=sum(lengths) / len(lengths), median=lengths[len(lengths) // 2],
                          cut=sum(n == args.max_length for n in lengths) / len(lengths)))
        print(f"V = {tokens}: samples of {mixes[-1]['mean']:.0f} tokens on average (median {mixes[-1]['median']}), "
              f"{100 * mixes[-1]['cut']:.1f}% cut at --max-length")
        for world, batch_size, micro in LAYOUTS:
            pads = padding(samples, world, batch_size, micro, args.max_length, args.padding_steps)
            layouts.append(dict(tokens=tokens, world=world, batch_size=batch_size, micro_batch=micro, **pads))
        print(f"V = {tokens}: {time.time() - start:.0f} s")
    print_table(["V", "mode", "padding", "real tokens/s", "timed s", "real tokens", "with padding"],
                [[str(r["tokens"]), r["mode"], f"{100 * r['padding_fraction']:.1f}%", f"{r['real_tokens_per_s']:.0f}",
                  f"{r['seconds']:.1f}", str(r["real_tokens"]), str(r["tokens_with_padding"])] for r in rows])
    ratios = []
    for tokens in args.tokens:
        speed = {r["mode"]: r["real_tokens_per_s"] for r in rows if r["tokens"] == tokens}
        ratios.append(dict(tokens=tokens, **{mode: speed[mode] / speed["plain"] for mode in TIMED[1:]}))
        print(f"V = {tokens}: the real tokens/s of plain x " + ", ".join(f"{m} {ratios[-1][m]:.2f}" for m in TIMED[1:]))
    print("padding of other layouts (devices x micro-batch, global batch):")
    print_table(["V", "devices", "batch", "micro", *MODES],
                [[str(r["tokens"]), str(r["world"]), str(r["batch_size"]), str(r["micro_batch"]),
                  *(f"{100 * r[m]:.1f}%" for m in MODES)] for r in layouts])
    write_json(args.out, dict(benchmark="packing", machine=info, layers=args.layers, world=args.world,
                              batch_size=args.batch_size, micro_batch=args.micro_batch, max_length=args.max_length,
                              steps=args.steps, rounds=rounds, mixes=mixes, rows=rows, ratios=ratios,
                              layouts=layouts))


if __name__ == "__main__":
    main()
