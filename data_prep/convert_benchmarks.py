"""Convert evaluation benchmarks from the layouts they ship in to benchmarks.py's question file.

    python data_prep/convert_benchmarks.py BENCH --src PATH --out questions.jsonl [options]

`image` in the output is relative to the benchmark's image folder (the last column), as in
LLaVA's question files; give that folder to the evaluation as its image folder.

BENCH      --src, the upstream layout                                       image folder
vqav2      v2_OpenEnded_mscoco_val2014_questions.json                         COCO val2014/
           --annotations v2_mscoco_val2014_annotations.json
textvqa    TextVQA_0.5.1_val.json [--ocr TextVQA_Rosetta_OCR_v0.2_val.json],   TextVQA train_images/
           or LLaVA's llava_textvqa_val_v051_ocr.jsonl
           --annotations TextVQA_0.5.1_val.json (LLaVA's exact prompts)
vizwiz     val.json (VizWiz annotations)                                       VizWiz val/
gqa        testdev_balanced_questions.json                                     GQA images/
pope       folder of coco_pope_{adversarial,random,popular}.json label files   COCO val2014/
mme        MME_Benchmark_release_version/ (one folder per subtask)             that folder
scienceqa  folder with problems.json and pid_splits.json [--split test]        SRC/images/SPLIT/
mmbench    mmbench_dev_*.tsv (base64 images) [--rotate] [--images DIR]         DIR (default: next
                                                                               to --out, mmbench_images/)
docvqa     val_v1.0.json ({"data": [{questionId, question, image, answers}]})  the json's folder
chartqa    ChartQA test/ folder with test_human.json, test_augmented.json      SRC/png/
ai2d       JSON list or JSON Lines of {id, image, question, options, answer}   your image folder
           (answer: option index or letter)
mmmu       JSON list or JSON Lines of {id, image (or image_1), question,       your image folder
           options (list or "['a', 'b']"), answer, question_type
           ("multiple-choice"/"open"), subfield (optional)}
mathvista  testmini.json (MathVista's annotation file)                         the json's folder

Only image questions are kept where a benchmark mixes in text-only ones (ScienceQA-IMG).
"""
import argparse
import ast
import base64
import binascii
import csv
import hashlib
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks import (LETTERS, MME_COGNITION, MME_PERCEPTION, SHORT_ANSWER, question_problem,  # noqa: E402
                        read_jsonl)

POPE_ID_OFFSETS = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
MMBENCH_CIRCULAR = 1_000_000  # a circular copy of TSV row i has index i + k * 1e6
MME_QUESTION_SUFFIX = "Please answer yes or no."
LLAVA_OCR_PREFIX = "Reference OCR token: "


class ConversionError(ValueError):
    pass


def load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None


def load_json_lines(path):
    return [row for _, row in read_jsonl(path)]


def load_records(path):
    """A JSON list, a JSON object of records keyed by id, or JSON Lines."""
    if Path(path).suffix == ".jsonl":
        return load_json_lines(path)
    data = load_json(path)
    return [{"id": key, **value} for key, value in data.items()] if isinstance(data, dict) else data


def field(record, key, source):
    if key not in record:
        raise ConversionError(f"{source}: record {record.get('id', '')!r} has no {key!r}")
    return record[key]


def require_arg(value, flag, bench):
    if value is None:
        raise ConversionError(f"{bench} needs {flag}")
    return value


# ---------------------------------------------------------------- VQA-type

def convert_vqav2(args):
    """Official VQA API files: questions {"questions": [...], "data_subtype"} and annotations
    {"annotations": [{question_id, answers: [{answer}], answer_type}]}; COCO file names."""
    questions = load_json(args.src)
    annotations_path = require_arg(args.annotations, "--annotations (v2_mscoco_*_annotations.json)", "vqav2")
    annotations = {a["question_id"]: a for a in load_json(annotations_path)["annotations"]}
    subtype = questions["data_subtype"]
    for question in questions["questions"]:
        annotation = annotations.get(question["question_id"])
        if annotation is None:
            raise ConversionError(f"{annotations_path}: no annotation for question {question['question_id']}")
        yield {"question_id": question["question_id"],
               "image": f"COCO_{subtype}_{question['image_id']:012d}.jpg",
               "question": question["question"], "answers": [a["answer"] for a in annotation["answers"]],
               "category": annotation["answer_type"]}


