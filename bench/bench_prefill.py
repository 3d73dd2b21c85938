"""Benchmark: LLM prefill latency against the number of visual tokens V, beside the FLOPs model.

The paper's cost model (REFERENCE.md section 1) is FLOPs ~ 2 N (Q + V): at a fixed LLM the
prefill of one image should get (Q + 576) / (Q + V) times cheaper when V drops from 576.
This times the LLM's prefill forward (what generate() runs before the first token: the whole
prompt, logits for the last position only) over Q text + V visual tokens, for V in
{1, 4, 16, 36, 144, 576} and Q in {0, 50}; Q = 0 is the cached-text regime (a static prompt
whose KV cache is reused, static_query.py), Q = 50 the paper's second setting. Only the
sequence length matters to the LLM, so the inputs are random embeddings.

Two tables: latency (batch 1: one image at a time, the `rows` of the JSON) and throughput
(--throughput-batch images per call, default 8, under "throughput"). Configurations are
timed round-robin (one call of each per round, the median over rounds): on a shared machine a
burst of load then hits every configuration alike. A third measurement, the "GEMM ceiling",
times the LLM's widest matmul alone on 51 and 626 rows: small matrices run at fewer FLOP/s
than large ones, so their ratio bounds what any linear-dominated model can show at Q = 50,
V = 1 on the machine at hand.

The default LLM, `bench-wide`, is a toy-architecture Qwen2 (toy tokenizer) wide enough for
its linear layers to dominate on a CPU: hidden 512, 4 layers, MLP 2048, 16M parameters;
attention scores are 8% of the FLOPs at 626 tokens. Any toy preset, directory or hub name
works too (--llm toy-l, --llm Qwen/Qwen1.5-0.5B-Chat with --device cuda). Its preset is
common.py's (`--llm bench-wide` works in every bench script).

    python bench/bench_prefill.py --out out/bench_prefill.json --plot assets/why_one_token.png
"""
import os
import time

import torch

from common import (common_args, describe_llm, int_list, machine, print_table, setup, time_round_robin, timing_rounds,
                    write_json)

import vlm  # noqa: E402  (common put the repository on the path)

TOKEN_COUNTS = (1, 4, 16, 36, 144, 576)


def attention_share(llm, tokens):
    """Attention-score FLOPs (QK^T and AV, causal) as a share of all prefill FLOPs at `tokens`."""
    c = llm.config
    linear = 2 * tokens * (sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel())
    attention = 2 * c.num_hidden_layers * tokens * tokens * c.hidden_size  # 2 matmuls x 2 FLOPs x T^2/2
    return attention / (linear + attention)


# ---------------------------------------------------------------- prefill

