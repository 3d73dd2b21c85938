"""benchmarks.py: every scorer against hand-computed values, the official normalisation rules and
parsing quirks one by one, the prompts LLaVA-1.5 sends, and the bad-input messages."""
import json
import os
import random
import sys
import warnings

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import benchmarks as B  # noqa: E402


def q(question_id, answers, **extra):
    return {"question_id": question_id, "image": f"{question_id}.jpg", "question": "?", "answers": answers, **extra}


def a(question_id, text):
    return {"question_id": question_id, "prompt": "", "text": text, "answer_id": "x", "model_id": "m", "metadata": {}}


def score_quietly(bench, questions, answers):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return B.score(bench, questions, answers)


# ---------------------------------------------------------------- VQA accuracy

@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"),                          # lower case
    ("red, white", "red white"),             # commas dropped
    ("what?", "what"),                       # question marks dropped
    ("man's hat", "man 's hat"),             # possessive 's split off
    ("red-white", "red white"),              # a mark inside a word becomes a space
    ("red - white", "red white"),            # a mark touching a space is deleted
    ("wow!", "wow"),                         # trailing mark: replaced by a space, then split away
    ("hello.world", "helloworld"),           # periods not followed by a digit go ...
    ("2.5", "2.5"),                          # ... but decimal points stay
    ("ten.", "10"),                          # number words to digits
    ("none", "0"),
    ("the cat", "cat"),                      # articles dropped
    ("a an the dog", "dog"),
    ("dont", "don't"),                       # contractions restored
    ("isnt it", "isn't it"),
    ("Im", "im"),                            # the official table's capitalised keys never match
    ("two\tdogs\n", "2 dogs"),               # tabs and newlines are spaces
    ("3,000", "3000"),
])
def test_vqa_normalization_rules(text, expected):
    assert B.vqa_normalize(text) == expected


@pytest.mark.parametrize("prediction, answers, expected", [
    # 3 of 10 match: the 3 matching subsets see 2 others (2/3), the 7 others see 3 (1):
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    ("blue", ["blue"] * 3 + ["navy"] * 7, 0.9),
    # 1 of 10: its own subset sees 0 (0), the 9 others see 1 (1/3): 9 * 1/3 / 10 = 0.3
    ("blue", ["blue"] + ["navy"] * 9, 0.3),
    # 4 of 10: every subset sees at least 3: 1.0
    ("blue", ["blue"] * 4 + ["navy"] * 6, 1.0),
    # after normalisation "Two." == "2": 2 matches: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    ("Two.", ["2", "2"] + ["3"] * 8, 0.6),
    ("purple", ["blue"] * 10, 0.0),
])
def test_vqa_accuracy_leave_one_out(prediction, answers, expected):
    assert B.vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_scorer_per_category_and_missing():
    questions = [q(1, ["2"] * 10, category="number"), q(2, ["yes"] * 3 + ["no"] * 7, category="yes/no"),
                 q(3, ["red"] * 10, category="other")]
    with pytest.warns(UserWarning, match="1 of 3 questions have no answer"):
        m = B.score("vqav2", questions, [a(1, "two"), a(2, "Yes")])
    # q1: 1.0, q2: 0.9 (3 of 10, above), q3: missing -> 0; mean = 1.9 / 3
    assert m["accuracy"] == pytest.approx(100 * 1.9 / 3)
    assert m["per_category"] == pytest.approx({"number": 100.0, "yes/no": 90.0, "other": 0.0})
    assert (m["headline"], m["missing"], m["n_questions"]) == ("accuracy", 1, 3)
    assert m["normalized"] == pytest.approx(1.9 / 3)


def test_vqa_needs_ten_answers():
    with pytest.raises(ValueError, match="1 question.* without exactly 10 human answers, e.g. 7"):
        B.score("textvqa", [q(7, ["a"] * 9)], [a(7, "a")])


# ---------------------------------------------------------------- GQA and the toy world

