"""Reading the toy grid's results: which question types were learned, the accuracy table, the text
ceilings, the fits, the learning curves, and what they say about the paper's findings (summary.md).

Rows are toy/demo.py's, one per run and split: run (compressor-size-vV), compressor, size, seed,
params_b, tokens, benchmark, score (0-1), per_category (percent), loss_first, loss_last.
"""
import json
import os
from collections import Counter, defaultdict

SPLITS = {"reasoning": "toy_reasoning", "ocr": "toy_ocr"}  # the toy world's benchmarks (toy/make_data.py)


def mean(values):
    return sum(values) / len(values)


def majority_baseline(questions_file, limit=None):
    """{category: accuracy of always giving that category's most common answer}, over the file's first
    `limit` questions (None: all)."""
    answers = defaultdict(list)
    for line in open(questions_file).readlines()[:limit]:
        question = json.loads(line)
        answers[question.get("category", "all")].append(question["answers"][0])
    return {c: Counter(a).most_common(1)[0][1] / len(a) for c, a in answers.items()}


def trend(rows, split):
    """Mean accuracy at the smallest vs largest LLM (over V) and at the fewest vs most tokens (over N)."""
    rows = [r for r in rows if r["benchmark"] == SPLITS[split]]
    by_size, by_tokens = defaultdict(list), defaultdict(list)
    for r in rows:
        by_size[r["params_b"]].append(r["score"])
        by_tokens[r["tokens"]].append(r["score"])
    n_lo, n_hi, v_lo, v_hi = min(by_size), max(by_size), min(by_tokens), max(by_tokens)
    return dict(size=(mean(by_size[n_lo]), mean(by_size[n_hi]), n_hi / n_lo),
                tokens=(mean(by_tokens[v_lo]), mean(by_tokens[v_hi]), v_lo, v_hi))


def question_counts(questions_file):
    """{category: questions of that type}."""
    return Counter(json.loads(line).get("category", "all") for line in open(questions_file))


NOT_LEARNED = "at or below twice the majority-answer baseline (or halfway from it to 100%, where that is lower)"


def learned_bar(baseline):
    """The accuracy a question type must pass in some run to count as read from the image: twice
    its majority-answer baseline, or halfway from it to 100% where twice is out of reach. A yes/no
    type's baseline is 50% or more (the toy world's exists: 57%), so by twice alone it would be left
    out even when answered right every time."""
    return min(2 * baseline, (1 + baseline) / 2)


def noisy_types(rows, baselines):
    """{split: question types NOT_LEARNED in every run}: they measure the answer prior, not the
    image, so they stay out of the means."""
    return {split: sorted(c for c, baseline in baselines[split].items()
                          if all(r["per_category"].get(c, 0) <= 100 * learned_bar(baseline)
                                 for r in rows if r["benchmark"] == bench))
            for split, bench in SPLITS.items()}


def kept_types(split, noisy, counts):
    """The question types of a split that count in the means: those not left out as noise."""
    return [c for c in counts[split] if c not in noisy[split]]


def kept_score(per_category, kept, counts):
    """The accuracy (0-1) over the kept types, every question weighing the same."""
    return sum(per_category.get(c, 0) * counts[c] for c in kept) / (100 * sum(counts[c] for c in kept))


def score_kept_types(rows, noisy, counts):
    """Each row's score over its split's kept question types, every question weighing the same (so
    03_evaluate.py's score when none is left out); 03's score is kept as score_all_types. A split
    whose every type is noise keeps 03's score, and is neither fitted nor read."""
    split_of = {bench: split for split, bench in SPLITS.items()}
    for r in rows:
        split = split_of[r["benchmark"]]
        kept = kept_types(split, noisy, counts)
        r["score_all_types"] = r["score"]
        if kept and noisy[split]:
            r["score"] = kept_score(r["per_category"], kept, counts[split])
    return rows


def by_cell(rows, split, key="score"):
    """{run name (LLM size and V): [value of each seed]} of one split."""
    cells = defaultdict(list)
    for r in rows:
        if r["benchmark"] == SPLITS[split]:
            cells[r["run"]].append(r[key] if key in r else r["per_category"].get(key, float("nan")))
    return cells


def seed_spread(rows, split):
    """The largest max - min over the seeds of one cell: the noise an ordering must stand above."""
    return max(max(scores) - min(scores) for scores in by_cell(rows, split).values())