def textvqa_ocr_tokens(path):
    """image_id -> OCR tokens, from TextVQA_Rosetta_OCR_v0.2_*.json ({"data": [{image_id, ocr_tokens}]})."""
    return {item["image_id"]: item["ocr_tokens"] for item in load_json(path)["data"]}


def convert_textvqa(args):
    if Path(args.src).suffix == ".jsonl":
        yield from textvqa_from_llava(args)
        return
    ocr = textvqa_ocr_tokens(args.ocr) if args.ocr else None
    for item in load_json(args.src)["data"]:
        record = {"question_id": item["question_id"], "image": f"{item['image_id']}.jpg",
                  "question": item["question"], "answers": item["answers"]}
        if ocr is not None:
            record["ocr_tokens"] = field(ocr, item["image_id"], args.ocr)
        yield record


def split_llava_textvqa_text(text, source):
    """LLaVA's TextVQA text: question, "Reference OCR token: a, b", the short-answer line."""
    lines = text.split("\n")
    if len(lines) != 3 or not lines[1].startswith(LLAVA_OCR_PREFIX) or lines[2] != SHORT_ANSWER:
        raise ConversionError(f"{source}: unexpected LLaVA TextVQA text {text!r}")
    tokens = lines[1][len(LLAVA_OCR_PREFIX):]
    return lines[0], tokens.split(", ") if tokens else []


def textvqa_from_llava(args):
    """LLaVA's llava_textvqa_val_v051_ocr.jsonl keeps its question text and OCR tokens; answers and
    unique question ids come from the annotations, matched on (image id, lower-cased question)
    as LLaVA's llava/eval/eval_textvqa.py matches them (its question_id is the image id)."""
    annotations_path = require_arg(args.annotations, "--annotations TextVQA_0.5.1_val.json", "textvqa")
    pending = {}
    for item in load_json(annotations_path)["data"]:
        pending.setdefault((item["image_id"], item["question"].lower()), []).append(item)
    for row in load_json_lines(args.src):
        question, tokens = split_llava_textvqa_text(row["text"], args.src)
        matches = pending.get((row["question_id"], question.lower()))
        if not matches:
            raise ConversionError(f"{annotations_path}: no annotation for image {row['question_id']!r}, "
                                  f"question {question!r}")
        item = matches.pop(0)
        yield {"question_id": item["question_id"], "image": row["image"], "question": question,
               "answers": item["answers"], "ocr_tokens": tokens}


def convert_vizwiz(args):
    """VizWiz annotations: [{image, question, answers: [{answer, answer_confidence}], answer_type}]."""
    for item in load_json(args.src):
        yield {"question_id": Path(item["image"]).stem, "image": item["image"], "question": item["question"],
               "answers": [a["answer"] for a in field(item, "answers", args.src)],
               "category": item["answer_type"]}


def convert_gqa(args):
    """GQA's {question id: {imageId, question, answer, types: {structural, ...}}}; ids as in LLaVA's file."""
    for question_id, item in load_json(args.src).items():
        record = {"question_id": question_id, "image": f"{item['imageId']}.jpg", "question": item["question"],
                  "answers": [field(item, "answer", args.src)]}
        if "types" in item:
            record["category"] = item["types"]["structural"]
        yield record


# ---------------------------------------------------------------- yes/no benchmarks

def convert_pope(args):
    """POPE's label files (JSON Lines {question_id, image, text, label}), one per split; question ids
    offset per split as in LLaVA's llava_pope_test.jsonl, so its answer files score as they are."""
    found = [split for split in POPE_ID_OFFSETS if (Path(args.src) / f"coco_pope_{split}.json").exists()]
    if not found:
        raise ConversionError(f"{args.src}: no coco_pope_{{adversarial,random,popular}}.json")
    for split in found:
        for item in load_json_lines(Path(args.src) / f"coco_pope_{split}.json"):
            yield {"question_id": POPE_ID_OFFSETS[split] + item["question_id"], "image": item["image"],
                   "question": item["text"], "answers": [item["label"]], "category": split}