def test_gqa_exact_match():
    questions = [q(1, ["yes"]), q(2, ["woman"]), q(3, ["woman"]), q(4, ["left"])]
    answers = [a(1, "Yes."), a(2, "woman "), a(3, "the woman"), a(4, "left.\n")]
    # "Yes." -> "yes" right; "woman " stripped, right; articles are not dropped: wrong;
    # "left.\n" is stripped to "left." then loses the period: right -> 3 / 4
    assert score_quietly("gqa", questions, answers)["accuracy"] == pytest.approx(75.0)


def test_toy_exact_match_per_question_type():
    questions = [q("a-count", ["three"], category="count"), q("b-count", ["two"], category="count"),
                 q("a-position", ["top left"], category="position"), q("a-ocr", ["cat"], category="ocr")]
    answers = [a("a-count", "Three"), a("b-count", "2"), a("a-position", "top left."), a("a-ocr", "cat")]
    m = B.score("toy_reasoning", questions, answers)
    # count: 1 of 2 ("2" is not "two"), position 1/1, ocr 1/1 -> 3 of 4 overall
    assert m["accuracy"] == pytest.approx(75.0)
    assert m["per_category"] == pytest.approx({"count": 50.0, "ocr": 100.0, "position": 100.0})
    assert B.score("toy_ocr", questions, answers)["accuracy"] == m["accuracy"]


# ---------------------------------------------------------------- POPE

@pytest.mark.parametrize("text, says_no", [
    ("No", True), ("no", True), ("No.", True), ("No, there is no dog.", True),
    ("There is not a dog in the image.", True), ("I see no dog", True),
    ("NO", False),                # case-sensitive words: "NO" reads as yes
    ("Nope", False),              # not a listed word
    ("Yes. No", False),           # only the first sentence counts
    ("Yes, no doubt", True),      # commas dropped, "no" is a word
    ("no\ndog", False),           # split on single spaces only: "no\ndog" is one word
    ("Not sure", False),          # "Not" is not "not"
    ("", False),                  # nothing reads as yes
])
def test_pope_yes_no_parsing(text, says_no):
    assert B.pope_says_no(text) is says_no


def test_pope_metrics_per_split_and_mean_f1():
    labels = {"adversarial": ["yes", "no", "no", "yes"], "random": ["yes", "no"]}
    questions = [q(f"{s}{i}", [lab], category=s) for s, ls in labels.items() for i, lab in enumerate(ls)]
    answers = [a("adversarial0", "Yes"), a("adversarial1", "Yes, there is."), a("adversarial2", "No"),
               a("adversarial3", "There is no person."), a("random0", "yes"), a("random1", "No.")]
    m = B.score("pope", questions, answers)
    adversarial = m["per_category"]["adversarial"]
    # adversarial: TP=1 (0), FP=1 (1), TN=1 (2), FN=1 (3): accuracy 2/4, precision 1/2, recall 1/2,
    # F1 = 2 * .5 * .5 / (.5 + .5) = .5, yes ratio 2/4
    assert (adversarial["tp"], adversarial["fp"], adversarial["tn"], adversarial["fn"]) == (1, 1, 1, 1)
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert adversarial[key] == pytest.approx(50.0)
    # random: both right: F1 100, yes ratio 1/2; mean F1 = (50 + 100) / 2
    assert m["per_category"]["random"]["f1"] == pytest.approx(100.0)
    assert m["per_category"]["random"]["yes_ratio"] == pytest.approx(50.0)
    assert m["mean_f1"] == pytest.approx(75.0) and m["normalized"] == pytest.approx(0.75)
    assert m["mean_accuracy"] == pytest.approx(75.0)