def spread_text(values, scale=1):
    """mean (min-max) over the seeds, or the one value."""
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def accuracy_table(rows, baselines, noisy):
    """summary.md's table: per cell the reasoning accuracy, each question type's, OCR's and the stage-2
    loss, the majority-answer baseline under it; then the types left out of the means, and each type's
    best run as a multiple of its baseline."""
    pct = (lambda x: f"{100 * x:.1f}")
    categories = sorted(baselines["reasoning"])
    lines = ["| run | params | V | reasoning | " + " | ".join(c + "*" * (c in noisy["reasoning"]) for c in categories)
             + " | OCR | stage-2 loss |",
             "|---|---|---|---|" + "---|" * len(categories) + "---|---|"]
    reasoning, ocr = by_cell(rows, "reasoning"), by_cell(rows, "ocr")
    per_type = {c: by_cell(rows, "reasoning", c) for c in categories}
    first, last = by_cell(rows, "reasoning", "loss_first"), by_cell(rows, "reasoning", "loss_last")
    params = {r["run"]: (r["params_b"], r["tokens"]) for r in rows}
    for name in reasoning:
        lines.append(f"| {name} | {params[name][0] * 1e9 / 1e6:.2f}M | {params[name][1]} | "
                     f"{spread_text(reasoning[name], 100)} | " +
                     " | ".join(spread_text(per_type[c][name]) for c in categories) +
                     f" | {spread_text(ocr[name], 100)} | {mean(first[name]):.2f} → {mean(last[name]):.2f} |")
    lines.append("| majority answer | | | | " + " | ".join(pct(baselines["reasoning"][c]) for c in categories) +
                 f" | {pct(mean(list(baselines['ocr'].values())))} | |")
    left_out = [f"the whole {split} split (its column shown, neither fitted nor read)"
                if set(noisy[split]) == set(baselines[split]) else f"{', '.join(noisy[split])} ({split})"
                for split in SPLITS if noisy[split]]
    if left_out:
        starred = (" (* above; the reasoning and OCR columns and the fits use the other question types)"
                   if noisy["reasoning"] else "")
        lines += ["", f"Left out of the means{starred}: " + "; ".join(left_out) + f": {NOT_LEARNED} in every run, so they "
                  "measure the answer prior, not the image."]
    best = {c: max(max(values) for values in per_type[c].values()) for c in categories}
    lines += ["", "Best run per question type, as a multiple of the majority-answer baseline: " +
              ", ".join(f"{c} {best[c] / (100 * baselines['reasoning'][c]):.1f}x" for c in categories) + ".", ""]
    return lines


def learning_curves(out, curves, questions_file, questions):
    """learning_curves.png, a panel per cell (LLM size and V): each reasoning question type's accuracy
    over stage 2's steps. curves: {cell: {(type, step): the seeds' accuracies}}, scored on the first
    `questions` of questions_file. -> the summary's lines: the plot, and per cell the step at which each
    type first passed its learned bar, set by its majority-answer baseline on those same questions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not curves:  # runs trained before the demo scored them as they trained
        return []
    baselines = majority_baseline(questions_file, questions)
    categories = sorted(baselines)
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.2), layout="constrained", squeeze=False)
    lines = ["## When each question type was learned", "",
             f"Stage 2's first step at which a type's accuracy (the mean over the seeds, on the first {questions} "
             "held-out reasoning questions) passed its learned bar (twice its majority-answer baseline on those "
             "questions, or halfway to 100%); - where it never did.", "", "![accuracy per question type over stage 2's steps]"
             "(learning_curves.png)", "", "| run | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    for ax, (cell, accuracies) in zip(axes[0], curves.items()):
        learned = []
        for category in categories:
            steps = sorted(step for c, step in accuracies if c == category)
            means = [mean(accuracies[category, step]) for step in steps]
            ax.plot(steps, means, marker=".", label=category)
            learned.append(next((str(step) for step, m in zip(steps, means)
                                 if m > 100 * learned_bar(baselines[category])), "-"))
        ax.set(title=cell, xlabel="stage-2 step", ylim=(0, 100))
        lines.append(f"| {cell} | " + " | ".join(learned) + " |")
    axes[0][0].set_ylabel("accuracy (%)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.savefig(os.path.join(out, "learning_curves.png"), dpi=100)
    plt.close(fig)
    return lines + [""]


def ceiling_section(rows, ceilings, categories, noisy, counts):
    """Each LLM's text ceiling (text_ceilings) beside its best VLM cell, both over every question type
    and, when some types are left out as noise, both over the kept types the reasoning means use."""
    kept = kept_types("reasoning", noisy, counts)
    partial = bool(kept and noisy["reasoning"])
    lines = ["## Text ceiling: each LLM with the scene in words", "",
             "The pretrained LLM alone on the same held-out reasoning questions, the image's place taken by the "
             "scene's caption: how much each size reasons when nothing is lost in the image. Beside it the best "
             "cell of that LLM (the mean over the seeds), over every question type as the ceiling is" +
             (f"; then both over the types the reasoning means keep ({', '.join(kept)})." if partial else "."), "",
             "| LLM | ceiling | " + " | ".join(categories) + " | best VLM cell |" +
             (" ceiling, kept types | best VLM cell, kept types |" if partial else ""),
             "|---|---|" + "---|" * len(categories) + "---|" + "---|---|" * partial]

    def best_cell(size, key):
        cells = by_cell([r for r in rows if r["size"] == size], "reasoning", key)
        best = max(cells, key=lambda cell: mean(cells[cell]), default=None)
        return f" {100 * mean(cells[best]):.1f} ({best}) |" if best else " |"

    for size, ceiling in ceilings.items():
        line = (f"| {size} | {ceiling['accuracy']:.1f} | " +
                " | ".join(f"{ceiling['per_category'].get(c, float('nan')):.1f}" for c in categories) +
                " |" + best_cell(size, "score_all_types"))
        if partial:
            line += f" {100 * kept_score(ceiling['per_category'], kept, counts['reasoning']):.1f} |" + best_cell(size, "score")
        lines.append(line)
    return lines + [""]


def accuracy_at(rows, compressor, split, tokens):
    """A compressor's mean accuracy in percent at V = tokens, over LLM sizes and seeds."""
    scores = [r["score"] for r in rows
              if (r["compressor"], r["benchmark"], r["tokens"]) == (compressor, SPLITS[split], tokens)]
    return f"{100 * mean(scores):.1f}" if scores else "not made"


