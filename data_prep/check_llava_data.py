"""Check a LLaVA data layout before a GPU-hour is spent on it (docs/data.md).

    python data_prep/check_llava_data.py            # both stages' default files under data/
    python data_prep/check_llava_data.py --llm Qwen/Qwen1.5-7B-Chat --tokens 4   # as those runs tokenize
    python data_prep/check_llava_data.py --data data/llava_v1_5_mix665k.json --image-folder data \\
        --write-clean data/llava_v1_5_mix665k.clean.json

For each file: records per image folder (the first part of the image path: coco, gqa, ocr_vqa,
textvqa, vg), missing and unreadable images, records training would refuse (the same check
01/02 run; with --llm also each record rendered and tokenized as that run will, which refuses what
its template or --max-length cannot take), each with record ids; a leading gpt turn (dropped, as
LLaVA drops it: reported, usable); and LLaVA's known trap, OCR-VQA images stored as .gif/.png
where the JSON names a .jpg (LLaVA's README: its OCR-VQA images are all saved as .jpg), or GIF/PNG
data under a .jpg name (reported; it loads). Images
are checked by their header (cheap: one small read per distinct image); --decode decodes each
fully, which also finds truncated files, at the cost of reading every byte. Exit 1 when anything
would stop training or be skipped by --skip-bad-samples; --write-clean FILE writes the records it would accept.
"""
import argparse
import os
import sys
from collections import Counter, defaultdict

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import llava_data  # noqa: E402

# (data file, image folder) of each stage, as 01_pretrain_projector.py and 02_finetune.py default them
STAGES = [("data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "data/LLaVA-Pretrain/images"),
          ("data/llava_v1_5_mix665k.json", "data")]
EXAMPLES = 5  # record ids listed per kind of problem
USABLE = {"not JPEG", "leading gpt turn"}  # findings training accepts: reported, not counted as wrong


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="one LLaVA JSON/JSONL file (default: both stages' files)")
    p.add_argument("--image-folder", help="the folder image paths are relative to (with --data)")
    p.add_argument("--write-clean", metavar="FILE", help="write the records training would accept (with --data)")
    p.add_argument("--decode", action="store_true", help="decode every image fully (finds truncated files; slow)")
    # with --llm, the training flags that decide how a record is tokenized (train.py's defaults)
    p.add_argument("--llm", help="also render and tokenize every record as training with this LLM will "
                   "(hub name, directory or toy preset)")
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--compressor", default="quecc", choices=["quecc", "tokenpacker", "pool", "mlp"])
    p.add_argument("--conv-template", default="auto", choices=("auto", "chat", "vicuna_v1", "plain"))
    p.add_argument("--image-after-question", action="store_true")
    p.add_argument("--stage", type=int, choices=[1, 2], default=2, help="the stage --data trains (its template)")
    args = p.parse_args()
    if (args.image_folder or args.write_clean) and not args.data:
        p.error("--image-folder and --write-clean go with one --data file")
    return args


def image_problem(path, decode):
    """-> None if the image is fine, else (kind, message). OCR-VQA's trap comes two ways: a .jpg
    that is missing while a .gif or .png of that name exists (unusable), and a .jpg holding GIF or
    PNG data ("not JPEG": usable here, PIL reads by content, but worth knowing)."""
    try:
        real = llava_data.check_image(path)
        if decode:
            with Image.open(path) as image:
                image.load()
        if os.path.splitext(path)[1].lower() in (".jpg", ".jpeg") and real != "JPEG":
            return "not JPEG", f"{path} holds {real} data under a .jpg name (loads here: PIL reads by content)"
        return None
    except ValueError as e:
        stem, extension = os.path.splitext(path)
        if extension.lower() == ".jpg" and not os.path.exists(path):
            for other in (".gif", ".png"):
                if os.path.exists(stem + other):
                    return "not .jpg", f"{path} is missing but {stem + other} exists: convert it to JPEG under the .jpg name"
        return ("missing" if not os.path.exists(path) else "unreadable"), str(e)
    except Exception as e:  # a decode error with --decode
        return "unreadable", f"unreadable image {path}: {e}"