def test_pope_missing_answer_is_the_wrong_label_and_no_yes_does_not_divide_by_zero():
    questions = [q(1, ["yes"], category="random"), q(2, ["no"], category="random")]
    m = score_quietly("pope", questions, [a(2, "no")])
    split = m["per_category"]["random"]
    # the missing "yes" question becomes a false negative; nothing predicted yes: precision 0, F1 0
    assert (split["tp"], split["fp"], split["tn"], split["fn"]) == (0, 0, 1, 1)
    assert (split["precision"], split["f1"], split["accuracy"]) == (0.0, 0.0, 50.0)
    assert m["missing"] == 1


# ---------------------------------------------------------------- MME

@pytest.mark.parametrize("text, label", [
    ("Yes", "yes"), ("no", "no"), ("Yes.", "yes"), ("Yes, it is.", "yes"),
    ("Not sure", "no"),       # "no" inside the first 4 characters "not "
    ("Nope", "no"),
    ("I think yes", "other"),  # neither within "i th"
    ("Maybe", "other"),
    ("yesno", "yes"),          # "yes" is looked for first
])
def test_mme_answer_parsing(text, label):
    assert B.mme_label(text) == label


def test_mme_accuracy_plus_and_totals():
    questions = [q("e1a", ["Yes"], image="e1.jpg", category="existence"),
                 q("e1b", ["No"], image="e1.jpg", category="existence"),
                 q("e2a", ["Yes"], image="e2.jpg", category="existence"),
                 q("e2b", ["No"], image="e2.jpg", category="existence"),
                 q("c1a", ["Yes"], image="c1.png", category="code_reasoning"),
                 q("c1b", ["No"], image="c1.png", category="code_reasoning")]
    answers = [a("e1a", "Yes"), a("e1b", "No"), a("e2a", "Yes"), a("e2b", "Yes"),
               a("c1a", "Not sure"), a("c1b", "no")]
    with pytest.warns(UserWarning, match="12 of 14 subtasks have no questions"):
        m = B.score("mme", questions, answers)
    # existence: 3 of 4 right (75) + images with both right 1 of 2 (50) = 125
    assert m["per_category"]["existence"] == pytest.approx({"score": 125.0, "accuracy": 75.0, "accuracy_plus": 50.0})
    # code_reasoning: "Not sure" reads "no" against Yes: 1 of 2 (50) + 0 of 1 images (0) = 50
    assert m["per_category"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert (m["perception"], m["cognition"], m["total"]) == pytest.approx((125.0, 50.0, 175.0))
    assert m["normalized"] == pytest.approx(175 / 2800)


def test_mme_rejects_images_without_two_questions():
    questions = [q("x", ["Yes"], image="e1.jpg", category="existence")]
    with pytest.raises(ValueError, match="1 MME image.* without exactly 2 questions, e.g. 'existence/e1.jpg'"):
        score_quietly("mme", questions, [a("x", "yes")])


# ---------------------------------------------------------------- ScienceQA-IMG

@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("B. slippery", "B"), ("The answer is C.", "C"),
    ("The answer is C", None),                     # the regex needs a character after the letter
    ("The answer is A. The answer is B.", None),   # more than one match
    ("a", None), ("(A)", None), ("opaque", None),
])
def test_sqa_answer_parsing(text, letter):
    assert B.sqa_letter(text) == letter


def test_sqa_accuracy():
    questions = [q("46", ["C"], options=["shiny", "slippery", "opaque"]), q("95", ["A"], options=["x", "y"]),
                 q("96", ["A"], options=["x", "y"])]
    answers = [a("46", "The answer is C. Because..."), a("95", "E"), a("96", " A ")]
    # 46 right; 95: "E" is not one of its 2 options; 96: stripped to "A", right -> 2 of 3
    assert B.score("scienceqa", questions, answers)["accuracy"] == pytest.approx(200 / 3)


# ---------------------------------------------------------------- MMBench and AI2D

