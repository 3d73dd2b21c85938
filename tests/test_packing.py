"""--packing: a step's samples concatenated into rows of up to --max-length tokens, each sample attending
to itself alone, positions restarting at 0, visual tokens and QueCC's question per sample. The loss and
the gradients equal the unpacked batch's (float64, to summation order), with the label-only loss, LoRA
and gradient checkpointing, with every compressor (QueCC's question and each image's own tokens per
sample), under modeling_vlm.attend_per_sample (what a VLM runs sdpa as) and under sdpa with
transformers' block-diagonal mask. Whole runs (FSDP on 2 processes, resume mid-epoch, the trained
weights): tests/test_scale_out.py."""
import json
import os
import runpy
import sys

import pytest
import torch

import conversation
import modeling_vlm
import train
import vlm
from conftest import ROOT
from constants import IGNORE, IMAGE_SLOT
from test_label_loss import build, loss_and_gradients

ROW = 320  # --max-length of the packed rows: the toy samples (29-191 tokens) fit one to four a row


def toy_samples(toy_data, tokens):
    """Two text-only and six image samples of the toy world with V visual tokens each."""
    _, tokenizer, processor = vlm.build("toy", "toy", tokens, "quecc")
    records = json.load(open(toy_data / "finetune.json"))
    records = [r for r in records if "image" not in r][:2] + [r for r in records if "image" in r][:6]
    dataset = conversation.SupervisedDataset(records, "f", toy_data / "images", tokenizer, processor, tokens, 512)
    return [dataset[i] for i in range(len(records))]


@pytest.fixture(scope="module")
def samples(toy_data):
    """toy_samples at V = 4: 29 to 191 tokens."""
    return toy_samples(toy_data, 4)


def test_pack_fills_the_fewest_rows_that_hold_every_sample():
    lengths = [5, 3, 3, 2, 2, 1]
    rows = conversation.pack(lengths, 8)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert [sum(lengths[i] for i in row) for row in rows] == [8, 8]  # 16 tokens in two full rows
    four = conversation.pack(lengths, 8, rows=4)  # at least one row for each of 4 micro-batches
    assert len(four) == 4 and max(sum(lengths[i] for i in row) for row in four) <= 8
    assert len(conversation.pack([7, 7, 7], 8)) == 3  # 21 tokens would need 3 rows of 8 anyway
    assert conversation.pack([], 8, rows=2) == []
    with pytest.raises(ValueError, match="9 tokens does not fit a row of --max-length 8"):
        conversation.pack([9], 8)


def test_a_packed_step_keeps_each_sample_whole_and_in_order(samples, tokenizer):
    micro = conversation.collate_packed(samples + [None], tokenizer.pad_token_id, ROW, 2)  # None: a skipped sample
    assert len(micro) == 2  # the step's micro-batches, whatever the lengths: FSDP ranks run alike
    seen = []
    for batch in micro:
        assert batch["input_ids"].shape[1] <= ROW and batch["input_ids"].shape[0] < len(batch["has_image"])
        images = iter(batch["pixel_values"])
        for ids, labels, positions, real in zip(batch["input_ids"], batch["labels"], batch["position_ids"],
                                                batch["attention_mask"]):
            starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
            for a, b in zip(starts, starts[1:]):
                if not real[a]:  # the padding after the row's last sample: a block of its own
                    assert b == len(ids) and not real[a:].any() and (labels[a:] == IGNORE).all()
                    continue
                sample = next(s for s in samples if s["input_ids"] == ids[a:b].tolist())
                assert positions[a:b].tolist() == list(range(b - a))
                assert labels[a:b].tolist() == [IGNORE] + sample["labels"][1:]
                if IMAGE_SLOT in sample["input_ids"]:  # images stacked in the order their slots come
                    assert torch.equal(next(images), sample["pixel_values"])
                seen.append(sample)
        assert next(images, None) is None
    assert len(seen) == len(samples) and all(any(s is t for t in seen) for s in samples)
    assert [s is not None and conversation.has_image(s) for s in seen] == \
           [flag for batch in micro for flag in batch["has_image"].tolist()]  # per sample, in row order