def fit_section(rows, fits, args):
    """The fitted law per compressor and split, with the accuracy at the grid's fewest and most tokens."""
    lo, hi = min(args.tokens), max(args.tokens)
    lines = ["## Fitted law, error = A N^-alpha V^-beta + D (95% bootstrap intervals)", "",
             "Fitted per compressor to the cell means; the bootstrap redraws the cells and the seeds within each, so "
             "the intervals include the training noise. Accuracy: the mean over LLM sizes and seeds.", "",
             f"| compressor | split | alpha | beta | A | D | R² | accuracy at V = {lo} | at V = {hi} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for compressor, by_split in fits.items():
        for split, fit in by_split.items():
            accuracy = f"{accuracy_at(rows, compressor, split, lo)} | {accuracy_at(rows, compressor, split, hi)}"
            if "failed" in fit:
                lines.append(f"| {compressor} | {split} | not fitted: {fit['failed']} | | | | | {accuracy} |")
                continue
            value = (lambda k, digits: f"{fit[k]:.{digits}f}" + (
                f" [{fit[k + '_ci'][0]:.{digits}f}, {fit[k + '_ci'][1]:.{digits}f}]" if fit.get(k + "_ci") else ""))
            lines.append(f"| {compressor} | {split} | {value('alpha', 4)} | {value('beta', 4)} | {value('A', 3)} | "
                         f"{value('D', 3)} | {fit.get('r2', float('nan')):.3f} | {accuracy} |")
    named = [(f"{compressor} {split}" if len(fits) > 1 else split, fit)
             for compressor, by_split in fits.items() for split, fit in by_split.items()]
    # a value on the edge of the paper's search box is the box's answer, not the data's
    edges = [f"{name}: {p} = {fit[p]:.4g} on the {side} edge of [{fit['box'][p][0]:g}, {fit['box'][p][1]:g}]"
             for name, fit in named for p, side in fit.get("on_edge", {}).items()]
    if edges:
        lines += ["", "On the edge of the paper's search box (04_fit_scaling.py --range widens it), so "
                  "set by the box rather than the data: " + "; ".join(edges) + "."]
    grids = [f"{name} alpha {fit['grid']['alpha']:.4f}, beta {fit['grid']['beta']:.4f}"
             for name, fit in named if "grid" in fit]
    if grids:  # what the release's grid search finds (at its median); the table is the refined fit
        lines += ["", "Whole-grid optimum (the number to compare with the release's): " + "; ".join(grids) + "."]
    return lines + ["", "Paper (visual reasoning, Qwen1.5 0.5B-7B, TokenPacker): alpha 0.077, beta 0.015 (one draw "
                    "of the release's random 20% search; its whole grid gives 0.0747, 0.0162).", ""]


def plot_accuracy(out, rows, args):
    """accuracy_vs_tokens.png: mean accuracy over the seeds against V, a colour per compressor and a
    line style per LLM size, a panel per split."""
    import matplotlib  # here: a one-compressor demo draws nothing
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scores = defaultdict(list)  # (benchmark, compressor, LLM size, V) -> the seeds' scores
    for r in rows:
        scores[r["benchmark"], r["compressor"], r["params_b"], r["tokens"]].append(100 * r["score"])
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(11, 4.5), layout="constrained")
    for ax, (split, bench) in zip(axes, SPLITS.items()):
        for colour, compressor in zip(plt.get_cmap("tab10").colors, args.compressors):
            for style, size in zip(("-", "--", ":", "-."), sorted({r["params_b"] for r in rows})):
                tokens = sorted(v for b, c, n, v in scores if (b, c, n) == (bench, compressor, size))
                ax.plot(tokens, [mean(scores[bench, compressor, size, v]) for v in tokens], style, color=colour,
                        marker="o", label=f"{compressor}, {size * 1e3:.2f}M")
        ax.set(xscale="log", xlabel="visual tokens V", ylabel="accuracy (%)", title=f"{split} ({bench})")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.savefig(os.path.join(out, "accuracy_vs_tokens.png"), dpi=120)
    plt.close(fig)


