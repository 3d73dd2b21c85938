"""VLM.forward computes the head and the loss on label positions only: the same loss and the same
gradients as logits at every position (bench_train_step.all_positions_loss, the old computation),
with padding, text-only samples, samples whose every label was cut, in one chunk or several,
with LoRA, and under FSDP on 2 CPU processes (this file is also the torchrun worker)."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import constants  # noqa: E402
import conversation  # noqa: E402
import modeling_vlm  # noqa: E402
import vlm  # noqa: E402
from bench_train_step import all_positions_loss  # noqa: E402

SEVERAL_CHUNKS = 3 * 512  # logits per chunk: 3 rows of the toy vocabulary


def mixed_batch(toy_data, tokenizer, processor, which, tokens=4):
    """which: 'mixed' (a text-only sample, two image samples of other lengths, one image sample whose
    every label was cut, as --max-length does to a long prompt) or 'unlabelled' (only the last)."""
    records = json.load(open(toy_data / "finetune.json"))
    records = [r for r in records if "image" not in r][:1] + [r for r in records if "image" in r][:3]
    dataset = conversation.SupervisedDataset(records, "f", toy_data / "images", tokenizer, processor, tokens, 512)
    samples = [dataset[i] for i in range(len(records))]
    samples[-1]["labels"] = [constants.IGNORE] * len(samples[-1]["labels"])
    assert len({len(s["input_ids"]) for s in samples}) > 1  # padded
    return conversation.collate(samples if which == "mixed" else samples[-1:], tokenizer.pad_token_id)


def loss_and_gradients(model, batch, compute):
    model.zero_grad(set_to_none=True)
    loss, count = compute(model, batch)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    full = {name: None if g is None else (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
            for name, g in grads.items()}
    return loss.detach(), count, full


def relative_differences(model, batch):
    """-> (loss difference, {parameter: gradient difference}), each relative to the old computation."""
    ref_loss, ref_count, ref = loss_and_gradients(model, batch, all_positions_loss)
    loss, count, got = loss_and_gradients(model, batch, lambda m, b: m(**b))
    assert count == ref_count
    assert set(got) == set(ref) and all((got[n] is None) == (ref[n] is None) for n in ref)
    # float64: what is left is summation order, far below 1e-6; a gradient that is zero in exact
    # arithmetic (the key bias before a softmax) is rounding noise, so norms below 1e-9 count as 1e-9
    grads = {n: ((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-9)).item()
             for n in ref if ref[n] is not None}
    return ((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-9)).item(), grads


def build(lora=False, compressor="quecc", tokens=4):
    torch.manual_seed(0)
    model, tokenizer, processor = vlm.build("toy", "toy", tokens, compressor)
    if lora:
        from peft import LoraConfig, get_peft_model
        model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         task_type="CAUSAL_LM"))
    return model.double().eval(), tokenizer, processor  # eval: no dropout, both passes see the same model


@pytest.mark.parametrize("chunk, lora", [(modeling_vlm.LOGITS_PER_CHUNK, False), (SEVERAL_CHUNKS, False),
                                         (SEVERAL_CHUNKS, True)], ids=["one-chunk", "several-chunks", "lora"])
def test_label_only_loss_and_gradients_equal_full_logits(toy_data, monkeypatch, chunk, lora):
    monkeypatch.setattr(modeling_vlm, "LOGITS_PER_CHUNK", chunk)
    model, tokenizer, processor = build(lora)
    batch = mixed_batch(toy_data, tokenizer, processor, "mixed")
    loss, grads = relative_differences(model, batch)
    assert loss <= 1e-6 and max(grads.values()) <= 1e-6, (loss, max(grads.items(), key=lambda kv: kv[1]))
    # compared where it matters: the tied embedding/head (the head's gradient now comes from the
    # label rows alone), a decoder layer or its LoRA adapters, the projector
    expected = ["lora_A", "lora_B"] if lora else ["embed_tokens.weight", "layers.0.mlp.up_proj.weight"]
    assert all(any(e in n for n in grads) for e in expected + ["projector."]), list(grads)


def test_the_head_runs_on_label_rows_only_a_chunk_at_a_time(toy_data, monkeypatch):
    monkeypatch.setattr(modeling_vlm, "LOGITS_PER_CHUNK", SEVERAL_CHUNKS)
    model, tokenizer, processor = build()
    batch = mixed_batch(toy_data, tokenizer, processor, "mixed")
    rows = []
    model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    _, count = model(**batch)
    samples = len(batch["input_ids"])
    assert rows[:2] == [samples, samples]  # QueCC's question pass and the LLM's forward: logits_to_keep=1
    assert sum(rows[2:]) == count and max(rows[2:]) == SEVERAL_CHUNKS // 512 < count  # the labels, in chunks


def test_a_micro_batch_without_labels_gives_zero_loss_and_zero_gradients(toy_data):
    model, tokenizer, processor = build()
    batch = mixed_batch(toy_data, tokenizer, processor, "unlabelled")
    loss, count = model(**batch)
    loss.backward()  # in the graph: under FSDP this rank joins the backward's collectives
    assert loss.item() == 0 and count == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_fsdp_two_processes_label_only_equals_full_logits(toy_data, tmp_path):
    from conftest import run_script
    out = tmp_path / "differences.json"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "tests/test_label_loss.py",
               str(toy_data), str(out), env=dict(os.environ, OMP_NUM_THREADS="1"))
    differences = json.load(open(out))
    assert sorted(differences) == sorted(FSDP_COMPRESSORS)
    for compressor, ranks in differences.items():
        for rank, (loss, grads) in enumerate(ranks):
            assert loss <= 1e-6 and max(grads.values()) <= 1e-6, (compressor, rank, loss, grads)
            assert any("layers.0" in n for n in grads) and any("projector" in n for n in grads)


FSDP_COMPRESSORS = ("quecc", "pool", "pixelshuffle", "resampler")
FSDP_TOKENS = 16  # made by each of them (pixel shuffle refuses 4)


def fsdp_worker(toy_data, out):
    """Each rank its own micro-batch (rank 1: no label at all, the case a rank could skip the
    backward's collectives in); the LLM sharded as train.py does; several loss chunks. With
    QueCC and with the text-free ones: without QueCC's question pass, nothing has run the whole
    LLM (and gathered its embeddings and head) before the training forward."""
    import torch.distributed as dist
    import train
    from pathlib import Path
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    modeling_vlm.LOGITS_PER_CHUNK = SEVERAL_CHUNKS
    differences = {}
    for compressor in FSDP_COMPRESSORS:
        model, tokenizer, processor = build(compressor=compressor, tokens=FSDP_TOKENS)
        train.shard_llm(model, torch.float64)  # computed in the weights' own dtype, as on a CPU
        batch = mixed_batch(Path(toy_data), tokenizer, processor, ["mixed", "unlabelled"][rank], FSDP_TOKENS)
        differences[compressor] = [None, None]
        dist.all_gather_object(differences[compressor], relative_differences(model, batch))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(differences, f)
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: in some import orders a library's C++ thread outlives it and
    # the process aborts at exit ("terminate called without an active exception") after all the
    # work is done and written; the assertions are on differences.json, not on teardown.
    os._exit(0)


if __name__ == "__main__":
    fsdp_worker(*sys.argv[1:])