def relative(got, ref):
    return max(((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-9)).item() for n in ref if ref[n] is not None)


def summed(micro_batches, compute):
    """The model's (loss, label count) over several micro-batches, as one backward of a step."""
    losses, counts = zip(*(compute(model, batch) for model, batch in micro_batches))
    return sum(losses), sum(counts)


def block_diagonal_mask(model):
    """The model's LLM on transformers' own sdpa, which attends under the block-diagonal mask."""
    model.llm.config._attn_implementation = "sdpa"
    return model


def assert_packed_equals_padded(model, samples, pad_id, row, computes=(lambda m, b: m(**b),)):
    """The loss, label count and gradients of the samples packed into 2 micro-batches of rows of at
    most `row` tokens (each compute: a micro-batch's (loss, label count)) equal the padded batch's.
    -> the gradients' names."""
    # a label on each first token: unpacked nothing predicts it, packed the sample before it must not
    samples = [dict(s, labels=s["input_ids"][:1] + s["labels"][1:]) for s in samples]
    padded = conversation.collate(samples, pad_id)
    packed = conversation.collate_packed(samples, pad_id, row, 2)
    assert sum(len(b["input_ids"]) for b in packed) < len(samples)  # rows of several samples
    ref_loss, ref_count, ref = loss_and_gradients(model, padded, lambda m, b: m(**b))
    for compute in computes:
        loss, count, got = loss_and_gradients(model, packed, lambda m, _: summed([(m, b) for b in packed], compute))
        assert count == ref_count > 0
        # float64, but the cross-entropy is summed in fp32 (label_loss casts the logits): what is
        # left is summation order; a gradient zero in exact arithmetic (the key bias before a
        # softmax) is rounding noise, so norms below 1e-9 count as 1e-9
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
        assert relative(got, ref) <= 1e-6
    return list(ref)


@pytest.mark.parametrize("setting", ["plain", "lora", "grad-checkpointing", "block-diagonal-mask"])
def test_packed_loss_and_gradients_equal_the_padded_batch(samples, tokenizer, setting):
    model, _, _ = build(lora=setting == "lora")
    assert model.llm.config._attn_implementation == modeling_vlm.PER_SAMPLE
    if setting == "block-diagonal-mask":
        block_diagonal_mask(model)
    if setting == "grad-checkpointing":
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as train.py
        model.train()  # checkpointing recomputes only in training mode (the toy LLM has no dropout)
    names = assert_packed_equals_padded(model, samples, tokenizer.pad_token_id, ROW,
                                        (lambda m, b: m(**b), train_bench_all_positions))  # label-only, every position
    assert any("lora_A" in n for n in names) == (setting == "lora")


@pytest.mark.parametrize("compressor", ["tokenpacker", "pool", "pixelshuffle", "resampler"])
def test_every_compressor_keeps_its_visual_tokens_per_sample_when_packed(toy_data, tokenizer, compressor):
    """QueCC above; the others' queries (TokenPacker's regions, the resampler's latents) and outputs
    are each image's own too. At V = 16, which all of them make: samples of 29 to 203 tokens."""
    model, _, _ = build(compressor=compressor, tokens=16)
    names = assert_packed_equals_padded(model, toy_samples(toy_data, 16), tokenizer.pad_token_id, ROW + 12)
    assert any(n.startswith("projector.") for n in names)


def train_bench_all_positions(model, batch):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_train_step import all_positions_loss
    return all_positions_loss(model, batch)


