"""Benchmark: time to first token, decode speed with the KV cache, and images/s, at V = 1 and 576.

The whole inference path (vlm.generate: vision tower, QueCC's query pass, projector, prefill,
greedy decoding with the KV cache) on batches of B images that share one prompt, hence one
length: a batch of images of one token count needs no padding.
  ttft          vlm.generate with max_new_tokens=1: everything up to the first token
  decode tok/s  (G - 1) new tokens per sequence over the time generate(G) takes beyond
                generate(1); summed over the batch for the aggregate rate
  images/s      B images answered (G tokens each) per second, end to end
Every answer is forced to exactly G tokens (min_new_tokens), so random weights that stop
early cannot flatter a row.

    python bench/bench_decode.py --out out/bench_decode.json
"""
import time

from common import (QUESTION, build_model, common_args, describe_llm, int_list, machine, print_table, setup,
                    swap_projector, test_images, time_round_robin, timing_rounds, write_json)

import conversation  # noqa: E402  (common put the repository on the path)
import vlm  # noqa: E402


def make_batch(model, tokenizer, images, image_processor, question, device):
    samples = []
    for image in images:
        sample = conversation.prompt(tokenizer, question, model.config.tokens, model.config.image_first)
        sample["pixel_values"] = conversation.load_image(image, image_processor)
        samples.append(sample)
    batch = conversation.collate(samples, tokenizer.pad_token_id, left=True)
    assert batch["attention_mask"].all(), "one prompt, one token count: no padding"
    return {k: v.to(device) for k, v in batch.items()}


def main():
    p = common_args(__doc__.split("\n")[0])
    p.add_argument("--compressor", default="quecc")
    p.add_argument("--tokens", type=int_list, default="1,576", help="V values")
    p.add_argument("--batches", type=int_list, default="1,8", help="images per generate call")
    p.add_argument("--new-tokens", type=int, default=16, help="G, tokens generated per answer")
    p.add_argument("--question", default=QUESTION)
    args = setup(p)
    rounds = timing_rounds(args, 10, 5)
    vs, bs, g = args.tokens, args.batches, args.new_tokens
    model, tokenizer, image_processor = build_model(args, vs[0], args.compressor)
    info = machine(args)
    llm = describe_llm(args.llm, model.llm)
    print(f"{llm['text']}; vision {args.vision}; compressor {args.compressor}\n{info}")
    images = test_images(image_processor, max(bs))

    rows, calls = [], {}
    for v in vs:
        swap_projector(model, args.compressor, v)
        projector = model.projector  # each call below installs its own V's projector
        for b in bs:
            batch = make_batch(model, tokenizer, images[:b], image_processor, args.question, args.device)

            def run(new, batch=batch, projector=projector, v=v):
                model.projector, model.config.tokens = projector, v
                model.llm.generation_config.min_new_tokens = new  # fixed-length answers
                vlm.generate(model, tokenizer, batch, max_new_tokens=new)
            calls[(v, b, 1)] = lambda run=run: run(1)
            calls[(v, b, g)] = lambda run=run: run(g)
            rows.append(dict(tokens=v, batch=b, prompt_tokens=batch["input_ids"].shape[1]))
    start = time.time()
    ms = time_round_robin(calls, rounds, args.device)
    for r in rows:
        v, b = r["tokens"], r["batch"]
        first, full = ms[(v, b, 1)], ms[(v, b, g)]
        decode = max(full - first, 1e-9)
        r.update(new_tokens=g, ttft_ms=first, generate_ms=full, decode_ms_per_token=decode / (g - 1),
                 decode_tokens_per_s=(g - 1) / decode * 1e3, decode_tokens_per_s_all=b * (g - 1) / decode * 1e3,
                 images_per_s=b / full * 1e3)
    print(f"\nmedian of {rounds} rounds ({time.time() - start:.0f} s); answers of G = {g} tokens")
    print_table(["V", "batch", "prompt", "TTFT ms", "decode ms/token", "decode tok/s (all)", "images/s"],
                [[str(r["tokens"]), str(r["batch"]), str(r["prompt_tokens"]), f"{r['ttft_ms']:.1f}",
                  f"{r['decode_ms_per_token']:.2f}",
                  f"{r['decode_tokens_per_s']:.0f} ({r['decode_tokens_per_s_all']:.0f})",
                  f"{r['images_per_s']:.2f}"] for r in rows])
    for b in bs:
        by_v = {r["tokens"]: r for r in rows if r["batch"] == b}
        if 1 in by_v and 576 in by_v:
            print(f"batch {b}: V = 1 answers {by_v[1]['images_per_s'] / by_v[576]['images_per_s']:.1f}x more images/s "
                  f"than V = 576; first token {by_v[576]['ttft_ms'] / by_v[1]['ttft_ms']:.1f}x sooner")
    write_json(args.out, dict(benchmark="decode", model=llm, machine=info, compressor=args.compressor,
                              question=args.question, rounds=rounds, rows=rows))


if __name__ == "__main__":
    main()
