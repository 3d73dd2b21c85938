"""Benchmark: where one image's prefill time goes, per compressor, and what QueCC's own
query pass costs.

Per image (batch --batch), timed separately and round-robin:
  vision     the frozen CLIP tower (all hidden states: QueCC/TokenPacker read four layers)
  query      QueCC only: the extra LLM pass over the question for its query embedding
  projector  the compressor + mlp2x_gelu
  prefill    the LLM over the whole prompt (template + question + V visual tokens)
and each as a fraction of their sum. `static` is the total without the query pass: what a
static prompt costs per image (generate.StaticQuery computes the question's embedding once; with
the question before the image it also skips the prompt's text, see bench_static_query.py).
The compressors run at --tokens V (default 1); `mlp`, LLaVA's uncompressed projector, always
at 576. Projector weights are random: cost does not depend on them.

    python bench/bench_overhead.py --out out/bench_overhead.json
"""
import time

import torch

from common import (QUESTION, build_model, common_args, describe_llm, machine, print_table, setup, swap_projector,
                    test_images, time_round_robin, timing_rounds, write_json)

import conversation  # noqa: E402  (common put the repository on the path)

STAGES = ("vision", "query", "projector", "prefill")


def stage_calls(model, tokenizer, pixels, question):
    """-> {stage: fn} for one batch of images through `model`'s current projector."""
    b = len(pixels)
    sample = conversation.prompt(tokenizer, question, model.config.tokens, model.config.image_first)
    device = pixels.device
    ids = torch.tensor([sample["input_ids"]] * b, device=device)
    mask = torch.ones_like(ids)
    query = torch.tensor([sample["query_ids"]] * b, device=device)
    with torch.no_grad():
        features = model.encode_images(pixels)
        embedding = model.question_embedding(query, torch.ones_like(query)) if model.projector.needs_question else None
        visual = model.visual_tokens(None, embedding, features)

    def prefill():
        with torch.no_grad():
            with model.armed(ids, visual) as armed_ids:
                model.llm(input_ids=armed_ids, attention_mask=mask, logits_to_keep=1)

    projector = model.projector  # the model's projector is swapped for the next compressor later

    def project():
        model.projector = projector
        with torch.no_grad():
            model.visual_tokens(None, embedding, features)
    calls = {"vision": lambda: model.encode_images(pixels)}
    if embedding is not None:
        calls["query"] = lambda: model.question_embedding(query, torch.ones_like(query))
    calls.update(projector=project, prefill=prefill)
    info = dict(prompt_tokens=len(sample["input_ids"]), text_tokens=len(sample["input_ids"]) - model.config.tokens,
                query_tokens=len(sample["query_ids"]))
    return calls, info


def main():
    p = common_args(__doc__.split("\n")[0])
    p.add_argument("--compressors", default="quecc,tokenpacker,pool,mlp")
    p.add_argument("--tokens", type=int, default=1, help="V for the compressing projectors (mlp: always 576)")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--batch", type=int, default=1)
    args = setup(p)
    rounds = timing_rounds(args, 20, 9)
    compressors = args.compressors.split(",")
    model, tokenizer, image_processor = build_model(args, args.tokens, compressors[0])
    info = machine(args)
    llm = describe_llm(args.llm, model.llm)
    vision_params = sum(p.numel() for p in model.vision.parameters())
    print(f"{llm['text']}; vision {args.vision}: {vision_params / 1e6:.1f}M parameters\n{info}")
    pixels = torch.stack([conversation.load_image(im, image_processor) for im in test_images(image_processor, args.batch)])
    pixels = pixels.to(device=args.device, dtype=args.torch_dtype)

    calls, infos = {}, {}
    for compressor in compressors:
        tokens = 576 if compressor == "mlp" else args.tokens
        swap_projector(model, compressor, tokens)
        stage, infos[compressor] = stage_calls(model, tokenizer, pixels, args.question)
        infos[compressor]["tokens"] = tokens
        infos[compressor]["projector_params"] = sum(p.numel() for p in model.projector.parameters())
        calls.update({(compressor, name): fn for name, fn in stage.items()})
    start = time.time()
    ms = time_round_robin(calls, rounds, args.device)

    rows = []
    for compressor in compressors:
        times = {s: ms.get((compressor, s), 0.0) for s in STAGES}
        total = sum(times.values())
        rows.append(dict(compressor=compressor, **infos[compressor], batch=args.batch, ms=times, total_ms=total,
                         fractions={s: t / total for s, t in times.items()},
                         static_total_ms=total - times["query"]))
    print(f"\nms per batch of {args.batch} image(s), median of {rounds} rounds ({time.time() - start:.0f} s); "
          f"Q = text tokens of the prompt, q = tokens of the query pass")
    print_table(["compressor", "V", "Q", "q", *STAGES, "total", "static"],
                [[r["compressor"], str(r["tokens"]), str(r["text_tokens"]),
                  str(r["query_tokens"]) if r["ms"]["query"] else "-",
                  *(f"{r['ms'][s]:.2f} ({100 * r['fractions'][s]:.0f}%)" if r["ms"][s] else "-" for s in STAGES),
                  f"{r['total_ms']:.2f}", f"{r['static_total_ms']:.2f}"] for r in rows])
    quecc = next((r for r in rows if r["compressor"] == "quecc"), None)
    if quecc:
        print(f"\nQueCC's query pass is {100 * quecc['fractions']['query']:.0f}% of its total and costs "
              f"{quecc['ms']['query'] / quecc['ms']['prefill']:.2f}x its LLM prefill; a static prompt pays it once.")
    write_json(args.out, dict(benchmark="overhead", model=llm, vision=dict(name=args.vision, params=vision_params),
                              machine=info, rounds=rounds, question=args.question, rows=rows))


if __name__ == "__main__":
    main()
