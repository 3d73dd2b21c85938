"""Benchmarks: question files, LLaVA-1.5 prompts, and scoring that follows the official scorers.

Question file (JSON Lines, written by data_prep/convert_benchmarks.py), one question a line:
  question_id  int or str, unique in the file
  image        path relative to the benchmark's image folder, as in LLaVA's question files
  question     the question alone, without any answer-format instruction
  answers      reference answers: the 10 human answers (VQAv2, TextVQA, VizWiz), the option
               letter (multiple choice), "yes"/"no" (POPE, MME), otherwise the accepted answers
  category     optional: POPE split, MME subtask, question type, subject, ...
  options      optional: the choices of a multiple-choice question, shown as A., B., ...
  and per benchmark: hint (MMBench, ScienceQA), ocr_tokens (TextVQA), circular_index (MMBench),
  answer_type / precision / unit (MathVista).
Answer file: LLaVA's JSON Lines {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}.

Metrics are percentages (0-100), MME is in points (0-2800); `normalized` is in [0, 1].
Every rule below names the official scorer it reproduces. Where an official scorer asks GPT to
read an answer (MMBench, MathVista), only its rule-based stage runs: unreadable answers count wrong.

Scoring from the command line: python 03_evaluate.py --score-only --bench B --questions Q --answers A
"""
import json
import random
import re
import string
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from constants import IMAGE_TOKEN

LETTERS = string.ascii_uppercase
# LLaVA-1.5's evaluation prompts (its question files, model_vqa_mmbench.py; docs/sources.md)
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
VIZWIZ_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."


# ---------------------------------------------------------------- files

def read_jsonl(path):
    """-> [(line number, object)], blank lines skipped; every error names the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def _is_id(value):
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _is_text_list(value, min_length):
    return isinstance(value, list) and len(value) >= min_length and all(isinstance(v, str) for v in value)


def question_problem(record):
    """What is wrong with one question record, or None."""
    if not _is_id(record.get("question_id")):
        return "question_id missing or not an int/str"
    for key in ("image", "question"):
        if not isinstance(record.get(key), str):
            return f"{key} missing or not a string"
    if not _is_text_list(record.get("answers"), 1):
        return "answers missing or not a non-empty list of strings"
    if "category" in record and not isinstance(record["category"], str):
        return "category is not a string"
    if "options" in record and not _is_text_list(record["options"], 2):
        return "options is not a list of at least 2 strings"
    return None


def answer_problem(record):
    """What is wrong with one answer record, or None."""
    if not _is_id(record.get("question_id")):
        return "question_id missing or not an int/str"
    if not isinstance(record.get("text"), str):
        return "text missing or not a string"
    if not isinstance(record.get("prompt", ""), str):
        return "prompt is not a string"
    return None


def load_questions(path):
    """Read and validate a question file; question ids must be unique."""
    questions, line_of_id = [], {}
    for number, record in read_jsonl(path):
        problem = question_problem(record)
        if problem:
            raise ValueError(f"{path}:{number}: {problem}")
        key = str(record["question_id"])
        if key in line_of_id:
            raise ValueError(f"{path}:{number}: question_id {record['question_id']!r} "
                             f"already used on line {line_of_id[key]}")
        line_of_id[key] = number
        questions.append(record)
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def read_answers(path):
    """Read an answer file in LLaVA's format (only question_id and text are needed)."""
    answers = []
    for number, record in read_jsonl(path):
        problem = answer_problem(record)
        if problem:
            raise ValueError(f"{path}:{number}: {problem}")
        answers.append(record)
    return answers


# ---------------------------------------------------------------- prompts

def format_options(options):
    return "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))


def build_prompt(bench_name, record):
    """The user turn LLaVA-1.5 sends, without the <image> marker: [hint], question, [OCR tokens],
    [options], then the benchmark's answer-format instruction(s), one per line."""
    bench = get_benchmark(bench_name)
    return "\n".join(question_lines(bench, record) + bench.instructions(record))