@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(C)", "C"), ("The answer is B.", "B"), ("B: dog", "B"),
    ("A dog", "A"),        # the article reads as option A, as in VLMEvalKit
    ("B or C", None),      # two letters: no answer from letters ...
    ("blue", "B"),         # ... then the option text
    ("blue or green", None),
    ("purple", None),
    ("Z", "Z"),            # a lone "Z" means no option, and stops the text matching ...
    ("Z: blue", "Z"),
    ("Cannot determine the answer, maybe blue", "Z"),  # ... as do VLMEvalKit's refusal phrases
])
def test_option_matching(text, letter):
    assert B.chosen_option({"options": ["red", "blue", "green"]}, text) == letter


def test_mmbench_circular_evaluation():
    rows = [(241, 241, ["cat", "dog"], "B", "loc"), (1000241, 241, ["dog", "cat"], "A", "loc"),
            (252, 252, ["red", "blue", "green"], "B", "attr"), (1000252, 252, ["blue", "green", "red"], "A", "attr"),
            (2000252, 252, ["green", "red", "blue"], "C", "attr")]
    questions = [q(i, [ans], options=opts, circular_index=c, category=cat) for i, c, opts, ans, cat in rows]
    answers = [a(241, "B"), a(1000241, "dog"), a(252, "B"), a(1000252, "A"), a(2000252, "A")]
    m = B.score("mmbench", questions, answers)
    # group 241: both rotations right -> hit; group 252: the last rotation is wrong -> miss
    assert m["accuracy"] == pytest.approx(50.0) and m["n_circular_groups"] == 2
    # without rotations both original rows (241, 252) are right
    assert m["vanilla_accuracy"] == pytest.approx(100.0)
    assert m["per_category"] == pytest.approx({"attr": 0.0, "loc": 100.0})


def test_ai2d_option_letter():
    questions = [q(1, ["A"], options=["larva", "pupa"]), q(2, ["B"], options=["rabbit", "hawk"])]
    # "A" right; "rabbit" is option A, the answer is B: wrong -> 50
    assert B.score("ai2d", questions, [a(1, "A"), a(2, "rabbit")])["accuracy"] == pytest.approx(50.0)


def test_multiple_choice_answers_must_be_option_letters():
    with pytest.raises(ValueError, match="1 question.* with an answer that is not one of their letters"):
        B.score("mmbench", [q(1, ["C"], options=["x", "y"])], [a(1, "A")])


# ---------------------------------------------------------------- DocVQA ANLS and ChartQA

@pytest.mark.parametrize("prediction, references, expected", [
    ("0.28", ["0.28"], 1.0),
    # one edit over 25 characters: 1 - 1/25
    ("university of california.", ["university of california"], 1 - 1 / 25),
    ("University of California", ["university of california"], 1.0),   # case-insensitive
    ("university  of california", ["university of california"], 1.0),  # whitespace collapsed: distance 0
    # distance 2 (collapsed texts), divided by the raw length 25 of the double-spaced reference
    ("universty of californa", ["university  of california"], 1 - 2 / 25),
    ("abcd", ["ab"], 0.5),                  # exactly 0.5 is kept
    ("abcde", ["ab"], 0.0),                 # 1 - 3/5 = 0.4 < 0.5 -> 0
    ("dallas", ["houston", "dallas tx"], 1 - 3 / 9),  # the best reference counts
])
def test_anls(prediction, references, expected):
    assert B.anls(prediction, references) == pytest.approx(expected)


@pytest.mark.parametrize("target, prediction, correct", [
    ("14", "14.5", True),      # |14.5 - 14| / 14 = 3.6% <= 5%
    ("14", "15", False),       # 1 / 14 = 7.1%
    ("12%", "0.12", True),     # "12%" is 0.12
    ("12%", "12", False),
    ("Brazil", "brazil", True),
    ("0", "0.0", False),       # a zero target falls back to exact string match
    ("14", "fourteen", False),
])
def test_chartqa_relaxed_correctness(target, prediction, correct):
    assert B.relaxed_correct(target, prediction) is correct