def sample_tokenizer(args, stage):
    """-> training's tokenize for a file of this stage (train.sample_tokenizer), or None without --llm."""
    if not args.llm:
        return None
    import train  # torch and transformers: only when asked for
    import vlm
    with vlm.loading("LLM", args.llm):
        tokenizer = vlm.load_tokenizer(args.llm)
    try:
        return train.sample_tokenizer(argparse.Namespace(**vars(args), train_llm=stage == 2), tokenizer)
    except ValueError as e:  # --conv-template chat for a tokenizer without one
        raise SystemExit(f"error: {e}") from None


def check(path, image_folder, decode, tokenize=None):
    """-> (records read, the usable ones' JSON texts, {kind: [(record name, message)]}), printing
    the per-folder table."""
    problems = defaultdict(list)
    checked = {}  # image path -> problem: a COCO image used by several records is read once
    usable = []  # their JSON texts, as the file has them
    per_folder = defaultdict(Counter)
    records = tqdm(llava_data.checked_records(path, tokenize, len(os.sched_getaffinity(0))),
                   desc=os.path.basename(path), mininterval=5)
    for index, record, text, problem in records:
        name = llava_data.record_name(path, index, record)
        if problem:
            problems["refused"].append((name, problem))
            continue
        if llava_data.trained_turns(record["conversations"]) != record["conversations"]:
            problems["leading gpt turn"].append((name, "its first turn is gpt's, an answer to nothing: "
                                                       "dropped, as LLaVA's preprocess drops it"))
        if "image" not in record:
            per_folder["(text only)"]["records"] += 1
            usable.append(text)
            continue
        folder = record["image"].replace("\\", "/").split("/")[0] if "/" in record["image"] else "."
        per_folder[folder]["records"] += 1
        image = os.path.join(image_folder, record["image"])
        if image not in checked:
            checked[image] = image_problem(image, decode)
            per_folder[folder]["images"] += 1
        problem = checked[image]
        if problem:
            kind, message = problem
            per_folder[folder][kind] += 1
            problems[kind].append((name, message))
        if problem is None or problem[0] in USABLE:
            usable.append(text)
    kinds = ["missing", "not .jpg", "unreadable", "not JPEG"]
    print(f"{path}: {records.n} records, {len(usable)} usable; images in {image_folder}")
    print(f"  {'folder':<16}{'records':>10}{'images':>10}" + "".join(f"{k:>12}" for k in kinds))
    for folder, counts in sorted(per_folder.items(), key=lambda item: -item[1]["records"])[:20]:
        print(f"  {folder:<16}{counts['records']:>10}{counts['images']:>10}" + "".join(f"{counts[k]:>12}" for k in kinds))
    if len(per_folder) > 20:
        print(f"  ... and {len(per_folder) - 20} more folders")
    return records.n, usable, problems


def report(problems):
    for kind, found in problems.items():
        print(f"  {kind}: {len(found)} records")
        for name, message in found[:EXAMPLES]:
            print(f"    {name}: {message}")
        if len(found) > EXAMPLES:
            print(f"    ... and {len(found) - EXAMPLES} more")


def main():
    args = parse_args()
    stages = [(args.data, args.image_folder or ".", args.stage)] if args.data else \
        [(path, image_folder, stage) for stage, (path, image_folder) in enumerate(STAGES, 1)]
    wrong = False
    for path, image_folder, stage in stages:
        if not os.path.exists(path):
            print(f"{path}: not found (docs/data.md says where it comes from)")
            wrong = True
            continue
        try:
            count, usable, problems = check(path, image_folder, args.decode, sample_tokenizer(args, stage))
        except llava_data.BadSample as e:  # malformed JSON, with its line
            print(f"error: {e}")
            wrong = True
            continue
        report(problems)
        wrong |= bool(set(problems) - USABLE)
        if args.write_clean:
            with open(args.write_clean, "w") as f:
                f.write("[" + ",".join(usable) + "]")
            print(f"wrote {len(usable)} of {count} records to {args.write_clean}")
    print("problems found" if wrong else "all good")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
