"""Data pipeline: label masks under two chat templates, image slots, truncation, images, bad input."""
import copy
import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import conversation
import features
import llava_data
import toy
from constants import IGNORE, IMAGE_SLOT

VICUNA_TEMPLATE = (
    "{{ 'A chat between a curious user and an artificial intelligence assistant. ' }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

TURNS = [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
         {"from": "gpt", "value": "red"},
         {"from": "human", "value": "And the square?"},
         {"from": "gpt", "value": "blue, at the top left"}]


@pytest.fixture(scope="module")
def vicuna_tokenizer():
    tokenizer = toy.build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["</s>"]})
    tokenizer.chat_template = VICUNA_TEMPLATE
    return tokenizer


def labelled_runs(tokenizer, sample):
    """Decode each maximal run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    return runs + ([tokenizer.decode(current)] if current else [])


def test_chatml_labels_are_exactly_the_assistant_turns(tokenizer):
    sample = conversation.tokenize(tokenizer, TURNS, num_visual_tokens=4, max_length=512)
    assert labelled_runs(tokenizer, sample) == ["red<|im_end|>", "blue, at the top left<|im_end|>"]


def test_vicuna_labels_are_exactly_the_assistant_turns(vicuna_tokenizer):
    sample = conversation.tokenize(vicuna_tokenizer, TURNS, num_visual_tokens=4, max_length=512)
    runs = [r.strip() for r in labelled_runs(vicuna_tokenizer, sample)]
    assert runs == ["red</s>", "blue, at the top left</s>"]


# ---------------------------------------------------------------- LLaVA's vicuna_v1 and plain, BOS

# LLaVA's llava/conversation.py, conv_vicuna_v1.system, as written there (conv_llava_v1 says "human")
LLAVA_VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                          "The assistant gives helpful, detailed, and polite answers to the user's questions.")

@pytest.fixture(scope="module")
def llama_tokenizer():
    """Llama-style: SentencePiece-like "▁" words (legacy prefix space on every piece), BOS added by
    default, EOS </s>, no chat template: what Vicuna-1.5's tokenizer looks like to our code."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = [LLAVA_VICUNA_V1_SYSTEM, "\n".join(t["value"] for t in TURNS), "USER: ASSISTANT: a red circle"]
    tokenizer.train_from_iterator(corpus * 5, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                                 special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llava_tokenizer_image_token(tokenizer, text):
    """LLaVA's tokenizer_image_token: each piece around <image> tokenized with the defaults, the
    BOS of the first piece kept, the image one IMAGE_SLOT id."""
    pieces = [tokenizer(piece)["input_ids"] for piece in text.split("<image>")]
    skip = 1 if pieces[0][:1] == [tokenizer.bos_token_id] else 0
    ids = pieces[0][:skip]
    for k, piece in enumerate(pieces):
        ids += ([IMAGE_SLOT] if k else []) + piece[skip:]
    return ids


def llava_preprocess_v1(tokenizer, turns):
    """LLaVA's get_prompt (vicuna_v1) and preprocess_v1's label arithmetic, written out: each round
    (split at </s>) masked up to its ' ASSISTANT: ' by token counts; -2 for BOS and the trailing
    space token, which in the whole text merges into the answer's first token."""
    text = LLAVA_VICUNA_V1_SYSTEM + " "
    for turn in turns:
        value = turn["value"]
        if "<image>" in value:
            value = "<image>\n" + value.replace("<image>", "").strip()
        text += ("USER: " + value + " ") if turn["from"] == "human" else ("ASSISTANT: " + value + "</s>")
    ids = llava_tokenizer_image_token(tokenizer, text)
    labels, cursor = list(ids), 1
    labels[0] = IGNORE
    for round_text in text.split("</s>")[:-1]:
        instruction = round_text.split(" ASSISTANT: ")[0] + " ASSISTANT: "
        length = len(llava_tokenizer_image_token(tokenizer, round_text))
        masked = len(llava_tokenizer_image_token(tokenizer, instruction)) - 2
        labels[cursor:cursor + masked] = [IGNORE] * masked
        cursor += length
    return text, ids, labels


def test_vicuna_v1_equals_llavas_rendering_and_labels(llama_tokenizer):
    assert llama_tokenizer.chat_template is None
    assert conversation.choose_template("auto", llama_tokenizer) == "vicuna_v1"
    text, ids, labels = llava_preprocess_v1(llama_tokenizer, TURNS)
    messages, _ = conversation.to_messages(TURNS)
    assert conversation.render(llama_tokenizer, messages, "vicuna_v1")[0] == text
    assert text.endswith("questions. USER: <image>\nWhat colour is the circle? ASSISTANT: red</s>"
                         "USER: And the square? ASSISTANT: blue, at the top left</s>")
    sample = conversation.tokenize(llama_tokenizer, TURNS, 1, 512, template="vicuna_v1")
    assert sample["input_ids"] == ids and sample["labels"] == labels
    assert ids.count(llama_tokenizer.bos_token_id) == 1 and ids[0] == llama_tokenizer.bos_token_id
    assert labelled_runs(llama_tokenizer, sample) == ["red</s>", "blue, at the top left</s>"]
    # the image tag at the end of the turn is moved to the front, as LLaVA does
    moved = [dict(TURNS[0], value="What colour is the circle?\n<image>")] + TURNS[1:]
    assert conversation.tokenize(llama_tokenizer, moved, 1, 512, template="vicuna_v1") == sample
    # QueCC's question: the tokenizer's defaults, so BOS first (the release's clip_encoder)
    assert sample["query_ids"] == llama_tokenizer("What colour is the circle?")["input_ids"]
    assert sample["query_ids"][0] == llama_tokenizer.bos_token_id


def test_vicuna_v1_prompt_is_llavas_get_prompt(llama_tokenizer):
    sample = conversation.prompt(llama_tokenizer, "What colour is the circle?", 1, template="vicuna_v1")
    text = LLAVA_VICUNA_V1_SYSTEM + " USER: <image>\nWhat colour is the circle? ASSISTANT:"
    assert sample["input_ids"] == llava_tokenizer_image_token(llama_tokenizer, text)


def test_plain_template_is_llavas_stage_one(llama_tokenizer, tokenizer):
    caption = [{"from": "human", "value": "Describe the image briefly.\n<image>"},
               {"from": "gpt", "value": "a red circle"}]
    assert conversation.choose_template("auto", llama_tokenizer, text_free_stage1=True) == "plain"
    sample = conversation.tokenize(llama_tokenizer, caption, 1, 512, template="plain")
    # preprocess_plain: <image> + caption + "\n", BOS and image masked, the question dropped
    ids = llava_tokenizer_image_token(llama_tokenizer, "<image>a red circle\n")
    assert sample["input_ids"] == ids and sample["labels"] == [IGNORE, IGNORE] + ids[2:]
    assert sample["query_ids"] == llama_tokenizer("Describe the image briefly.")["input_ids"]
    # a tokenizer without BOS (Qwen) starts at the image
    qwen = conversation.tokenize(tokenizer, caption, 1, 512, template="plain")
    assert qwen["input_ids"][0] == IMAGE_SLOT and labelled_runs(tokenizer, qwen) == ["a red circle\n"]
    with pytest.raises(ValueError, match="plain template"):
        conversation.tokenize(llama_tokenizer, TURNS, 1, 512, template="plain")


def test_a_template_that_writes_bos_gets_one_bos(llama_tokenizer):
    tokenizer = copy.deepcopy(llama_tokenizer)
    tokenizer.chat_template = "{{ bos_token }}" + VICUNA_TEMPLATE
    assert conversation.choose_template("auto", tokenizer) == "chat"
    sample = conversation.tokenize(tokenizer, TURNS, 4, 512)
    assert sample["input_ids"].count(tokenizer.bos_token_id) == 1 and sample["input_ids"][0] == tokenizer.bos_token_id
    with pytest.raises(ValueError, match="no chat template"):
        conversation.choose_template("chat", llama_tokenizer)


def test_qwen_style_tokenizers_get_no_bos(tokenizer):
    sample = conversation.tokenize(tokenizer, TURNS, 4, 512)
    assert sample["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert sample["query_ids"] == tokenizer("What colour is the circle?", add_special_tokens=False)["input_ids"]
    assert conversation.choose_template("auto", tokenizer) == "chat"


@pytest.mark.parametrize("first", ["<image>\nWhat colour is the circle?", "What colour is the circle?\n<image>"])
def test_image_slots_and_query(tokenizer, first):
    turns = [dict(TURNS[0], value=first)] + TURNS[1:]
    sample = conversation.tokenize(tokenizer, turns, num_visual_tokens=9, max_length=512)
    ids = sample["input_ids"]
    start = ids.index(IMAGE_SLOT)
    assert ids[start:start + 9] == [IMAGE_SLOT] * 9 and ids.count(IMAGE_SLOT) == 9
    assert tokenizer.decode(sample["query_ids"]) == "What colour is the circle?"
    # LLaVA's layout: the image opens the first user turn, wherever the data put the tag
    assert tokenizer.decode(ids[:start]) == "<|im_start|>user\n"


def test_span_labels_equal_the_overlap_of_every_token_and_span():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cuts = np.sort(rng.choice(60, size=2 * rng.integers(0, 5), replace=False)).tolist()
        spans = list(zip(cuts[::2], cuts[1::2]))
        offsets, position = [], 0
        for _ in range(rng.integers(0, 30)):  # tokens in text order, some of no width (BOS, image slots)
            width = int(rng.integers(0, 4))
            offsets.append((position, position + width))
            position += width
        ids = list(range(len(offsets)))
        reference = [token if any(a < end and b > start for start, end in spans) and b > a else IGNORE
                     for token, (a, b) in zip(ids, offsets)]
        assert conversation.span_labels(ids, offsets, spans) == reference


def test_a_leading_gpt_turn_is_dropped_as_llava_does(tokenizer, llama_tokenizer):
    """LLaVA's preprocess drops a first turn that is not the human's: it answers nothing."""
    lead = [{"from": "gpt", "value": "Hello! How can I help?"}] + TURNS
    for t, template in ((tokenizer, "chat"), (llama_tokenizer, "vicuna_v1")):
        assert conversation.tokenize(t, lead, 4, 512, template=template) == conversation.tokenize(t, TURNS, 4, 512, template=template)
    system = [{"from": "system", "value": "Be brief."}]
    assert conversation.to_messages(system + lead)[0] == conversation.to_messages(system + TURNS)[0]
    llava_data.check_record({"image": "x.png", "conversations": lead})


@pytest.mark.parametrize("turns", [
    [TURNS[0], TURNS[2], TURNS[1]],  # two human turns in a row
    TURNS[:2] + [TURNS[1], TURNS[3]],  # two gpt turns in a row
    TURNS[:2] + [{"from": "system", "value": "Be brief."}] + TURNS[2:],  # a system turn inside
    [TURNS[1], TURNS[1]] + TURNS,  # two leading gpt turns: one is dropped
])
def test_turns_that_do_not_alternate_are_refused_as_llava_asserts(turns):
    with pytest.raises(ValueError, match="turns must alternate human, gpt"):
        llava_data.check_record({"image": "x.png", "conversations": turns})


def test_records_are_refused_before_training_as_training_would_refuse_them(tmp_path, tokenizer):
    """valid_records with the run's tokenize: what would stop training at the record's step (a
    template that cannot take it, --max-length cutting every answer) stops it before; in
    several processes the same records, the same names, in order."""
    long = dict(good_record(tmp_path, "long"), conversations=[dict(TURNS[0], value="<image>\n" + "Why? " * 80), TURNS[1]])
    two = dict(good_record(tmp_path, "two"), conversations=TURNS)
    path = write(tmp_path, [good_record(tmp_path)] + [two, long] * 300)
    tokenize = functools.partial(conversation.tokenize, tokenizer, num_visual_tokens=4, max_length=64,
                                 template="plain")
    with pytest.raises(llava_data.BadSample, match="record 1 \\(id two\\): the plain template"):
        llava_data.load_records(path, tmp_path, tokenize=tokenize)
    tokenize.keywords["template"] = "chat"
    with pytest.raises(llava_data.BadSample, match="record 2 \\(id long\\): --max-length 64 cuts every answer token"):
        llava_data.load_records(path, tmp_path, tokenize=tokenize)
    logs = {processes: [] for processes in (1, 2)}
    kept = {processes: list(llava_data.valid_records(path, tmp_path, True, logs[processes].append, tokenize, processes))
            for processes in (1, 2)}
    assert kept[1] == kept[2] and len(kept[1]) == 301 and logs[1] == logs[2] and len(logs[1]) == 301
    assert "record 600 (id long)" in logs[1][-2]


def test_image_after_question_layout(tokenizer):
    sample = conversation.tokenize(tokenizer, TURNS, 4, 512, image_first=False)
    ids = sample["input_ids"]
    assert tokenizer.decode(ids[:ids.index(IMAGE_SLOT)]) == "<|im_start|>user\nWhat colour is the circle?\n"


def test_truncation_keeps_the_image_span_whole(tokenizer):
    long = [TURNS[0], {"from": "gpt", "value": "red " * 200}]
    sample = conversation.tokenize(tokenizer, long, num_visual_tokens=16, max_length=60)
    assert len(sample["input_ids"]) == 60 and sample["input_ids"].count(IMAGE_SLOT) == 16
    with pytest.raises(ValueError, match="would cut the image span"):
        conversation.tokenize(tokenizer, long, num_visual_tokens=144, max_length=60)


def test_collate_mixes_text_only_and_image_samples(tokenizer):
    text_only = conversation.tokenize(tokenizer, [{"from": "human", "value": "Spell cat."},
                                                  {"from": "gpt", "value": "c a t"}], 4, 512)
    with_image = conversation.tokenize(tokenizer, TURNS, 4, 512)
    text_only["pixel_values"], with_image["pixel_values"] = None, torch.ones(3, 8, 8)
    batch = conversation.collate([text_only, with_image, None], tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (1, 3, 8, 8)
    assert batch["has_image"].tolist() == [False, True]
    assert batch["query_ids"].shape[0] == 2  # every sample's question: FSDP ranks run the LLM alike
    assert batch["attention_mask"].sum(1).tolist() == [len(text_only["input_ids"]), len(with_image["input_ids"])]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


# ---------------------------------------------------------------- images

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "LA", "1"])
def test_any_image_mode_becomes_padded_rgb(tmp_path, mode):
    processor = toy.build_image_processor()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8))
    image = image.convert(mode) if mode != "I;16" else Image.fromarray(
        np.random.default_rng(0).integers(0, 65535, (30, 60), dtype=np.uint16))
    path = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    image.save(path)
    pixels = conversation.load_image(path, processor)
    assert pixels.shape == (3, 96, 96) and torch.isfinite(pixels).all()


