"""LLaVA's data files: read (streamed), validated, and stored for training.

A record (LLaVA-1.5's docs/Data.md; docs/sources.md):
    {"id": "...", "image": "coco/000.jpg",            # absent for text-only samples
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Every record is checked before training starts; a bad one stops the run naming the file and the
record (or, with --skip-bad-samples, is logged and dropped: BadSamples, the one policy for it, also
applied where an image fails to decode later). Training then reads the records it takes from one
memory-mapped file (RecordFile), which every rank and data-loader worker shares.
"""
import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import re

import numpy as np
from PIL import Image

try:  # in a model folder, for the processor (modeling_vlm.py explains)
    from .constants import IMAGE_TOKEN
except ImportError:
    from constants import IMAGE_TOKEN

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class BadSample(ValueError):
    """A record that cannot be trained on; the message names the file and the record."""


def record_name(path, index, record):
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{path}: record" + (f" {index}" if index is not None else "") + (f" (id {rid})" if rid is not None else "")


def refusal(problem):
    """What stops a run at a bad record: its name and problem, and the way past it."""
    return f"{problem} (or pass --skip-bad-samples)"


class BadSamples:
    """--skip-bad-samples, the one policy for a record training cannot take, wherever it is met
    (validation, the feature cache, loading a sample): without the flag it stops the run with
    refusal()'s message; with it the record is logged ("skipping NAME: PROBLEM"), counted and left
    out by the caller. A sample left out in loading is None to collate, which drops it."""

    def __init__(self, skip, log=print):
        self.skip, self.log, self.skipped = skip, log, 0

    def reject(self, name, problem, cause=None):
        """A bad record (name: record_name's): raise BadSample, or log and count it and return."""
        if not self.skip:
            raise BadSample(refusal(f"{name}: {problem}")) from cause
        self.log(f"skipping {name}: {problem}")
        self.skipped += 1


def iter_records(path, chunk=1 << 24):
    """Yield (record, its JSON text) from a JSON list or JSONL file, reading a chunk of text at a
    time: json.load would hold the whole file parsed at once (LLaVA-665K's: docs/data.md), this
    holds a chunk and a record. Malformed JSON names its line."""
    with open(path, encoding="utf-8") as f:
        text = f.read(chunk)
        if text.lstrip().startswith("["):
            yield from list_records(path, f, text, chunk)
            return
        f.seek(0)  # JSON lines
        for line_number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line), line
                except json.JSONDecodeError as e:
                    if line_number == 1 and line.lstrip().startswith("{") and is_one_object(path):
                        raise BadSample(f"{path}: a JSON object where a list of records belongs "
                                        "(LLaVA's format: [record, ...], or one record per line)") from None
                    raise BadSample(f"{path}: malformed JSON on line {line_number}: {e.msg}") from None


WHITESPACE = re.compile(r"[ \t\r\n]*")


def list_records(path, f, text, chunk):
    """The records of a JSON list whose first chunk of text is `text`. What json.load refuses is
    refused, at json.load's line and column: a missing or doubled comma, and anything after the
    closing bracket (`cat a.json b.json` would otherwise read as a.json alone)."""
    decoder, position, lines_before = json.JSONDecoder(), text.index("[") + 1, 0
    expect = "first"  # what comes next: "first" (a record or ']'), "comma" (',' or ']'), "record", "end"

    def malformed(message, at):
        where = json.JSONDecodeError(message, text, at)
        return BadSample(f"{path}: malformed JSON at line {lines_before + where.lineno}, column {where.colno}: "
                         f"{message}")

    while True:
        position = WHITESPACE.match(text, position).end()
        try:
            if position == len(text):  # read on: the list goes on in the next chunk, or ends too early
                raise json.JSONDecodeError("Expecting ',' delimiter" if expect == "comma" else "Expecting value",
                                           text, position)
            if expect == "end":
                raise malformed("Extra data after the list's closing ']'", position)
            if text[position] == "]" and expect != "record":
                expect, position = "end", position + 1
            elif expect == "comma":
                if text[position] != ",":
                    raise malformed("Expecting ',' delimiter", position)
                expect, position = "record", position + 1
            else:
                record, end = decoder.raw_decode(text, position)
                yield record, text[position:end]
                expect, position = "comma", end
        except json.JSONDecodeError as e:
            more = f.read(chunk)  # the record may run on into the next chunk
            if not more:
                if expect == "end":
                    return
                raise malformed(e.msg, e.pos) from None
            cut = text.rfind("\n", 0, position) + 1  # keep whole lines, so error lines and columns stay true
            lines_before += text.count("\n", 0, cut)
            text, position = text[cut:] + more, position - cut