def mme_folders(subtask_dir):
    """(images, questions) folders: artwork & co. have images/ and questions_answers_YN/."""
    if (subtask_dir / "images").is_dir():
        return subtask_dir / "images", subtask_dir / "questions_answers_YN"
    return subtask_dir, subtask_dir


def mme_image(images_dir, stem, source):
    matches = [p for p in images_dir.glob(f"{stem}.*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if len(matches) != 1:
        raise ConversionError(f"{source}: expected one image named {stem}.* in {images_dir}, found {len(matches)}")
    return matches[0]


def convert_mme(args):
    """MME's release folder: per subtask, one txt per image with lines "question<TAB>Yes|No".
    LLaVA's llava_mme.jsonl drops the trailing "Please answer yes or no." for its short-answer line."""
    root = Path(args.src)
    absent = [name for name in MME_PERCEPTION + MME_COGNITION if not (root / name).is_dir()]
    if absent:
        print(f"warning: {root} lacks MME subtask folders {', '.join(absent)}", file=sys.stderr)
    for subtask in [name for name in MME_PERCEPTION + MME_COGNITION if name not in absent]:
        images_dir, questions_dir = mme_folders(root / subtask)
        for txt in sorted(questions_dir.glob("*.txt")):
            image = mme_image(images_dir, txt.stem, txt).relative_to(root).as_posix()
            with open(txt, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
            for number, line in enumerate(lines):
                parts = line.split("\t")
                if len(parts) != 2:
                    raise ConversionError(f"{txt}:{number + 1}: expected 'question<TAB>answer'")
                question, answer = parts
                if question.endswith(MME_QUESTION_SUFFIX):
                    question = question[:-len(MME_QUESTION_SUFFIX)].rstrip()
                yield {"question_id": f"{image}#{number}", "image": image, "question": question,
                       "answers": [answer], "category": subtask}


# ---------------------------------------------------------------- multiple choice

def convert_scienceqa(args):
    """ScienceQA's problems.json + pid_splits.json; the IMG subset (problems with an image).
    Images: images/SPLIT/<pid>/image.png, as LLaVA lays them out."""
    problems = load_json(Path(args.src) / "problems.json")
    split_ids = field(load_json(Path(args.src) / "pid_splits.json"), args.split, "pid_splits.json")
    text_only = 0
    for pid in split_ids:
        problem = problems[pid]
        if problem["image"] is None:
            text_only += 1
            continue
        record = {"question_id": pid, "image": f"{pid}/{problem['image']}", "question": problem["question"],
                  "options": problem["choices"], "answers": [LETTERS[problem["answer"]]],
                  "category": problem["subject"]}
        if problem["hint"].strip():
            record["hint"] = problem["hint"].strip()
        yield record
    print(f"scienceqa: left out {text_only} text-only problems (SQA-IMG keeps image problems)", file=sys.stderr)


def mmbench_is_none(value):
    """LLaVA's is_none on pandas cells: empty (NaN), 'nan' or 'none' in any case."""
    return value is None or value.strip().lower() in ("", "nan", "none")


def mmbench_image_bytes(rows_by_index, row):
    """VLMEvalKit's TSVs store a repeated image as the index of the row that holds it (<= 64 chars)."""
    data = row["image"]
    if len(data) <= 64:
        data = field(rows_by_index, data.strip(), "MMBench TSV image reference")["image"]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ConversionError(f"MMBench row {row['index']}: image is not base64") from None


def save_mmbench_image(raw, row, images_dir, saved):
    """Write the image bytes as they are, once per distinct image (saved: digest -> name); -> file name."""
    digest = hashlib.sha256(raw).hexdigest()
    if digest not in saved:
        try:
            kind = Image.open(io.BytesIO(raw)).format.lower()
        except UnidentifiedImageError:
            raise ConversionError(f"MMBench row {row['index']}: image cannot be decoded") from None
        name = f"{row['index']}.{'jpg' if kind == 'jpeg' else kind}"
        (images_dir / name).write_bytes(raw)
        saved[digest] = name
    return saved[digest]


def rotations(record, index):
    """LLaVA's --all-rounds order: round k shows the options shifted left by k."""
    options, answer = record["options"], LETTERS.index(record["answers"][0])
    for k in range(1, len(options)):
        yield {**record, "question_id": index + k * MMBENCH_CIRCULAR, "options": options[k:] + options[:k],
               "answers": [LETTERS[(answer - k) % len(options)]]}


def convert_mmbench(args):
    """MMBench TSV (index, question, hint, A-D, answer, category, image=base64). The dev TSV already
    holds the circular copies (index + k*1e6, options rotated); --rotate makes them for a TSV that
    has only the originals. Rows sharing index % 1e6 share circular_index."""
    csv.field_size_limit(sys.maxsize)
    with open(args.src, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if any(mmbench_is_none(r.get("answer")) for r in rows):
        raise ConversionError(f"{args.src}: rows without an answer (the test split cannot be scored here)")
    has_copies = any(int(r["index"]) >= MMBENCH_CIRCULAR for r in rows)
    if args.rotate and has_copies:
        raise ConversionError(f"{args.src} already holds circular copies (index >= 1e6); drop --rotate")
    images_dir = Path(args.images) if args.images else Path(args.out).parent / "mmbench_images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows_by_index, saved = {r["index"].strip(): r for r in rows}, {}
    for row in rows:
        index = int(row["index"])
        options = []
        for letter in "ABCD":
            if mmbench_is_none(row.get(letter)):
                break
            options.append(row[letter])
        record = {"question_id": index, "circular_index": index % MMBENCH_CIRCULAR,
                  "image": save_mmbench_image(mmbench_image_bytes(rows_by_index, row), row, images_dir, saved),
                  "question": row["question"], "options": options, "answers": [row["answer"].strip()]}
        if not mmbench_is_none(row.get("hint")):
            record["hint"] = row["hint"]
        if not mmbench_is_none(row.get("category")):
            record["category"] = row["category"]
        yield record
        if args.rotate:
            yield from rotations(record, index)
    print(f"mmbench: images in {images_dir}", file=sys.stderr)


def option_answer_letter(answer, options, source):
    """An answer given as an option index (int or digits) or a letter -> the letter."""
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
    elif isinstance(answer, str) and answer.strip() in LETTERS[:len(options)]:
        index = LETTERS.index(answer.strip())
    else:
        raise ConversionError(f"{source}: answer {answer!r} is neither an option index nor a letter")
    if not 0 <= index < len(options):
        raise ConversionError(f"{source}: answer {answer!r} outside the {len(options)} options")
    return LETTERS[index]


def parse_list(value):
    """MMMU's options/answers come as lists or as their Python repr ("['a', 'b']")."""
    if isinstance(value, str) and value.strip().startswith("["):
        return [str(v) for v in ast.literal_eval(value)]
    return value if isinstance(value, list) else [value]


def convert_ai2d(args):
    for record in load_records(args.src):
        options = field(record, "options", args.src)
        out = {"question_id": field(record, "id", args.src),
               "image": field(record, "image", args.src), "question": field(record, "question", args.src),
               "options": options, "answers": [option_answer_letter(record["answer"], options, args.src)]}
        if "category" in record:
            out["category"] = record["category"]
        yield out


def convert_mmmu(args):
    for record in load_records(args.src):
        options = parse_list(record.get("options", []))
        out = {"question_id": field(record, "id", args.src), "image": record.get("image") or record["image_1"],
               "question": field(record, "question", args.src)}
        if record.get("question_type", "multiple-choice") == "multiple-choice":
            out.update(options=options, answers=[option_answer_letter(record["answer"], options, args.src)])
        else:
            out["answers"] = parse_list(record["answer"])
        if record.get("subfield"):
            out["category"] = record["subfield"]
        yield out


def convert_mathvista(args):
    """MathVista's testmini.json: {pid: {question, image, choices, unit, precision, answer,
    question_type (multi_choice/free_form), answer_type (text/integer/float/list)}}."""
    for record in load_records(args.src):
        out = {"question_id": record["id"], "image": record["image"], "question": record["question"],
               "answers": [str(record["answer"])], "answer_type": record["answer_type"],
               "category": record["question_type"]}
        if record["question_type"] == "multi_choice":
            out["options"] = record["choices"]
        if record.get("precision") is not None:
            out["precision"] = int(record["precision"])
        if record.get("unit"):
            out["unit"] = record["unit"]
        yield out


# ---------------------------------------------------------------- open-ended OCR benchmarks

def convert_docvqa(args):
    """DocVQA val_v1.0.json: {"data": [{questionId, question, image: "documents/x.png", answers}]}."""
    for item in load_json(args.src)["data"]:
        yield {"question_id": item["questionId"], "image": item["image"], "question": item["question"],
               "answers": field(item, "answers", args.src)}


def convert_chartqa(args):
    """ChartQA test/: test_human.json and test_augmented.json, [{imgname, query, label}]."""
    found = [split for split in ("human", "augmented") if (Path(args.src) / f"test_{split}.json").exists()]
    if not found:
        raise ConversionError(f"{args.src}: no test_human.json or test_augmented.json")
    for split in found:
        for number, item in enumerate(load_json(Path(args.src) / f"test_{split}.json")):
            yield {"question_id": f"{split}-{number}", "image": item["imgname"], "question": item["query"],
                   "answers": [str(item["label"])], "category": split}


# ---------------------------------------------------------------- driver

@dataclass(frozen=True)
class Converter:
    convert: Callable  # args -> iterator of question records
    image_folder: Callable  # args -> what to give the evaluation as image folder


CONVERTERS = {
    "vqav2": Converter(convert_vqav2, lambda a: "the COCO images of the split (val2014/)"),
    "textvqa": Converter(convert_textvqa, lambda a: "TextVQA train_images/"),
    "vizwiz": Converter(convert_vizwiz, lambda a: "VizWiz val/"),
    "gqa": Converter(convert_gqa, lambda a: "GQA images/"),
    "pope": Converter(convert_pope, lambda a: "COCO val2014/"),
    "mme": Converter(convert_mme, lambda a: a.src),
    "scienceqa": Converter(convert_scienceqa, lambda a: os.path.join(a.src, "images", a.split)),
    "mmbench": Converter(convert_mmbench,
                         lambda a: a.images or os.path.join(os.path.dirname(a.out), "mmbench_images")),
    "docvqa": Converter(convert_docvqa, lambda a: os.path.dirname(a.src)),
    "chartqa": Converter(convert_chartqa, lambda a: os.path.join(a.src, "png")),
    "ai2d": Converter(convert_ai2d, lambda a: "the folder the records' image paths are relative to"),
    "mmmu": Converter(convert_mmmu, lambda a: "the folder the records' image paths are relative to"),
    "mathvista": Converter(convert_mathvista, lambda a: os.path.dirname(a.src)),
}


def check_records(records):
    """Every record must load with benchmarks.load_questions: valid fields, unique ids."""
    seen = set()
    for record in records:
        problem = question_problem(record)
        if problem:
            raise ConversionError(f"question {record.get('question_id')!r}: {problem}")
        if str(record["question_id"]) in seen:
            raise ConversionError(f"question_id {record['question_id']!r} occurs twice")
        seen.add(str(record["question_id"]))


def convert(bench, args):
    records = list(CONVERTERS[bench].convert(args))
    if not records:
        raise ConversionError(f"{args.src}: no questions found")
    check_records(records)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return records


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(CONVERTERS))
    parser.add_argument("--src", required=True, help="the benchmark's file or folder (see above)")
    parser.add_argument("--out", required=True, help="question file to write (JSON Lines)")
    parser.add_argument("--annotations", help="vqav2: annotations json; textvqa from LLaVA's jsonl: TextVQA json")
    parser.add_argument("--ocr", help="textvqa: Rosetta OCR json, for LLaVA's 'Reference OCR token' line")
    parser.add_argument("--split", default="test", help="scienceqa: split in pid_splits.json")
    parser.add_argument("--rotate", action="store_true", help="mmbench: make the circular copies")
    parser.add_argument("--images", help="mmbench: folder for the decoded images")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        records = convert(args.benchmark, args)
    except (OSError, KeyError, ValueError) as error:
        detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        sys.exit(f"error: {args.benchmark} ({args.src}): {detail}")
    categories = Counter(r["category"] for r in records if "category" in r)
    print(f"{args.benchmark}: {len(records)} questions -> {args.out}")
    if categories:
        print("  " + ", ".join(f"{name}: {count}" for name, count in sorted(categories.items())))
    print(f"  image folder: {CONVERTERS[args.benchmark].image_folder(args)}")


if __name__ == "__main__":
    main()