def test_padding_uses_the_mean_colour():
    background = (122, 116, 104)
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    square = conversation.pad_to_square(wide, background)
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == background and square.getpixel((20, 20)) == (255, 0, 0)


def test_transparent_pixels_take_the_background():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert conversation.to_rgb(image, (1, 2, 3)).getpixel((0, 0)) == (1, 2, 3)


# ---------------------------------------------------------------- bad input

def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def good_record(tmp_path, rid="ok"):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    return {"id": rid, "image": "ok.png", "conversations": TURNS[:2]}


@pytest.mark.parametrize("record,message", [
    ({"id": "r1", "image": "missing.png", "conversations": TURNS[:2]}, "image not found: .*missing.png"),
    ({"id": "r1", "image": "corrupt.png", "conversations": TURNS[:2]}, "unreadable image .*corrupt.png"),
    ({"id": "r1", "conversations": TURNS[:2]}, "'<image>' in a sample that has no image"),
    ({"id": "r1", "conversations": [TURNS[0] | {"value": "hi"}]}, "no gpt turn with an answer"),
    ({"id": "r1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
     "no gpt turn with an answer"),
    ({"id": "r1", "text": "no conversations"}, "no 'conversations' list"),
])
def test_bad_record_names_file_and_record(tmp_path, record, message):
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png")
    path = write(tmp_path, [good_record(tmp_path), record])
    with pytest.raises(llava_data.BadSample, match=f"data.json: record 1 \\(id r1\\): {message}"):
        llava_data.load_records(path, tmp_path)


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good_record(tmp_path)) + "\n{\"id\": broken\n")
    with pytest.raises(llava_data.BadSample, match="data.jsonl: malformed JSON on line 2"):
        llava_data.load_records(path, tmp_path)
    path = tmp_path / "data.json"
    path.write_text("[\n" + json.dumps(good_record(tmp_path)) + ",\n{oops}]")
    with pytest.raises(llava_data.BadSample, match="data.json: malformed JSON at line 3"):
        llava_data.load_records(path, tmp_path)