def question_lines(bench, record):
    """The prompt's lines before the answer-format instruction(s)."""
    lines = []
    if record.get("hint"):
        lines.append(bench.hint_prefix + record["hint"])
    # MathVista's query puts the unit after the question (lmms-eval's "format-prompt").
    unit = f" (Unit: {record['unit']})" if record.get("unit") else ""
    lines.append(record["question"] + unit)
    if "ocr_tokens" in record:  # LLaVA's llava_textvqa_val_v051_ocr.jsonl, even when empty
        lines.append("Reference OCR token: " + ", ".join(record["ocr_tokens"]))
    if record.get("options"):
        lines.append(format_options(record["options"]))
    return lines


def asks(bench_name, record, prompt):
    """Is `prompt`, as an answer file records it, this question's prompt? LLaVA's own answer files
    record it with the <image> marker in front (model_vqa_science.py) or without the answer-format
    line (model_vqa_mmbench.py); both count."""
    bench = get_benchmark(bench_name)
    lines = question_lines(bench, record)
    return prompt.removeprefix(IMAGE_TOKEN + "\n") in ("\n".join(lines + bench.instructions(record)), "\n".join(lines))


def short_answer(record):
    return [SHORT_ANSWER]


def option_letter(record):
    return [OPTION_LETTER]


def vizwiz_instructions(record):
    """LLaVA's VizWiz question file (llava_test.jsonl) asks for 'Unanswerable' first."""
    return [VIZWIZ_UNANSWERABLE, SHORT_ANSWER]


def mmmu_instructions(record):
    """lmms-eval's MMMU prompts: option letter for multiple choice, short answer for open ones."""
    return [OPTION_LETTER] if record.get("options") else [SHORT_ANSWER]


def mathvista_instructions(record):
    """lmms-eval's MathVista "format-prompt" hints, chosen by answer type."""
    kind, precision = record.get("answer_type"), record.get("precision")
    if record.get("options"):
        return [OPTION_LETTER]
    if kind == "integer":
        return ["Answer the question using a single integer number."]
    if kind == "float" and precision == 1:
        return ["Answer the question using a single floating-point number with one decimal place."]
    if kind == "float" and precision == 2:
        return ["Answer the question using a single floating-point number with two decimal places."]
    if kind == "list":
        return ["Answer the question using a Python list."]
    return [SHORT_ANSWER]


# ---------------------------------------------------------------- shared helpers

def percent(value):
    return 100.0 * value


def mean(values):
    return sum(values) / len(values) if values else 0.0


def levenshtein(a, b):
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def accuracy_metrics(questions, scores, metric="accuracy"):
    """Mean per-question score as a percentage, overall and per category (when there are any)."""
    metrics = {metric: percent(mean(scores))}
    by_category = defaultdict(list)
    for question, value in zip(questions, scores):
        if "category" in question:
            by_category[question["category"]].append(value)
    if by_category:
        metrics["per_category"] = {name: percent(mean(values)) for name, values in sorted(by_category.items())}
    return metrics


def per_question(question_score, metric="accuracy"):
    """A scorer from a per-question rule score(question, prediction) -> [0, 1]; missing answers score 0."""
    def scorer(questions, predictions):
        scores = [0.0 if p is None else float(question_score(q, p)) for q, p in zip(questions, predictions)]
        return accuracy_metrics(questions, scores, metric)
    return scorer


def _examples(ids):
    return ", ".join(repr(i) for i in ids[:3])


def _require(failing_ids, what):
    """A data check: ValueError("<count> <what>, e.g. <ids>") when any id fails it."""
    if failing_ids:
        raise ValueError(f"{len(failing_ids)} {what}, e.g. {_examples(failing_ids)}")


def _option_letters(record):
    return list(LETTERS[:len(record.get("options", []))])