def is_one_object(path):
    """Is the whole file one JSON object spread over several lines? (Read only to name an error.)"""
    try:
        with open(path, encoding="utf-8") as f:
            return isinstance(json.load(f), dict)
    except ValueError:
        return False


def trained_turns(turns):
    """The turns training takes: a leading gpt turn answers nothing and is dropped, as LLaVA's
    preprocess does (after an optional system turn)."""
    system = turns[:1] if turns[:1] and turns[0]["from"] == "system" else []
    rest = turns[len(system):]
    return system + (rest[1:] if rest[:1] and rest[0]["from"] == "gpt" else rest)


def check_record(record, tokenize=None):
    """Raise ValueError saying what is wrong with one record (its image: check_image). tokenize:
    the run's conversation.tokenize, turns -> sample (train.sample_tokenizer), so a record that
    the template or --max-length refuses is refused here, before training, and not at its step."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise ValueError("no 'conversations' list")
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"a turn is not {{'from': human|gpt|system, 'value': str}}: {str(turn)[:80]}")
    turns = trained_turns(record["conversations"])
    roles = [t["from"] for t in turns]
    body = roles[1:] if roles[:1] == ["system"] else roles
    if any(role != ("human", "gpt")[i % 2] for i, role in enumerate(body)):  # LLaVA asserts it too
        raise ValueError(f"turns must alternate human, gpt (a system turn only first): {', '.join(roles)[:80]}")
    if not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
        raise ValueError("no gpt turn with an answer")
    tags = [i for i, t in enumerate(turns) if IMAGE_TOKEN in t["value"]]
    if "image" not in record:
        if tags:
            raise ValueError(f"'{IMAGE_TOKEN}' in a sample that has no image")
    elif not tags:  # its visual tokens would have no place in the sequence
        raise ValueError(f"an image but no '{IMAGE_TOKEN}' in the text")
    elif not isinstance(record["image"], str):
        raise ValueError("'image' must be one file name (one image per sample)")
    elif tags != [roles.index("human")] or turns[tags[0]]["value"].count(IMAGE_TOKEN) > 1:
        raise ValueError(f"'{IMAGE_TOKEN}' must appear once, in the first human turn")
    if tokenize is not None:
        try:
            tokenize(record["conversations"])
        except Exception as e:  # a chat template's own refusal is jinja's TemplateError
            raise ValueError(str(e).strip() or type(e).__name__) from None


def check_image(path):
    """Raise ValueError if the image is missing or its header unreadable (no decoding).
    -> PIL's name of the format the file really holds ("JPEG", "GIF", ...)."""
    try:
        with Image.open(path) as image:
            return image.format
    except FileNotFoundError:
        raise ValueError(f"image not found: {path}") from None
    except Exception as e:
        raise ValueError(f"unreadable image {path}: {e}") from None


CHUNK = 256  # records a checking process takes at a time