def test_skip_bad_samples_logs_each_and_counts(tmp_path):
    bad = [{"id": "b1", "image": "missing.png", "conversations": TURNS[:2]},
           {"id": "b2", "conversations": [{"from": "human", "value": "hi"}]}]
    path = write(tmp_path, [good_record(tmp_path)] + bad)
    lines = []
    kept = llava_data.load_records(path, tmp_path, skip_bad=True, log=lines.append)
    assert [r["id"] for r in kept] == ["ok"]
    assert "id b1" in lines[0] and "id b2" in lines[1]
    assert lines[-1].startswith("skipped 2 bad samples of 3")


def test_image_that_fails_to_decode_names_the_record(tmp_path, tokenizer):
    good = Image.new("RGB", (64, 64), (10, 200, 30))
    good.save(tmp_path / "trunc.png")
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[:len(data) // 2])  # header fine, pixels cut off
    record = {"id": "t1", "image": "trunc.png", "conversations": TURNS[:2]}
    dataset = conversation.SupervisedDataset([record], "d.json", tmp_path, tokenizer,
                                             toy.build_image_processor(), 4, 512)
    with pytest.raises(llava_data.BadSample, match="d.json: record 0 \\(id t1\\)"):
        dataset[0]


def test_stage_one_crops_stage_two_pads(tmp_path):
    """LLaVA-1.5: pretrain.sh resizes and centre-crops, stage 2 pads to square; the feature cache
    keeps a cropped non-square image apart from its padded self (a square one is the same picture)."""
    processor = toy.build_image_processor()
    wide = Image.new("RGB", (192, 96), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 48, 96))  # a blue strip the centre crop cuts away
    wide.save(tmp_path / "wide.png")
    Image.new("RGB", (96, 96), (0, 255, 0)).save(tmp_path / "square.png")
    cropped = conversation.load_image(tmp_path / "wide.png", processor, "crop")
    padded = conversation.load_image(tmp_path / "wide.png", processor, "pad")
    assert torch.allclose(cropped, processor(images=wide.crop((48, 0, 144, 96)), return_tensors="pt")["pixel_values"][0])
    assert not torch.allclose(cropped, padded)
    assert features.image_key(tmp_path / "wide.png", "crop") != features.image_key(tmp_path / "wide.png", "pad")
    assert features.image_key(tmp_path / "square.png", "crop") == features.image_key(tmp_path / "square.png", "pad")