def plot(panels, path, title):
    """panels: [(subtitle, rows)] -> one log-log panel each: measured and predicted speed-up."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), dpi=90, squeeze=False)
    for ax, (subtitle, rows) in zip(axes[0], panels):
        for q, colour in zip(sorted({r["text_tokens"] for r in rows}), ("tab:blue", "tab:orange", "tab:green")):
            part = sorted((r for r in rows if r["text_tokens"] == q), key=lambda r: r["tokens"])
            v = [r["tokens"] for r in part]
            label = "Q = 0 (cached text)" if q == 0 else f"Q = {q}"
            ax.plot(v, [r["predicted_speedup"] for r in part], "--", color=colour, label=f"{label}: FLOPs model")
            ax.plot(v, [r["measured_speedup"] for r in part], "o-", color=colour, label=f"{label}: measured")
            first = part[0]
            ax.annotate(f"{first['measured_speedup']:.1f}x (model {first['predicted_speedup']:.0f}x)",
                        (first["tokens"], first["measured_speedup"]), textcoords="offset points",
                        xytext=(6, 7) if q == 0 else (6, -15), fontsize=8, color=colour,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xticks(TOKEN_COUNTS, [str(v) for v in TOKEN_COUNTS])
        ax.set_xlabel("visual tokens V"), ax.set_ylabel("prefill speed-up over V = 576")
        ax.set_title(subtitle, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


def measure(llm, args, qs, vs, batch, rounds):
    """-> rows for one batch size; every (Q, V) timed round-robin."""
    calls = {}
    for q in qs:
        for v in vs:
            x = torch.randn(batch, q + v, llm.config.hidden_size, device=args.device, dtype=args.torch_dtype)
            mask = torch.ones(batch, q + v, dtype=torch.long, device=args.device)

            def call(x=x, mask=mask):
                with torch.no_grad():
                    llm(inputs_embeds=x, attention_mask=mask, logits_to_keep=1, use_cache=True)
            calls[(q, v)] = call
    start = time.time()
    ms = time_round_robin(calls, rounds, args.device)
    rows = []
    for q in qs:
        for v in vs:
            t = ms[(q, v)]
            rows.append(dict(tokens=v, text_tokens=q, ms=t, measured_speedup=ms[(q, 576)] / t,
                             predicted_speedup=(q + 576) / (q + v), batch=batch,
                             tokens_per_s=batch * (q + v) / t * 1e3, images_per_s=batch / t * 1e3))
        for r in rows:
            r["measured_over_predicted"] = r["measured_speedup"] / r["predicted_speedup"]
    print(f"\nprefill of Q text + V visual tokens, batch {batch} (ms per call), median of {rounds} rounds "
          f"({time.time() - start:.0f} s)")
    print_table(["Q", "V", "ms", "tokens/s", "images/s", "measured x", "predicted x", "measured/predicted"],
                [[str(r["text_tokens"]), str(r["tokens"]), f"{r['ms']:.2f}", f"{r['tokens_per_s']:.0f}",
                  f"{r['images_per_s']:.1f}", f"{r['measured_speedup']:.2f}", f"{r['predicted_speedup']:.2f}",
                  f"{100 * r['measured_over_predicted']:.0f}%"] for r in rows])
    target = next((r for r in rows if r["text_tokens"] == 50 and r["tokens"] == 1), None)
    if target:
        print(f"Q = 50, V = 1: measured {target['measured_speedup']:.2f}x of predicted "
              f"{target['predicted_speedup']:.2f}x = {100 * target['measured_over_predicted']:.0f}% "
              f"(target 80%: {'met' if target['measured_over_predicted'] >= 0.8 else 'NOT met'})")
    floor = next((r for r in rows if r["text_tokens"] == 0 and r["tokens"] == 1), None)
    if floor:
        print(f"Q = 0, V = 1: {floor['measured_speedup']:.0f}x of the FLOPs model's 576x; the call still costs "
              f"{floor['ms']:.2f} ms (every weight read once, per-call overheads)")
    return rows


def gemm_ceiling(llm, args, rounds):
    """The matmul alone: the LLM's widest linear layer (hidden -> MLP) on 51 and 626 rows. Its
    time ratio is the most a linear-dominated model can show at Q = 50, V = 1 on this machine:
    small matrices run at fewer FLOP/s than large ones."""
    c = llm.config
    weight = torch.randn(c.intermediate_size, c.hidden_size, device=args.device, dtype=args.torch_dtype)
    xs = {t: torch.randn(t, c.hidden_size, device=args.device, dtype=args.torch_dtype) for t in (51, 626)}
    reps = {51: 12, 626: 1}  # about equal time per sample, so a burst of load hits both alike

    def call(t):
        for _ in range(reps[t]):
            torch.nn.functional.linear(xs[t], weight)
    ms = time_round_robin({t: (lambda t=t: call(t)) for t in xs}, rounds * 3, args.device)
    ms = {t: ms[t] / reps[t] for t in ms}
    flops = {t: 2 * t * weight.numel() / ms[t] / 1e6 for t in ms}  # GFLOP/s
    ratio = ms[626] / ms[51]
    print(f"\nGEMM ceiling: a {c.hidden_size}x{c.intermediate_size} matmul runs at {flops[51]:.0f} GFLOP/s on "
          f"51 rows and {flops[626]:.0f} on 626: {ratio:.2f}x faster, {100 * ratio / (626 / 51):.0f}% of the "
          f"{626 / 51:.2f}x the FLOPs model predicts")
    return dict(matmul=[c.hidden_size, c.intermediate_size], ms_51_rows=ms[51], ms_626_rows=ms[626],
                speedup=ratio, of_predicted=ratio / (626 / 51))


def target(rows):
    r = next((r for r in rows if r["text_tokens"] == 50 and r["tokens"] == 1), None)
    if r is None:
        return None
    return dict(measured=r["measured_speedup"], predicted=r["predicted_speedup"],
                ratio=r["measured_over_predicted"], met=r["measured_over_predicted"] >= 0.8)


def main():
    p = common_args(__doc__.split("\n")[0])
    p.add_argument("--text-tokens", type=int_list, default="0,50", help="Q values, comma-separated")
    p.add_argument("--tokens", type=int_list, default=",".join(map(str, TOKEN_COUNTS)),
                   help="V values; must include 576")
    p.add_argument("--batch", type=int, default=1, help="images per call for the latency table (`rows`)")
    p.add_argument("--throughput-batch", type=int, default=8,
                   help="images per call for the throughput table (0 = skip it)")
    p.add_argument("--plot", help="write a PNG of measured against predicted speed-up")
    args = setup(p)
    qs, vs = args.text_tokens, args.tokens
    if 576 not in vs:
        p.error("--tokens must include 576, the reference")
    gpu = args.device.startswith("cuda")

    llm, _ = vlm.load_llm(args.llm, args.torch_dtype)
    llm.to(args.device).eval()
    model = describe_llm(args.llm, llm)
    model["attention_share_at_626_tokens"] = attention_share(llm, 626)
    info = machine(args)
    print(model["text"] + f"; attention is {100 * model['attention_share_at_626_tokens']:.0f}% "
          f"of the FLOPs at 626 tokens\n{info}")

    rounds = timing_rounds(args, 20, 7)
    rows = measure(llm, args, qs, vs, args.batch, rounds)
    result = dict(benchmark="prefill", model=model, machine=info, batch=args.batch, rounds=rounds, rows=rows,
                  target_q50_v1=target(rows), gemm_ceiling=gemm_ceiling(llm, args, rounds))
    panels = [(f"latency: batch {args.batch}", rows)]
    if args.throughput_batch:
        rounds_t = timing_rounds(args, 20, 5)
        rows_t = measure(llm, args, qs, vs, args.throughput_batch, rounds_t)
        result["throughput"] = dict(batch=args.throughput_batch, rounds=rounds_t, rows=rows_t,
                                    target_q50_v1=target(rows_t))
        panels.append((f"throughput: batch {args.throughput_batch}", rows_t))
    write_json(args.out, result)
    if args.plot:
        where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} thread(s)"
        plot(panels, args.plot, f"{model['text']}; {where}")


if __name__ == "__main__":
    main()