def test_docvqa_and_chartqa_scores():
    docvqa = B.score("docvqa", [q(1, ["0.28"]), q(2, ["ab"])], [a(1, "0.28"), a(2, "abcd")])
    assert docvqa["anls"] == pytest.approx(75.0) and docvqa["headline"] == "anls"  # (1 + 0.5) / 2
    chartqa = B.score("chartqa", [q(1, ["14"], category="human"), q(2, ["12%"], category="augmented")],
                      [a(1, "14.5"), a(2, "12")])
    assert chartqa["relaxed_accuracy"] == pytest.approx(50.0)
    assert chartqa["per_category"] == pytest.approx({"augmented": 0.0, "human": 100.0})


# ---------------------------------------------------------------- MMMU and MathVista

MMMU_OPTIONS = ["Monet", "Manet", "Degas", "Renoir"]


@pytest.mark.parametrize("response, letter", [
    ("(B)", "B"), ("B", "B"), ("C.", "C"),
    ("The answer is C because of the brushwork.", "C"),
    ("A or B, probably B", "B"),              # several letters: the one mentioned last
    ("(A) is wrong, (D) is right", "D"),
    ("I am fairly sure this was painted by Degas", "C"),  # > 5 words: option text
    ("Degas", None),                          # <= 5 words and no letter: guessed
])
def test_mmmu_option_parsing(response, letter):
    rng = random.Random(0)
    parsed, guessed = B.mmmu_choice(response, MMMU_OPTIONS, rng)
    assert guessed is (letter is None)
    if letter is not None:
        assert parsed == letter


def test_mmmu_guess_follows_the_official_seed():
    questions = [q(1, ["C"], options=MMMU_OPTIONS), q(2, ["3.5", "7/2"])]
    m = B.score("mmmu", questions, [a(1, "no idea"), a(2, "so x = 3.5")])
    guess = random.Random(42).choice("ABCD")  # the official code seeds random with 42
    # the open answer is right ("=" tail 3.5 equals the reference 3.5)
    assert m["guessed"] == 1
    assert m["accuracy"] == pytest.approx(100.0 if guess == "C" else 50.0)


@pytest.mark.parametrize("response, references, correct", [
    ("x = 3.5", ["3.5"], True),
    ("The answer is 7/2", ["3.5", "7/2"], True),     # a reference string inside the prediction
    ("3.50", ["3.5"], True),                         # numbers compare as values (2 decimals)
    ("1,000", ["1000"], True),
    ("4", ["3.5"], False),
    ("b", ["b"], True),                              # single characters are padded before matching
])
def test_mmmu_open_answers(response, references, correct):
    assert B.mmmu_open_correct(response, references) is correct


MATHVISTA = [q("1", ["false"], options=["true", "false"], answer_type="text"),
             q("2", ["1000"], answer_type="integer", unit="g"),
             q("3", ["0.67"], answer_type="float", precision=2)]


@pytest.mark.parametrize("question, response, correct", [
    (MATHVISTA[0], "B", True), (MATHVISTA[0], "(B)", True), (MATHVISTA[0], "false", True),
    (MATHVISTA[0], "(A) true", False),
    (MATHVISTA[0], "False.", True),                # not a choice or letter: closest choice by edit distance
    (MATHVISTA[0], "", False),                     # empty: the closest (shortest) choice, "true"
    (MATHVISTA[1], "1000", True), (MATHVISTA[1], "1000.0", True),  # int(float(...))
    (MATHVISTA[1], "about 1000 g", False),         # needs the GPT extraction that is not run
    (MATHVISTA[2], "0.666", True),                 # rounded to precision 2
    (MATHVISTA[2], 'The answer is "0.67".', True),  # the quick extraction
    (MATHVISTA[2], "0.7", False),
])
def test_mathvista_extraction_and_normalisation(question, response, correct):
    assert B.mathvista_correct(question, response) is correct


# ---------------------------------------------------------------- prompts

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