def require_option_answers(questions):
    _require([q["question_id"] for q in questions if q["answers"][0] not in _option_letters(q)],
             "question(s) without options or with an answer that is not one of their letters")


# ---------------------------------------------------------------- VQA accuracy (VQAv2, TextVQA, VizWiz)
# LLaVA scores TextVQA with m4c_evaluator.TextVQAAccuracyEvaluator and passes VQAv2/VizWiz predictions
# through the same EvalAIAnswerProcessor before upload: every rule below follows that processor.

VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                   "`", ",", "?", "!"]
# The official regex is r"(?!<=\d)(\.)(?!\d)"; its "(?!<=\d)" is a look-ahead that never fires,
# so every period not followed by a digit goes.
VQA_PERIOD = re.compile(r"\.(?!\d)")
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = {"a", "an", "the"}
# The official table, unchanged (its capitalised keys never match the lower-cased text, and it
# maps "somebody'd" to "somebodyd"; both kept so results stay identical).
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}


def vqa_tokenize(text):
    """Lower case, drop commas and question marks, split off possessive 's, one line."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_punctuation(text):
    """A mark touching a space is deleted, one inside a word becomes a space (decided on the
    input text); then periods not followed by a digit go. The official test for commas between
    digits is left out: tokenising has removed every comma. The official call passes re.UNICODE
    where `count` belongs, so at most 32 periods are removed; kept."""
    out = text
    for mark in VQA_PUNCTUATION:
        out = out.replace(mark, "" if (mark + " " in text or " " + mark in text) else " ")
    return VQA_PERIOD.sub("", out, count=re.UNICODE)


def vqa_digits_articles_contractions(text):
    """Number words to digits, articles dropped, contractions restored ("dont" -> "don't")."""
    words = [VQA_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [VQA_CONTRACTIONS.get(word, word) for word in words if word not in VQA_ARTICLES]
    return " ".join(words)


def vqa_normalize(text):
    return vqa_digits_articles_contractions(vqa_punctuation(vqa_tokenize(text)))


def vqa_accuracy(prediction, human_answers):
    """Mean over the 10 leave-one-out subsets of min(#matching humans among the other 9 / 3, 1)."""
    prediction = vqa_normalize(prediction)
    answers = [vqa_normalize(a) for a in human_answers]
    matches = answers.count(prediction)
    return mean([min(1.0, (matches - (answer == prediction)) / 3) for answer in answers])


def vqa_scorer(questions, predictions):
    # m4c's evaluator asserts 10 human answers per question.
    _require([q["question_id"] for q in questions if len(q["answers"]) != 10],
             "question(s) without exactly 10 human answers")
    return per_question(lambda q, p: vqa_accuracy(p, q["answers"]))(questions, predictions)


# ---------------------------------------------------------------- exact match (GQA, toy world)

def gqa_normalize(text):
    """LLaVA's scripts/convert_gqa_for_eval.py: text.rstrip('.').lower(); GQA's eval.py then
    compares with the answer as is."""
    return text.rstrip(".").lower()


def gqa_correct(question, prediction):
    return gqa_normalize(prediction) == question["answers"][0]


def toy_correct(question, prediction):
    """The toy world's answers are lower-case words: GQA's rule, applied to the references too."""
    return gqa_normalize(prediction) in {gqa_normalize(a) for a in question["answers"]}


# ---------------------------------------------------------------- POPE (LLaVA's llava/eval/eval_pope.py)

def pope_says_no(text):
    """Keep the text before the first '.', drop commas, split on single spaces: "no" if the
    words include "No", "not" or "no" (case-sensitive: "NO" or "Nope" read as yes)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "No" in words or "not" in words or "no" in words


def pope_split_metrics(labels_yes, predicted_yes):
    pairs = list(zip(labels_yes, predicted_yes))
    tp = sum(label and pred for label, pred in pairs)
    fp = sum(pred and not label for label, pred in pairs)
    tn = sum(not label and not pred for label, pred in pairs)
    fn = sum(label and not pred for label, pred in pairs)
    # The official script divides by zero when nothing is predicted "yes"; 0 here.
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": percent((tp + tn) / len(pairs)), "precision": percent(precision),
            "recall": percent(recall), "f1": percent(f1),
            "yes_ratio": percent(sum(predicted_yes) / len(pairs)), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def pope_scorer(questions, predictions):
    """Per split (category); LLaVA's reported POPE number is the mean F1 over the splits.
    A missing answer counts as the wrong label (a false negative or a false positive)."""
    _require([q["question_id"] for q in questions if q["answers"][0] not in ("yes", "no")],
             "question(s) whose answer is not yes/no: these are not POPE questions")
    labels, predicted = defaultdict(list), defaultdict(list)
    for question, prediction in zip(questions, predictions):
        label_yes = question["answers"][0] != "no"  # the official label map: "no" -> 0, else 1
        split = question.get("category", "all")
        labels[split].append(label_yes)
        predicted[split].append(not label_yes if prediction is None else not pope_says_no(prediction))
    splits = {split: pope_split_metrics(labels[split], predicted[split]) for split in sorted(labels)}
    return {"mean_f1": mean([m["f1"] for m in splits.values()]),
            "mean_accuracy": mean([m["accuracy"] for m in splits.values()]), "per_category": splits}


# ---------------------------------------------------------------- MME (the MME eval_tool's calculation.py)

MME_PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR"]
MME_COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]


def mme_label(text):
    """parse_pred_ans: lower-cased; exactly yes/no, else 'yes' or 'no' within the first 4
    characters ('yes' first), else 'other' (always wrong): "Not sure" -> no, "I think yes" -> other."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def mme_scorer(questions, predictions):
    """Per subtask: accuracy x 100 + acc+ x 100, acc+ = share of images with both questions right.
    Perception sums 10 subtasks (max 2000), cognition 4 (max 800)."""
    known = set(MME_PERCEPTION + MME_COGNITION)
    _require([q["question_id"] for q in questions if q.get("category") not in known],
             "question(s) whose category is not an MME subtask")
    _require([q["question_id"] for q in questions if q["answers"][0].lower() not in ("yes", "no")],
             "question(s) whose answer is not yes/no")
    correct, images = defaultdict(list), defaultdict(list)
    for question, prediction in zip(questions, predictions):
        right = prediction is not None and mme_label(prediction) == question["answers"][0].lower()
        correct[question["category"]].append(right)
        images[question["category"], question["image"]].append(right)
    # calculation.py reads an image's two questions as consecutive lines and asserts there are two.
    _require([f"{subtask}/{image}" for (subtask, image), v in images.items() if len(v) != 2],
             "MME image(s) without exactly 2 questions")
    subtasks = {}
    for name, rights in correct.items():
        pairs = [all(v) for (subtask, _), v in images.items() if subtask == name]
        accuracy, accuracy_plus = mean(rights), mean(pairs)
        subtasks[name] = {"score": percent(accuracy) + percent(accuracy_plus), "accuracy": percent(accuracy),
                          "accuracy_plus": percent(accuracy_plus)}
    absent = sorted(known - set(subtasks))
    if absent:
        warnings.warn(f"MME: {len(absent)} of 14 subtasks have no questions ({', '.join(absent)}); "
                      "they add 0 to the total, which is still divided by 2800")
    perception = sum(subtasks[n]["score"] for n in MME_PERCEPTION if n in subtasks)
    cognition = sum(subtasks[n]["score"] for n in MME_COGNITION if n in subtasks)
    return {"total": perception + cognition, "perception": perception, "cognition": cognition,
            "per_category": dict(sorted(subtasks.items()))}


# ---------------------------------------------------------------- ScienceQA-IMG (LLaVA's llava/eval/eval_science_qa.py)

SQA_OPTIONS = ["A", "B", "C", "D", "E"]


def sqa_letter(text):
    """The answer is a bare letter, starts with "X. ", or contains exactly one "The answer is X"
    followed by any character (the official regex's '.' is unescaped); else unreadable (wrong)."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else None


def sqa_correct(question, prediction):
    letter = sqa_letter(prediction)
    return letter in _option_letters(question) and letter == question["answers"][0]


def sqa_scorer(questions, predictions):
    require_option_answers(questions)
    return per_question(sqa_correct)(questions, predictions)


# ---------------------------------------------------------------- MMBench and AI2D (VLMEvalKit's can_infer)

# can_infer_option reads these refusals, or a lone "Z" word, as "Z": no option, and stops there.
MCQ_REFUSALS = ["Sorry, I can't help with images of people yet.", "I can't process this file.",
                "I'm sorry, but without the image provided", "Cannot determine the answer"]


def infer_option_letter(text, letters):
    """can_infer_option: brackets and punctuation become spaces; the answer is the one option
    letter among the words; none or several: no answer (None), unless it is a "Z" case (above)."""
    if any(refusal in text for refusal in MCQ_REFUSALS):
        return "Z"
    for mark in ".()[],:;!*#{}":
        text = text.replace(mark, " ")
    words = text.split()
    found = [letter for letter in letters if letter in words]
    if len(found) == 1:
        return found[0]
    return "Z" if not found and "Z" in words else None


def infer_option_text(text, options):
    """can_infer_text: the one option whose text occurs in the answer (case-insensitive)."""
    found = [letter for letter, option in zip(LETTERS, options) if option.lower() in text.lower()]
    return found[0] if len(found) == 1 else None


def chosen_option(question, prediction):
    """VLMEvalKit's can_infer, the rule-based matching that runs before (and here instead of)
    its ChatGPT matching: the letter first, then the option text; "Z" or None is never right."""
    return (infer_option_letter(prediction, _option_letters(question))
            or infer_option_text(prediction, question["options"]))


def option_correct(question, prediction):
    return chosen_option(question, prediction) == question["answers"][0]


def option_scorer(questions, predictions):
    require_option_answers(questions)
    return per_question(option_correct)(questions, predictions)


def mmbench_scorer(questions, predictions):
    """Circular evaluation (VLMEvalKit's mcq_circular_eval): the rows sharing circular_index
    (the TSV index modulo 1e6) are one question with its options rotated; it counts right only
    if every rotation is right. vanilla_accuracy scores the original rows (index < 1e6) alone."""
    require_option_answers(questions)
    groups, first_row, vanilla = defaultdict(list), {}, []
    for question, prediction in zip(questions, predictions):
        right = prediction is not None and option_correct(question, prediction)
        group = question.get("circular_index", question["question_id"])
        groups[group].append(right)
        first_row.setdefault(group, question)
        if question["question_id"] == group:
            vanilla.append(right)
    metrics = accuracy_metrics([first_row[g] for g in groups], [float(all(rights)) for rights in groups.values()])
    return {**metrics, "vanilla_accuracy": percent(mean(vanilla)), "n_circular_groups": len(groups)}


# ---------------------------------------------------------------- DocVQA ANLS (the RRC DocVQA evaluation script)

def _lower_collapsed(text):
    return " ".join(text.strip().lower().split())


def anls_distance(reference, prediction):
    """The edit distance of the lower-cased, whitespace-collapsed texts, divided by the longer
    of the raw lengths (as the script does)."""
    length = max(len(reference.upper()), len(prediction.upper()))
    return levenshtein(_lower_collapsed(reference), _lower_collapsed(prediction)) / length if length else 0.0


def anls(prediction, references, threshold=0.5):
    """1 - the smallest distance to a reference; below the 0.5 threshold it is 0."""
    similarity = 1 - min(anls_distance(r, prediction) for r in references)
    return 0.0 if similarity < threshold else similarity


def docvqa_anls(question, prediction):
    return anls(prediction, question["answers"])


# ---------------------------------------------------------------- ChartQA (pix2struct's relaxed_correctness)

def _to_float(text):
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(target, prediction, max_relative_change=0.05):
    """Numbers ("12%" is 0.12) within 5% of a non-zero target; otherwise case-insensitive exact."""
    prediction_value, target_value = _to_float(prediction), _to_float(target)
    if prediction_value is not None and target_value:
        return abs(prediction_value - target_value) / abs(target_value) <= max_relative_change
    return prediction.lower() == target.lower()


def chartqa_correct(question, prediction):
    """pix2struct's relaxed accuracy takes the best of the targets."""
    return any(relaxed_correct(target, prediction) for target in question["answers"])


# ---------------------------------------------------------------- MMMU (MMMU's eval/eval_utils.py)

def mmmu_choice(response, options, rng):
    """parse_multi_choice_response -> (letter, guessed): "(X)" first, then " X ", then (answers of
    more than 5 words) an option's text; several candidates: the one mentioned last; none: a random
    guess, as the official code (its random module seeded with 42)."""
    letters = LETTERS[:len(options)]
    for mark in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(mark)
    response = f" {response} "
    candidates = [letter for letter in letters if f"({letter})" in response]
    bracketed, by_text = bool(candidates), False
    if not candidates:
        candidates = [letter for letter in letters if f" {letter} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [letter for letter, option in zip(letters, options) if option.lower() in response.lower()]
        by_text = True
    if not candidates:
        return rng.choice(letters), True

    def last_mention(letter):
        if by_text:
            return response.lower().rfind(options[letters.index(letter)].lower())
        return response.rfind(f"({letter})" if bracketed else f" {letter} ")
    return max(candidates, key=last_mention), False


MMMU_NUMBER_PATTERNS = [r"-?\b\d{1,3}(?:,\d{3})+\b",  # with thousands commas
                        r"-?\d+(?:\.\d+)?[eE][+-]?\d+",  # scientific notation
                        r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"]  # plain
MMMU_KEY_INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]


def mmmu_normalize(text):
    """normalize_str: a number -> [its value rounded to 2 places]; else lower-cased, and a single
    character padded with a space on either side to avoid trivial substring matches."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_key_answers(response):
    """get_key_subresponses: per line, the shortest tail after an indicator word ("is", "so",
    "answer", ...; in the last line also "="). The official sentence split looks for a capital
    after lower-casing, so only newlines split."""
    response = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, part in enumerate(parts):
        indicators = MMMU_KEY_INDICATORS + (["="] if index == len(parts) - 1 else [])
        tails = [part.split(indicator)[-1].strip() for indicator in indicators if indicator in part]
        shortest = None
        for tail in tails:  # the official loop: an empty tail is replaced by the next one
            if not shortest or len(tail) < len(shortest):
                shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", "'"]:
            keys.append(shortest)
    return keys or [response]


def mmmu_open_correct(response, references):
    """parse_open_response + eval_open: a predicted number must equal a reference number; a
    reference string must occur inside a predicted string."""
    keys = mmmu_key_answers(response)
    candidates = keys + [n for key in keys for pattern in MMMU_NUMBER_PATTERNS for n in re.findall(pattern, key)]
    predicted = {value for candidate in candidates for value in mmmu_normalize(candidate)}
    normalized_references = [value for reference in references for value in mmmu_normalize(reference)]
    for value in predicted:
        if isinstance(value, str):
            if any(isinstance(r, str) and r in value for r in normalized_references):
                return True
        elif value in normalized_references:
            return True
    return False


def mmmu_scorer(questions, predictions):
    rng = random.Random(42)
    scores, guessed = [], 0
    for question, prediction in zip(questions, predictions):
        if prediction is None:
            scores.append(0.0)
        elif question.get("options"):
            letter, was_guessed = mmmu_choice(prediction, question["options"], rng)
            guessed += was_guessed
            scores.append(float(letter == question["answers"][0]))
        else:
            scores.append(float(mmmu_open_correct(prediction, question["answers"])))
    return {**accuracy_metrics(questions, scores), "guessed": guessed}


# ---------------------------------------------------------------- MathVista (its extract_answer, calculate_score)

def mathvista_extraction(question, response):
    """extract_answer's rule-based steps: an exact choice, a bare integer/float, or
    'The answer is "..."' (its quick extraction); the GPT-4 step is not run, so the response
    itself stands in for it."""
    if not response:
        return ""
    if response in question.get("options", []):
        return response
    for kind, parse in (("integer", int), ("float", float)):
        if question.get("answer_type") == kind:
            try:
                return str(parse(response))
            except ValueError:
                pass
    quoted = re.search(r'The answer is "(.*)"\.', response)
    return quoted.group(1) if quoted else response


def mathvista_prediction(question, extraction):
    """normalize_extracted_answer: choices by letter ("(B)" or "B") else the closest choice by edit
    distance; integers via int(float()), floats rounded to the question's precision; None if unparsable."""
    options = question.get("options")
    if options:
        extraction = extraction.strip()
        bracketed = re.findall(r"\(([a-zA-Z])\)", extraction)
        if bracketed:
            extraction = bracketed[0].upper()
        if extraction in _option_letters(question):
            return options[LETTERS.index(extraction)]
        distances = [levenshtein(extraction, option) for option in options]
        return options[distances.index(min(distances))]
    try:
        if question.get("answer_type") == "integer":
            return str(int(float(extraction)))
        if question.get("answer_type") == "float":
            return str(round(float(extraction), int(question.get("precision") or 0)))
    except ValueError:
        return None
    return extraction


def mathvista_correct(question, prediction):
    return mathvista_prediction(question, mathvista_extraction(question, prediction)) == question["answers"][0]


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    headline: str  # the metric the scaling law uses
    scorer: Callable  # (questions, predictions: list[str | None]) -> metrics dict
    instructions: Callable = short_answer  # record -> answer-format lines closing the prompt
    hint_prefix: str = ""
    full_score: float = 100.0  # headline / full_score = normalized

    def normalized(self, metrics):
        return metrics[self.headline] / self.full_score


def _benchmarks(*benchmarks):
    return {b.name: b for b in benchmarks}


BENCHMARKS = _benchmarks(
    Benchmark("vqav2", "VQAv2 (val): VQA accuracy, 10 human answers", "accuracy", vqa_scorer),
    Benchmark("textvqa", "TextVQA (val): VQA accuracy, prompt with LLaVA's OCR tokens", "accuracy", vqa_scorer),
    Benchmark("vizwiz", "VizWiz (val): VQA accuracy", "accuracy", vqa_scorer, vizwiz_instructions),
    Benchmark("gqa", "GQA testdev-balanced: exact match", "accuracy", per_question(gqa_correct)),
    Benchmark("pope", "POPE: F1 per split, mean F1", "mean_f1", pope_scorer),
    Benchmark("mme", "MME: perception + cognition, acc + acc+ per subtask", "total", mme_scorer,
              full_score=2800.0),
    Benchmark("scienceqa", "ScienceQA-IMG (test): option letter accuracy", "accuracy", sqa_scorer,
              option_letter, hint_prefix="Context: "),
    Benchmark("mmbench", "MMBench (dev): circular accuracy", "accuracy", mmbench_scorer, option_letter),
    Benchmark("docvqa", "DocVQA (val): ANLS", "anls", per_question(docvqa_anls, "anls")),
    Benchmark("chartqa", "ChartQA (test): relaxed accuracy", "relaxed_accuracy",
              per_question(chartqa_correct, "relaxed_accuracy")),
    Benchmark("ai2d", "AI2D (test): option letter accuracy", "accuracy", option_scorer, option_letter),
    Benchmark("mmmu", "MMMU (val): accuracy, options parsed from free text", "accuracy", mmmu_scorer,
              mmmu_instructions),
    Benchmark("mathvista", "MathVista (testmini): accuracy, rule-based answer extraction", "accuracy",
              per_question(mathvista_correct), mathvista_instructions),
    Benchmark("toy_reasoning", "toy world: exact match per question type", "accuracy", per_question(toy_correct)),
    Benchmark("toy_ocr", "toy world, written words: exact match", "accuracy", per_question(toy_correct)),
)


def get_benchmark(name):
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


# ---------------------------------------------------------------- scoring

def align_predictions(questions, answers):
    """-> (one stripped answer text or None per question, number of empty answers).
    Unknown or duplicate answer ids raise; missing and empty answers warn."""
    for answer in answers:
        problem = answer_problem(answer)
        if problem:
            raise ValueError(f"answer {answer!r}: {problem}")
    texts, duplicates = {}, []
    for answer in answers:
        key = str(answer["question_id"])
        if key in texts:
            duplicates.append(answer["question_id"])
        texts[key] = answer["text"]
    if duplicates:
        raise ValueError(f"{len(duplicates)} answer(s) repeat a question id already answered, "
                         f"e.g. {_examples(duplicates)}")
    known = {str(q["question_id"]) for q in questions}
    unknown = [a["question_id"] for a in answers if str(a["question_id"]) not in known]
    if unknown:
        raise ValueError(f"{len(unknown)} answer(s) have question ids that are not in the question file, "
                         f"e.g. {_examples(unknown)}")
    # LLaVA's generation scripts strip the decoded text; the official scorers see it stripped.
    predictions = [texts[k].strip() if k in texts else None for k in (str(q["question_id"]) for q in questions)]
    missing = [q["question_id"] for q, p in zip(questions, predictions) if p is None]
    if missing:
        warnings.warn(f"{len(missing)} of {len(questions)} questions have no answer (counted wrong), "
                      f"e.g. {_examples(missing)}")
    empty = sum(p == "" for p in predictions)
    if empty:
        warnings.warn(f"{empty} answers are empty (scored as given)")
    return predictions, empty


def check_prompts(bench_name, questions, answers):
    """An answer that records its prompt (LLaVA's format does) must have been asked its question's:
    answers kept from an earlier question file would be scored against questions they never saw.
    The answers' ids are known questions' (align_predictions)."""
    by_id = {str(q["question_id"]): q for q in questions}
    stale = [a for a in answers if a.get("prompt") and not asks(bench_name, by_id[str(a["question_id"])], a["prompt"])]
    if stale:
        first = stale[0]
        asked = build_prompt(bench_name, by_id[str(first["question_id"])])
        raise ValueError(f"{len(stale)} of {len(answers)} answers were asked another prompt than their question's, "
                         f"e.g. question {first['question_id']!r}: asked {_shorter(first['prompt'])!r}, "
                         f"the question file asks {_shorter(asked)!r}")


def _shorter(text, limit=120):
    return text if len(text) <= limit else text[:limit] + "..."


def score(bench_name, questions, answers):
    """Score LLaVA-format answers against a question list: one dict with the benchmark, the name
    and value of its headline metric, normalized (0-1), n_questions, missing, empty_answers, and
    the benchmark's own metrics."""
    bench = get_benchmark(bench_name)
    predictions, empty = align_predictions(questions, answers)
    check_prompts(bench_name, questions, answers)
    metrics = bench.scorer(questions, predictions)
    return {"benchmark": bench.name, "headline": bench.headline, bench.headline: metrics[bench.headline],
            "normalized": bench.normalized(metrics), "n_questions": len(questions),
            "missing": predictions.count(None), "empty_answers": empty, **metrics}
