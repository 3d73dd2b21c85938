"""data_prep/convert_benchmarks.py on small fixtures in the exact upstream layouts
(tests/fixtures/bench/): the records written, the prompts they give (checked against the text of
LLaVA's own question files), and the errors for layouts that cannot be converted."""
import base64
import io
import json
import os
import sys
import warnings

import pytest
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data_prep"))
import benchmarks as B  # noqa: E402
import convert_benchmarks as C  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "bench")
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def fixture(*parts):
    return os.path.join(FIXTURES, *parts)


def convert(tmp_path, bench, src, *flags):
    out = str(tmp_path / f"{bench}.jsonl")
    C.main([bench, "--src", src, "--out", out, *flags])
    return B.load_questions(out)


def by_id(records):
    return {r["question_id"]: r for r in records}


def answer_file(texts):
    return [{"question_id": k, "prompt": "", "text": v, "answer_id": "", "model_id": "m", "metadata": {}}
            for k, v in texts.items()]


# ---------------------------------------------------------------- VQA-type

def test_vqav2_from_the_official_question_and_annotation_files(tmp_path):
    records = convert(tmp_path, "vqav2", fixture("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json"),
                      "--annotations", fixture("vqav2", "v2_mscoco_val2014_annotations.json"))
    assert records == [
        {"question_id": 42000, "image": "COCO_val2014_000000000042.jpg", "question": "How many dogs are there?",
         "answers": ["2"] * 7 + ["3"] * 3, "category": "number"},
        {"question_id": 73001, "image": "COCO_val2014_000000000073.jpg", "question": "Is the man happy?",
         "answers": ["yes"] * 9 + ["no"], "category": "yes/no"}]
    metrics = B.score("vqav2", records, answer_file({42000: "Two", 73001: "no"}))
    # "Two" -> "2": 7 matches -> 1.0; "no": 1 match -> 0.3 (9 subsets see it once); mean 0.65
    assert metrics["accuracy"] == pytest.approx(65.0)


def test_vqav2_needs_the_annotations(tmp_path):
    with pytest.raises(SystemExit, match="vqav2 needs --annotations"):
        convert(tmp_path, "vqav2", fixture("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json"))


def test_textvqa_from_the_official_file_with_rosetta_ocr(tmp_path):
    records = convert(tmp_path, "textvqa", fixture("textvqa", "TextVQA_0.5.1_val.json"),
                      "--ocr", fixture("textvqa", "TextVQA_Rosetta_OCR_v0.2_val.json"))
    assert [r["question_id"] for r in records] == [34602, 34603]
    assert records[0]["answers"] == ["dakota"] * 8 + ["dakota digital", "nous les gosses"]
    assert B.build_prompt("textvqa", records[0]) == (
        "what is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use, Camera" + SHORT)


def test_textvqa_from_llava_question_file_reproduces_its_prompts(tmp_path):
    src = fixture("textvqa", "llava_textvqa_val_v051_ocr.jsonl")
    records = convert(tmp_path, "textvqa", src, "--annotations", fixture("textvqa", "TextVQA_0.5.1_val.json"))
    llava = [json.loads(line) for line in open(src)]
    # unique ids from the annotations (LLaVA's question_id is the image id), LLaVA's exact text
    assert [r["question_id"] for r in records] == [34602, 34603]
    assert [B.build_prompt("textvqa", r) for r in records] == [row["text"] for row in llava]
    assert records[1]["answers"] == ["copenhagen"] * 6 + ["thursday"] * 4


def test_vizwiz_annotations(tmp_path):
    records = convert(tmp_path, "vizwiz", fixture("vizwiz", "val.json"))
    assert [(r["question_id"], r["image"], r["category"]) for r in records] == [
        ("VizWiz_val_00000000", "VizWiz_val_00000000.jpg", "unanswerable"),
        ("VizWiz_val_00000001", "VizWiz_val_00000001.jpg", "other")]
    assert records[0]["answers"] == ["unanswerable"] * 9 + ["cornflakes"]


def test_gqa_testdev_balanced(tmp_path):
    records = convert(tmp_path, "gqa", fixture("gqa", "testdev_balanced_questions.json"))
    assert records == [
        {"question_id": "201307251", "image": "n161313.jpg", "question": "Is it overcast?", "answers": ["no"],
         "category": "verify"},
        {"question_id": "201640614", "image": "n235859.jpg", "question": "Who is wearing the dress?",
         "answers": ["woman"], "category": "query"}]


# ---------------------------------------------------------------- POPE and MME