def checked_records(path, tokenize=None, processes=1):
    """Yield (index, record, its JSON text, why check_record refuses it or None) for each record of
    the file, in order. Tokenizing is most of the checks' cost (docs/data.md measures it), so with
    tokenize and processes > 1 the checks run in that many forked processes, the file still
    streamed once and at most a few chunks of records in flight."""
    records = enumerate(iter_records(path))
    if tokenize is None or processes <= 1:
        for index, (record, text) in records:
            yield index, record, text, record_problem(record, tokenize)
        return
    chunks = iter(lambda: list(itertools.islice(records, CHUNK)), [])
    # fork: the tokenizer and template reach the workers as they are, not pickled
    with multiprocessing.get_context("fork").Pool(processes, _hold, (tokenize,)) as pool:
        pending = collections.deque()
        for chunk in itertools.chain(chunks, [None]):
            if chunk:
                pending.append((chunk, pool.apply_async(_problems, ([record for _, (record, _) in chunk],))))
            while pending and (chunk is None or len(pending) > 2 * processes):
                done, problems = pending.popleft()
                for (index, (record, text)), problem in zip(done, problems.get()):
                    yield index, record, text, problem


def record_problem(record, tokenize=None):
    """check_record's complaint about the record, or None."""
    try:
        check_record(record, tokenize)
    except ValueError as e:
        return str(e)
    return None


_tokenize = None  # in a checking process: the run's tokenize


def _hold(tokenize):
    global _tokenize
    _tokenize = tokenize


def _problems(records):
    return [record_problem(record, _tokenize) for record in records]


def valid_records(path, image_folder, skip_bad=False, log=print, tokenize=None, processes=1):
    """Read and validate the whole file before training starts: yield (record, its JSON text) for
    each record training can take. A bad record stops the run with its name, or with skip_bad is
    logged and dropped. tokenize, processes: check_record's and checked_records'."""
    kept, bad = 0, BadSamples(skip_bad, log)
    image_errors = {}  # image path -> its error or None: an image several records share is read once
    for index, record, text, problem in checked_records(path, tokenize, processes):
        if problem is None and "image" in record:
            image = os.path.join(image_folder, record["image"])
            if image not in image_errors:
                try:
                    check_image(image)
                    image_errors[image] = None
                except ValueError as e:
                    image_errors[image] = str(e)
            problem = image_errors[image]
        if problem:
            bad.reject(record_name(path, index, record), problem)
            continue
        kept += 1
        yield record, text
    if bad.skipped:
        log(f"skipped {bad.skipped} bad samples of {kept + bad.skipped} in {path}")
    if not kept:
        raise BadSample(f"{path}: no usable samples")


def load_records(path, image_folder, skip_bad=False, log=print, tokenize=None):
    """valid_records as a list of records."""
    return [record for record, _ in valid_records(path, image_folder, skip_bad, log, tokenize)]


def write_records(texts, directory):
    """Records' JSON texts -> DIRECTORY/records.txt, back to back, and the offset where each
    starts in DIRECTORY/offsets.npy (read by RecordFile). -> what was written, as a resumed run
    must find it again: dict(records=count, sha1=of the texts and their boundaries)."""
    os.makedirs(directory, exist_ok=True)
    offsets, digest = [0], hashlib.sha1()
    with open(os.path.join(directory, "records.txt"), "wb") as f:
        for text in texts:
            data = text.encode()
            digest.update(data)
            offsets.append(offsets[-1] + f.write(data))
    offsets = np.array(offsets, dtype=np.int64)
    np.save(os.path.join(directory, "offsets.npy"), offsets)
    digest.update(offsets.tobytes())
    return dict(records=len(offsets) - 1, sha1=digest.hexdigest()[:16])


class RecordFile:
    """The records write_records wrote, each parsed when asked for. The file is memory-mapped, so
    the ranks of a node and their data-loader workers share one copy in the page cache; 665K
    parsed records held as a Python list cost each process several GB, and forked workers copy
    that list page by page as they touch it."""

    def __init__(self, directory):
        self.offsets = np.load(os.path.join(directory, "offsets.npy"))
        self.data = np.memmap(os.path.join(directory, "records.txt"), dtype=np.uint8, mode="r")

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        return json.loads(self.data[self.offsets[index]:self.offsets[index + 1]].tobytes())