@pytest.mark.parametrize("bench, record, prompt", [
    # LLaVA's llava_pope_test.jsonl and llava_mme.jsonl texts
    ("pope", q(1, ["yes"], question="Is there a snowboard in the image?"),
     "Is there a snowboard in the image?" + SHORT),
    ("mme", q(1, ["Yes"], question="Is a python code shown in the picture?"),
     "Is a python code shown in the picture?" + SHORT),
    # LLaVA's llava_textvqa_val_v051_ocr.jsonl: the OCR line, even when empty
    ("textvqa", q(1, ["a"], question="What is the time?", ocr_tokens=["N", "u", "g0"]),
     "What is the time?\nReference OCR token: N, u, g0" + SHORT),
    ("textvqa", q(1, ["a"], question="What is the time?", ocr_tokens=[]),
     "What is the time?\nReference OCR token: " + SHORT),
    ("vizwiz", q(1, ["a"], question="What is this?"),
     "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT),
    # model_vqa_mmbench.py: hint, question, options, --single-pred-prompt
    ("mmbench", q(1, ["B"], question="What colour is the sky?", hint="Look at the top.", options=["red", "blue"]),
     "Look at the top.\nWhat colour is the sky?\nA. red\nB. blue" + LETTER),
    # llava_test_CQM-A.json: "Context: " before a hint, nothing without one
    ("scienceqa", q(1, ["C"], question="Which property?", hint="Select the best answer.", options=["x", "y", "z"]),
     "Context: Select the best answer.\nWhich property?\nA. x\nB. y\nC. z" + LETTER),
    ("scienceqa", q(1, ["A"], question="Which state?", options=["x", "y"]), "Which state?\nA. x\nB. y" + LETTER),
    ("mmmu", q(1, ["3"], question="What is x?"), "What is x?" + SHORT),
    ("mathvista", MATHVISTA[1] | {"question": "Volume?"},
     "Volume? (Unit: g)\nAnswer the question using a single integer number."),
    ("mathvista", MATHVISTA[2] | {"question": "Slope?"},
     "Slope?\nAnswer the question using a single floating-point number with two decimal places."),
])
def test_llava_prompts(bench, record, prompt):
    assert B.build_prompt(bench, record) == prompt


# ---------------------------------------------------------------- bad input

def test_unknown_benchmark_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown benchmark 'vqa'; valid: vqav2, textvqa, .*toy_ocr"):
        B.build_prompt("vqa", q(1, ["a"]))


def test_duplicate_and_unknown_answer_ids():
    questions = [q(1, ["yes"]), q(2, ["no"])]
    with pytest.raises(ValueError, match="2 answer.* repeat a question id already answered, e.g. 1, 1"):
        B.score("gqa", questions, [a(1, "yes"), a(1, "no"), a(1, "no"), a(2, "no")])
    with pytest.raises(ValueError, match="2 answer.* question ids that are not in the question file, e.g. 3, 'x'"):
        B.score("gqa", questions, [a(1, "yes"), a(3, "no"), a("x", "no")])


def test_empty_answers_warn_and_count():
    with pytest.warns(UserWarning, match="1 answers are empty"):
        m = B.score("gqa", [q(1, ["yes"]), q(2, ["no"])], [a(1, "  "), a(2, "no")])
    assert m["empty_answers"] == 1 and m["accuracy"] == pytest.approx(50.0)


def test_answer_ids_match_across_int_and_str():
    assert B.score("gqa", [q("201307251", ["no"])], [a(201307251, "no")])["accuracy"] == 100.0


def test_answers_asked_another_prompt_are_refused_by_question_id():
    """Answers kept from an earlier question file: question 2's answer was asked another question,
    so scoring it against this one would be a wrong number."""
    questions = [q(1, ["yes"], question="Is it red?"), q(2, ["no"], question="Is it round?")]
    asked = [dict(a(k, "yes"), prompt=B.build_prompt("gqa", record)) for k, record in ((1, questions[0]),
                                                                                    (2, questions[0]))]
    with pytest.raises(ValueError, match="1 of 2 answers were asked another prompt than their question's, "
                                         "e.g. question 2: asked 'Is it red\\?.*the question file asks 'Is it round\\?"):
        B.score("gqa", questions, asked)
    asked[1]["prompt"] = B.build_prompt("gqa", questions[1])
    assert B.score("gqa", questions, asked)["accuracy"] == 50.0
    assert B.score("gqa", questions, [a(1, "yes"), {"question_id": 2, "text": "no"}])["accuracy"] == 100.0  # none kept


def test_llava_answer_files_record_prompts_that_count_as_the_questions():
    """model_vqa_science.py records the prompt after '<image>\\n', model_vqa_mmbench.py before the
    answer-format line; both are the question's prompt. Other options are not."""
    record = q(1, ["B"], question="What colour is the sky?", hint="Look up.", options=["red", "blue"])
    prompt = B.build_prompt("mmbench", record)
    for recorded in (prompt, "<image>\n" + prompt, prompt.removesuffix(LETTER)):
        assert B.asks("mmbench", record, recorded)
    assert not B.asks("mmbench", record, prompt.replace("A. red\nB. blue", "A. blue\nB. red"))  # another rotation
    assert not B.asks("mmbench", record, prompt.removesuffix(LETTER) + "\nAnswer in one word.")


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_load_questions_errors_name_file_and_line(tmp_path):
    good = json.dumps(q(1, ["a"]))
    path = write(tmp_path / "q.jsonl", [good, "", json.dumps(q(2, []))])
    with pytest.raises(ValueError, match=r"q\.jsonl:3: answers missing or not a non-empty list"):
        B.load_questions(path)
    path = write(tmp_path / "q.jsonl", [good, json.dumps(q(1, ["b"]))])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: question_id 1 already used on line 1"):
        B.load_questions(path)
    path = write(tmp_path / "q.jsonl", [good, "{not json"])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: not valid JSON"):
        B.load_questions(path)
    path = write(tmp_path / "q.jsonl", [json.dumps(q(1, ["a"], options=["only one"]))])
    with pytest.raises(ValueError, match=r"q\.jsonl:1: options is not a list of at least 2 strings"):
        B.load_questions(path)
    loaded = B.load_questions(write(tmp_path / "ok.jsonl", [good, "", json.dumps(q("2", ["b"]))]))
    assert [record["question_id"] for record in loaded] == [1, "2"]  # blank lines skipped


def test_read_answers_errors_name_file_and_line(tmp_path):
    path = write(tmp_path / "a.jsonl", [json.dumps(a(1, "yes")), json.dumps({"question_id": 2})])
    with pytest.raises(ValueError, match=r"a\.jsonl:2: text missing or not a string"):
        B.read_answers(path)
    path = write(tmp_path / "a.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"a\.jsonl:1: expected a JSON object, got list"):
        B.read_answers(path)


@pytest.mark.parametrize("bench, name, types", [
    ("toy_reasoning", "eval/toy_reasoning/questions.jsonl", {"lookup", "count", "compare", "relation", "exists", "negation", "combination"}),
    ("toy_ocr", "eval/toy_ocr/questions.jsonl", {"ocr"}),
])
def test_toy_world_eval_files_load_prompt_and_score(toy_data, bench, name, types):
    """The files toy/make_data.py writes are question files for toy_reasoning / toy_ocr."""
    questions = B.load_questions(str(toy_data / name))
    assert B.build_prompt(bench, questions[0]) == questions[0]["question"] + SHORT
    # capitalised, with a full stop, as a chat model may answer: still exact matches
    answers = [a(r["question_id"], r["answers"][0].capitalize() + ".") for r in questions]
    metrics = B.score(bench, questions, answers)
    assert metrics["accuracy"] == 100.0 and set(metrics["per_category"]) == types