def test_pope_label_files_get_llavas_question_ids(tmp_path):
    records = convert(tmp_path, "pope", fixture("pope"))
    # llava_pope_test.jsonl: adversarial ids as they are, random + 1e7, popular + 2e7
    assert [(r["question_id"], r["category"], r["answers"][0]) for r in records] == [
        (1, "adversarial", "yes"), (2, "adversarial", "no"), (3, "adversarial", "no"),
        (10000001, "random", "yes"), (10000002, "random", "no"),
        (20000001, "popular", "no"), (20000002, "popular", "yes")]
    assert B.build_prompt("pope", records[0]) == "Is there a snowboard in the image?" + SHORT
    answers = answer_file({1: "Yes", 2: "No", 3: "Yes", 10000001: "Yes", 10000002: "No",
                           20000001: "No", 20000002: "No"})
    metrics = B.score("pope", records, answers)
    # adversarial TP 1, FP 1, TN 1: precision 1/2, recall 1, F1 2/3; random: F1 1;
    # popular TN 1, FN 1: nothing said yes -> F1 0; mean F1 = (2/3 + 1 + 0) / 3 = 5/9
    assert metrics["mean_f1"] == pytest.approx(100 * 5 / 9)


def test_mme_release_folder(tmp_path):
    src = fixture("mme", "MME_Benchmark_release_version")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = convert(tmp_path, "mme", src)
    assert [(r["question_id"], r["category"], r["answers"][0]) for r in records] == [
        ("existence/000000006040.jpg#0", "existence", "Yes"), ("existence/000000006040.jpg#1", "existence", "No"),
        ("artwork/images/10002.jpg#0", "artwork", "Yes"), ("artwork/images/10002.jpg#1", "artwork", "No"),
        ("code_reasoning/0020.png#0", "code_reasoning", "Yes"), ("code_reasoning/0020.png#1", "code_reasoning", "No")]
    assert all(os.path.isfile(os.path.join(src, r["image"])) for r in records)
    # llava_mme.jsonl's text: "Please answer yes or no." (also after two spaces) becomes the short-answer line
    assert B.build_prompt("mme", records[0]) == "Is there a train in this image?" + SHORT
    assert records[3]["question"] == "Does this artwork exist in the form of glassware?"
    with pytest.warns(UserWarning, match="11 of 14 subtasks"):
        metrics = B.score("mme", records, answer_file({r["question_id"]: r["answers"][0] for r in records}))
    # all right: 200 per subtask; perception existence + artwork = 400, cognition code_reasoning = 200
    assert (metrics["perception"], metrics["cognition"], metrics["total"]) == (400.0, 200.0, 600.0)


# ---------------------------------------------------------------- multiple choice

def test_scienceqa_keeps_the_image_problems_of_the_split(tmp_path):
    records = convert(tmp_path, "scienceqa", fixture("scienceqa"))
    assert [r["question_id"] for r in records] == ["46", "95"]  # "4" is text-only, "7" is train
    assert records[0] == {"question_id": "46", "image": "46/image.png",
                          "question": "Which property do these three objects have in common?",
                          "options": ["shiny", "slippery", "opaque"], "answers": ["C"],
                          "category": "natural science", "hint": "Select the best answer."}
    # llava_test_CQM-A.json's text for problem 46, plus model_vqa_science's --single-pred-prompt line
    assert B.build_prompt("scienceqa", records[0]) == (
        "Context: Select the best answer.\nWhich property do these three objects have in common?\n"
        "A. shiny\nB. slippery\nC. opaque" + LETTER)
    assert B.build_prompt("scienceqa", records[1]).startswith("Which of these states is farthest north?\nA. Maine")


def test_mmbench_tsv_with_circular_copies_and_base64_images(tmp_path):
    images = tmp_path / "images"
    records = convert(tmp_path, "mmbench", fixture("mmbench", "mmbench_dev.tsv"), "--images", str(images))
    assert [(r["question_id"], r["circular_index"], r["options"], r["answers"][0]) for r in records] == [
        (241, 241, ["cat", "dog"], "B"), (1000241, 241, ["dog", "cat"], "A"),
        (252, 252, ["red", "blue", "green"], "B"), (1000252, 252, ["blue", "green", "red"], "A"),
        (2000252, 252, ["green", "red", "blue"], "C")]
    # row 1000241 names row 241 as its image; the three 252 rows repeat one JPEG: 2 files
    assert [r["image"] for r in records] == ["241.png"] * 2 + ["252.jpg"] * 3
    assert sorted(os.listdir(images)) == ["241.png", "252.jpg"]
    assert Image.open(images / "241.png").size == (2, 2)
    assert "hint" not in records[0]  # "nan" is no hint
    assert B.build_prompt("mmbench", records[2]) == (
        "Look at the top.\nWhat colour is the sky?\nA. red\nB. blue\nC. green" + LETTER)