@pytest.mark.parametrize("attention", [modeling_vlm.PER_SAMPLE, "block-diagonal-mask"])
def test_a_packed_sample_sees_only_itself(samples, tokenizer, monkeypatch, attention):
    """Change one sample's prompt and image: the hidden states the loss reads at the labels of the
    sample beside it in the row do not move (they would, were attention across samples, or the
    positions running on), and they are those of that sample alone."""
    model, _, _ = build()
    if attention != modeling_vlm.PER_SAMPLE:
        block_diagonal_mask(model)
    at_labels, loss = [], modeling_vlm.label_loss
    monkeypatch.setattr(modeling_vlm, "label_loss", lambda head, hidden, targets: at_labels.append(hidden) or loss(head, hidden, targets))
    first, second = samples[6], samples[7]  # two image samples, 127 + 94 tokens: one row
    changed = dict(first, pixel_values=first["pixel_values"].flip(-1),
                   input_ids=[t if label != IGNORE or t == IMAGE_SLOT or k == 0 else (t + 1) % 300 + 3
                              for k, (t, label) in enumerate(zip(first["input_ids"], first["labels"]))])
    with torch.no_grad():
        for sample in (first, changed):
            batch = conversation.collate_packed([sample, second], tokenizer.pad_token_id, ROW, 1)[0]
            assert batch["input_ids"].shape[0] == 1 and batch["input_ids"][0, 0] == first["input_ids"][0]
            model(**batch)
        model(**conversation.collate([second], tokenizer.pad_token_id))
    before, after, alone = at_labels
    split = sum(label != IGNORE for label in first["labels"][1:])
    assert not torch.allclose(before[:split], after[:split], atol=1e-3)  # the change reached the model
    assert torch.equal(before[split:], after[split:]) and len(alone) == len(before) - split > 0
    assert torch.allclose(alone, after[split:], rtol=0, atol=1e-12)


def test_a_packed_row_attends_one_sample_at_a_time(samples, tokenizer, monkeypatch):
    """attend_per_sample runs sdpa on each sample's span (and on a row's padding, a span of its own),
    not on the whole row under a mask; an unpacked batch goes to sdpa whole, with its padding mask."""
    model, _, _ = build()
    calls, sdpa = [], modeling_vlm.sdpa_attention_forward

    def recorded(module, query, key, value, mask, **kwargs):
        calls.append((query.shape[0], query.shape[2], mask is not None))  # rows, length, masked
        return sdpa(module, query, key, value, mask, **kwargs)
    monkeypatch.setattr(modeling_vlm, "sdpa_attention_forward", recorded)
    layers, three = model.llm.config.num_hidden_layers, samples[2:5]  # 191, 156 and 150 tokens: two rows, 191 alone
    packed = conversation.collate_packed(three, tokenizer.pad_token_id, ROW, 1)[0]
    padded = conversation.collate(three, tokenizer.pad_token_id)
    spans = [n for row in packed["position_ids"]
             for n in torch.cat([(row == 0).nonzero().flatten(), torch.tensor([len(row)])]).diff().tolist()]
    assert sorted(spans) == sorted([191, 156, 150, 306 - 191])  # the three samples, the padding of the short row
    with torch.no_grad():
        for batch, expected in ((packed, [(1, n, False) for n in spans]), (padded, [(3, 191, True)])):
            calls.clear()
            model(**batch)
            assert all(rows == 3 for rows, _, _ in calls[:layers])  # QueCC's question pass, as sdpa
            assert calls[layers:] == expected * layers


@pytest.mark.parametrize("flags, words", [
    (["--loss-norm", "llava"], "--loss-norm llava averages the mean loss of each micro-batch"),
    (["--group-by-length"], "--group-by-length and --packing both choose"),
])
def test_packing_refuses_what_it_would_change(toy_data, tmp_path, monkeypatch, capsys, flags, words):
    monkeypatch.setattr(sys, "argv", ["02_finetune.py", "--llm", "toy", "--vision", "toy", "--projector", "none",
                                      "--data", str(toy_data / "finetune.json"), "--image-folder",
                                      str(toy_data / "images"), "--output-dir", str(tmp_path), "--packing", *flags])
    monkeypatch.setattr(train, "main", train.parse_args)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, "02_finetune.py"), run_name="__main__")
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("02_finetune.py: error: ") and words in error