def findings(rows, fits, noisy, baselines):
    """One paragraph, written from the numbers, whichever way they fall: an ordering is stated only
    where the two gains differ by more than twice the largest seed-to-seed spread of a cell."""
    sizes = {r["params_b"] for r in rows}
    tokens = {r["tokens"] for r in rows}
    if len(sizes) < 2 or len(tokens) < 2:
        return "One LLM size or one token count: no trend to read. Run a grid (the default) for the comparison."
    seeds = len({r["seed"] for r in rows})
    text = []
    for split, claim in (("reasoning", "LLM size should matter more than visual tokens"),
                         ("ocr", "visual tokens should matter more than LLM size")):
        if set(noisy[split]) == set(baselines[split]):
            text.append(f"**{split}**: every question type is {NOT_LEARNED} in every run: "
                        "the toy world does not learn it at this budget, so there is no trend to read.")
            continue
        t = trend(rows, split)
        (n0, n1, ratio), (v0, v1, vlo, vhi) = t["size"], t["tokens"]
        size_gain, token_gain = n1 - n0, v1 - v0
        holds = size_gain > token_gain if split == "reasoning" else token_gain > size_gain
        difference, needed = abs(size_gain - token_gain), 2 * seed_spread(rows, split)
        verdict = ("Neither raises accuracy by a point: no ordering to read." if max(size_gain, token_gain) < 0.01
                   else "One seed per cell, so the seed-to-seed spread is unmeasured and no ordering is stated "
                        "(--seeds 2 or more)." if seeds < 2
                   else f"The toy world cannot tell at this budget: the gains differ by {100 * difference:.1f} "
                        f"points, not more than twice the largest seed spread of a cell (2 x {50 * needed:.1f} = "
                        f"{100 * needed:.1f} points); it misses by {100 * (needed - difference):.1f} points."
                   if difference <= needed
                   else f"That is {'the' if holds else 'the opposite of the'} paper's ordering, by "
                        f"{100 * difference:.1f} points, more than twice the largest seed spread of a cell "
                        f"({100 * needed:.1f} points)." + (
                            f" With {seeds} seeds per cell that spread is the range of {seeds} draws, which tends "
                            "to understate it; --seeds 4 measures it better (in another --out: this one's settings "
                            f"record {seeds} seeds)." if seeds < 4 else ""))
        text.append(f"**{split}** (paper: {claim}): going {ratio:.0f}x up in LLM size moves mean accuracy "
                    f"{100 * n0:.1f} → {100 * n1:.1f} ({100 * size_gain:+.1f} points); going from V={vlo} to "
                    f"V={vhi} moves it {100 * v0:.1f} → {100 * v1:.1f} ({100 * token_gain:+.1f} points). "
                    + verdict)
        if "alpha" in fits.get(split, {}):
            fit = fits[split]
            text.append(f"The fit gives alpha {fit['alpha']:.3f} and beta {fit['beta']:.3f} "
                        f"({'alpha > beta' if fit['alpha'] > fit['beta'] else 'alpha <= beta'}).")
    return " ".join(text)
