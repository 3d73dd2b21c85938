"""Benchmark: a static prompt (one question, many images) through static_query.StaticQuery
against the plain path (conversation.prompt + collate + vlm.generate) on the same model.

For each layout (LLaVA's image-first order, and the question-before-image order that
`--image-after-question` trains) and batch size, the ms per image of both paths on the same
images, with answers of exactly G tokens (min_new_tokens), at G = 1 (time to first token) and
G = --new-tokens. What StaticQuery saves per image:
  image first:            QueCC's query pass over the question (computed once)
  image after question:   the query pass and the prompt's text: the prefill is V visual tokens
                          plus the template's few closing tokens, the rest comes from the cache
The answers of both paths are compared, too (tests/test_static_query.py checks it exactly).

    python bench/bench_static_query.py --out out/bench_static_query.json
"""
import copy
import time

from common import (QUESTION, build_model, common_args, describe_llm, int_list, machine, print_table, setup,
                    test_images, time_round_robin, timing_rounds, write_json)

import conversation  # noqa: E402  (common put the repository on the path)
from generate import StaticQuery, plain_answers  # noqa: E402


def main():
    p = common_args(__doc__.split("\n")[0])
    p.add_argument("--compressor", default="quecc")
    p.add_argument("--tokens", type=int, default=1, help="V")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batches", type=int_list, default="1,8", help="images per generate call")
    p.add_argument("--new-tokens", type=int, default=4, help="G, tokens per answer (short answers: a camera's yes/no)")
    p.add_argument("--question", default=QUESTION)
    args = setup(p)
    rounds, bs = timing_rounds(args, 10, 4), args.batches
    gs = sorted({1, args.new_tokens})
    model, tokenizer, image_processor = build_model(args, args.tokens, args.compressor)
    info = machine(args)
    llm = describe_llm(args.llm, model.llm)
    print(f"{llm['text']}; vision {args.vision}; compressor {args.compressor}, V = {args.tokens}\n{info}")
    images = test_images(image_processor, args.images)

    calls, rows, setup_ms, equal = {}, [], {}, {}
    for image_first in (True, False):
        config = copy.deepcopy(model.config)
        config.image_first = image_first
        sample = conversation.prompt(tokenizer, args.question, args.tokens, image_first)
        statics = {}
        for b in bs:
            model.config = config
            start = time.perf_counter()
            statics[b] = StaticQuery(model, tokenizer, image_processor, args.question, batch_size=b)
            setup_ms[image_first] = (time.perf_counter() - start) * 1e3
        for g in gs:
            for b in bs:
                def plain(b=b, g=g, config=config):
                    model.config = config
                    model.generation_config.min_new_tokens = g
                    return plain_answers(model, tokenizer, image_processor, args.question, images, b, g)

                def static(b=b, g=g, config=config, statics=statics):
                    model.config = config
                    model.generation_config.min_new_tokens = g
                    statics[b].max_new_tokens = g
                    return statics[b].answer(images)
                calls[(image_first, g, b, "plain")] = plain
                calls[(image_first, g, b, "static")] = static
                equal[(image_first, g, b)] = plain() == static()
                rows.append(dict(image_first=image_first, new_tokens=g, batch=b, tokens=args.tokens,
                                 prompt_tokens=len(sample["input_ids"]), query_tokens=len(sample["query_ids"]),
                                 cached_prefix_tokens=statics[b].prefix_length,
                                 prefill_tokens=len(sample["input_ids"]) - statics[b].prefix_length))
    start = time.time()
    ms = time_round_robin(calls, rounds, args.device, warmup=0)  # the equality check above warmed up
    for r in rows:
        key = (r["image_first"], r["new_tokens"], r["batch"])
        plain, static = ms[key + ("plain",)] / args.images, ms[key + ("static",)] / args.images
        r.update(plain_ms_per_image=plain, static_ms_per_image=static, speedup=plain / static,
                 answers_equal=equal[key], static_setup_ms=setup_ms[r["image_first"]])
    print(f"\nms per image over {args.images} images, median of {rounds} rounds ({time.time() - start:.0f} s)")
    print_table(["layout", "G", "batch", "prefill tokens (plain -> static)", "plain ms/img", "static ms/img",
                 "speed-up", "same answers"],
                [["image first" if r["image_first"] else "question first", str(r["new_tokens"]), str(r["batch"]),
                  f"{r['prompt_tokens']} + q {r['query_tokens']} -> {r['prefill_tokens']}",
                  f"{r['plain_ms_per_image']:.1f}", f"{r['static_ms_per_image']:.1f}", f"{r['speedup']:.2f}x",
                  str(r["answers_equal"])] for r in rows])
    print("one-off StaticQuery setup (query pass, prefix cache): "
          + ", ".join(f"{'image first' if k else 'question first'} {v:.1f} ms" for k, v in setup_ms.items()))
    write_json(args.out, dict(benchmark="static_query", model=llm, machine=info, compressor=args.compressor,
                              question=args.question, images=args.images, rounds=rounds, rows=rows))


if __name__ == "__main__":
    main()