def test_an_image_several_records_share_is_read_once(tmp_path, monkeypatch):
    """LLaVA-665K names many COCO images in several records: validation reads each header once."""
    opened = []
    monkeypatch.setattr(conversation.Image, "open", lambda path, *a: opened.append(path) or Image.new("RGB", (4, 4)))
    records = [dict(good_record(tmp_path), id=str(i)) for i in range(3)] + [dict(good_record(tmp_path), image="b.png")]
    kept = llava_data.load_records(write(tmp_path, records), tmp_path)
    assert len(kept) == 4 and len(opened) == 2


def test_record_file_gives_back_each_record(tmp_path):
    records = [{"id": 1, "conversations": [{"from": "human", "value": "Grüße, 日本 🙂\nzwei"}]},
               {"id": "x", "image": "a/b.jpg", "conversations": []}] * 3
    llava_data.write_records([json.dumps(r, ensure_ascii=False) for r in records], tmp_path / "records")
    stored = llava_data.RecordFile(tmp_path / "records")
    assert len(stored) == 6 and [stored[i] for i in range(6)] == records and list(stored) == records


def test_records_stream_in_chunks_as_json_load_reads_them(tmp_path):
    """iter_records reads a chunk at a time: every chunk size gives json.load's records, each
    with a text that parses back to it, and a malformed record's line."""
    records = [{"id": i, "conversations": [{"from": "human", "value": "a, [b] {c}\n\"d\" Grüße"}],
                "nested": {"x": [1, 2.5, None, True]}} for i in range(30)]
    path = tmp_path / "data.json"
    text = json.dumps(records, indent=4, ensure_ascii=False)
    path.write_text(text)
    for chunk in (7, 100, 1 << 24):
        pairs = list(llava_data.iter_records(path, chunk))
        assert [r for r, _ in pairs] == records and [json.loads(t) for _, t in pairs] == records
    lines = text.splitlines()
    broken = max(i for i, line in enumerate(lines) if '"x"' in line)  # deep in the last record
    lines[broken] = lines[broken].replace("[", "[oops")
    path.write_text("\n".join(lines))
    with pytest.raises(json.JSONDecodeError) as whole:  # where json.load places the error
        json.loads("\n".join(lines))
    assert whole.value.lineno == broken + 1
    for chunk in (7, 100, 1 << 24):
        with pytest.raises(llava_data.BadSample,
                           match=f"data.json: malformed JSON at line {broken + 1}, column {whole.value.colno}: "):
            list(llava_data.iter_records(path, chunk))


@pytest.mark.parametrize("joined", ["two lists", "no comma"])
def test_a_json_list_is_refused_where_json_load_refuses_it(tmp_path, joined):
    """`cat a.json b.json`: json.load refuses the data after the first list's ']', where reading up
    to that bracket took half the records; two records without a comma between them likewise."""
    records = [{"id": i, "conversations": [{"from": "human", "value": "a, [b] {c}"}]} for i in range(6)]
    halves = json.dumps(records[:3], indent=2), json.dumps(records[3:], indent=2)
    text = halves[0] + "\n" + halves[1] if joined == "two lists" else json.dumps(records).replace("}, {", "} {", 1)
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as whole:
        json.loads(text)
    for chunk in (7, 100, 1 << 24):
        with pytest.raises(llava_data.BadSample, match=f"data.json: malformed JSON at line {whole.value.lineno}, "
                                                       f"column {whole.value.colno}: {whole.value.msg}"):
            list(llava_data.iter_records(path, chunk))
    path.write_text(halves[0] + "\n \n")  # white space after the list is fine
    assert [r for r, _ in llava_data.iter_records(path, 7)] == records[:3]