def test_mmbench_rotate_makes_llavas_all_rounds_copies(tmp_path):
    dev = convert(tmp_path, "mmbench", fixture("mmbench", "mmbench_dev.tsv"), "--images", str(tmp_path / "a"))
    rotated = convert(tmp_path, "mmbench", fixture("mmbench", "mmbench_originals.tsv"), "--rotate",
                      "--images", str(tmp_path / "b"))
    assert rotated == dev
    with pytest.raises(SystemExit, match="already holds circular copies"):
        convert(tmp_path, "mmbench", fixture("mmbench", "mmbench_dev.tsv"), "--rotate",
                "--images", str(tmp_path / "c"))


def test_mmbench_test_split_without_answers_is_refused(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, "PNG")
    tsv = tmp_path / "mmbench_test.tsv"
    tsv.write_text("index\tquestion\thint\tA\tB\tanswer\timage\n"
                   f"1\tWhich?\tnan\tx\ty\t\t{base64.b64encode(png.getvalue()).decode()}\n")
    with pytest.raises(SystemExit, match="rows without an answer"):
        convert(tmp_path, "mmbench", str(tsv), "--images", str(tmp_path / "i"))


def test_ai2d_mmmu_and_mathvista_records(tmp_path):
    ai2d = convert(tmp_path, "ai2d", fixture("ai2d", "ai2d.jsonl"))
    assert [(r["options"], r["answers"]) for r in ai2d] == [
        (["larva", "adult", "pupa", "egg"], ["A"]), (["rabbit", "hawk"], ["B"])]  # index "0" and letter "B"
    mmmu = by_id(convert(tmp_path, "mmmu", fixture("mmmu", "mmmu_val.jsonl")))
    assert mmmu["validation_Art_1"]["options"] == ["Monet", "Manet", "Degas", "Renoir"]
    assert mmmu["validation_Art_1"]["image"] == "validation_Art_1.png"
    assert "options" not in mmmu["validation_Math_2"] and mmmu["validation_Math_2"]["answers"] == ["3.5", "7/2"]
    mathvista = by_id(convert(tmp_path, "mathvista", fixture("mathvista", "testmini.json")))
    assert mathvista["1"]["options"] == ["true", "false"] and mathvista["1"]["answers"] == ["false"]
    assert (mathvista["2"]["unit"], mathvista["3"]["precision"]) == ("g", 2)
    metrics = B.score("mathvista", list(mathvista.values()), answer_file({"1": "B", "2": "1000", "3": "0.7"}))
    assert metrics["accuracy"] == pytest.approx(200 / 3)  # "0.7" is not 0.67
    assert metrics["per_category"] == pytest.approx({"free_form": 50.0, "multi_choice": 100.0})


# ---------------------------------------------------------------- OCR-heavy sets

def test_docvqa_and_chartqa(tmp_path):
    docvqa = convert(tmp_path, "docvqa", fixture("docvqa", "val_v1.0.json"))
    assert [(r["question_id"], r["image"]) for r in docvqa] == [
        (49153, "documents/pybv0228_81.png"), (24581, "documents/nkbl0226_1.png")]
    assert len(docvqa[1]["answers"]) == 3
    chartqa = convert(tmp_path, "chartqa", fixture("chartqa", "test"))
    assert [(r["question_id"], r["category"], r["answers"]) for r in chartqa] == [
        ("human-0", "human", ["14"]), ("augmented-0", "augmented", ["12%"]), ("augmented-1", "augmented", ["Brazil"])]


# ---------------------------------------------------------------- bad input

def test_duplicate_ids_and_broken_files_are_reported(tmp_path):
    rows = [{"id": "x", "image": "i.png", "question": "?", "options": ["a", "b"], "answer": 0}] * 2
    duplicate = tmp_path / "dup.jsonl"
    duplicate.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="question_id 'x' occurs twice"):
        convert(tmp_path, "ai2d", str(duplicate))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "x"}\n{oops\n')
    with pytest.raises(SystemExit, match=r"broken\.jsonl:2: not valid JSON"):
        convert(tmp_path, "ai2d", str(broken))
    bad_answer = tmp_path / "bad.jsonl"
    bad_answer.write_text(json.dumps(rows[0] | {"answer": 5}) + "\n")
    with pytest.raises(SystemExit, match="answer 5 outside the 2 options"):
        convert(tmp_path, "ai2d", str(bad_answer))
    with pytest.raises(SystemExit, match="no coco_pope_"):
        convert(tmp_path, "pope", str(tmp_path))
