"""The training program both stages run: arguments, build, loop, save.

It reads top-down: the configuration (constants, arguments and their checks), then the pieces of a
run (the model, the data, one optimizer step, checkpoints, evaluation while training), then main(),
the run itself, which reads as the table of contents of the rest.

01_pretrain_projector.py and 02_finetune.py call main() with their stage's
defaults (LLaVA-1.5's numbers); everything else is shared, so the two stages
cannot drift apart. One process, `torchrun` or `accelerate launch` all work:
with more than one process the LLM's decoder layers are sharded with FSDP2
(torch's own fully_shard; it also shards on CPU with gloo), the frozen vision
tower and the small projector are replicated. What the run keeps on disk to be
killed and resumed is runs.py; the data file's reading and checks, llava_data.py.
"""
import argparse
import functools
import itertools
import json
import math
import os
import random
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

import constants
import conversation
import distributed
import evaluation
import features
import llava_data
import compressors
import runs
import vlm


VISION = "openai/clip-vit-large-patch14-336"  # LLaVA-1.5's tower (scripts/v1_5/*.sh; docs/sources.md)
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
STANDARDIZE_IMAGES = 256  # the training images --standardize-features measures
RECORDS_DIR = "records"  # in the output directory while training runs
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "4-bit"}


# ---------------------------------------------------------------- configuration

def add_training_arguments(p, stage):
    """The model, the data, the optimization and the run's output directory."""
    p.add_argument("--llm", default="toy", help="hub name, local directory, or toy preset (toy, toy-xs/s/m/l)")
    p.add_argument("--vision", default=VISION, help="hub name, directory, or toy")
    p.add_argument("--tokens", type=int, default=4, help="visual tokens V per image")
    p.add_argument("--compressor", default="quecc", choices=list(compressors.COMPRESSORS),
                   help="what turns the tower's patches into V visual tokens (docs/quecc.md)")
    p.add_argument("--data", default=stage["data"], help="LLaVA-format JSON or JSONL")
    p.add_argument("--image-folder", default=stage["image_folder"], help="the folder the records' image paths start from")
    p.add_argument("--output-dir", help=f"default runs/LLM-COMPRESSOR-vTOKENS/{stage['output']} (LLM: the last part of --llm)")
    p.add_argument("--projector", help="output directory of stage 1 to start the projector from (stage 2's "
                   "default: the stage1 folder next to --output-dir); 'none': a fresh projector")
    p.add_argument("--lr", type=float, default=stage["lr"], help="peak learning rate: linear warmup, then cosine to zero")
    p.add_argument("--projector-lr", type=float, help="projector learning rate when it differs (LoRA: 2e-5)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's weight decay")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="the share of the steps the learning rate warms up")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0 = never)")
    p.add_argument("--batch-size", type=int, default=stage["batch_size"], help="global batch, all devices")
    p.add_argument("--micro-batch-size", type=int, default=8, help="per device; the rest is accumulation")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data, each in its own shuffled order")
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps; overrides --epochs")
    p.add_argument("--max-length", type=int, default=2048, help="tokens a sample keeps; a record it would leave "
                   "without an answer token, or cut the image span of, is refused")
    p.add_argument("--seed", type=int, default=42, help="the data order and every random draw")
    p.add_argument("--skip-bad-samples", action="store_true", help="log and leave out a record training cannot take "
                   "instead of stopping at it (llava_data.BadSamples)")
    p.add_argument("--num-workers", type=int, default=2, help="data-loader processes per device")
    p.add_argument("--image-after-question", action="store_true",
                   help="put the image after the question (deviation from LLaVA; enables prefix caching)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on the LLM (0 = full finetuning)")
    p.add_argument("--qlora", action="store_true", help="LLM in 4-bit NF4 with LoRA on top")
    p.add_argument("--optim", default="adamw", choices=["adamw", "adamw8bit"],
                   help="adamw8bit: bitsandbytes' 8-bit AdamW, smaller optimizer states")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute the LLM's activations in the backward pass: less memory, more compute")
    p.add_argument("--group-by-length", action="store_true", help="sort each global batch by length")
    p.add_argument("--packing", action="store_true", help="pack each device's samples of a step into rows of up to "
                   "--max-length tokens, each sample attending to itself alone: little padding (docs/training.md)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = never)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output directory that holds another run (its outputs are deleted)")
    p.add_argument("--standardize-features", action="store_true",
                   help=f"standardize the vision features per channel, with statistics of the first {STANDARDIZE_IMAGES} training "
                        "images, stored in the projector (for a tower whose features share a large picture-independent part, as a "
                        "random one's do; quecc.Standardize)")
    p.add_argument("--feature-cache", metavar="DIR", help="encode each image once with the frozen vision tower "
                   "and reuse the features across runs and epochs (features.py)")


def add_recipe_arguments(p, stage):
    """How conversations are rendered, images prepared and the loss normalised; what is evaluated
    while training."""
    # the recipe as LLaVA-1.5 ran it (conversation.py); what is chosen is stored in config.json
    p.add_argument("--conv-template", default="auto", choices=("auto",) + conversation.TEMPLATES,
                   help="auto: stage 1 of tokenpacker/pool/mlp uses LLaVA's plain (image, caption); otherwise the "
                        "LLM's chat template, or LLaVA's vicuna_v1 when it has none (Vicuna-1.5)")
    p.add_argument("--image-aspect", choices=["crop", "pad"], default="pad" if stage["train_llm"] else "crop",
                   help="pad to square with the mean colour (LLaVA-1.5 stage 2, the default here) or the "
                        "processor's resize and centre crop (LLaVA-1.5 stage 1, the default there)")
    p.add_argument("--loss-norm", default="tokens", choices=["tokens", "llava"],
                   help="tokens: token losses summed over the global batch / its label tokens; llava: each "
                        "micro-batch's mean, averaged (HF Trainer, as in the paper's runs)")
    p.add_argument("--show-samples", type=int, default=0, metavar="N", help="print the first N training records "
                   "as the model sees them (JSON lines: id, text, targets, query) and exit without training")
    # evaluation while training (evaluation.live_scores): 03_evaluate.py's answers of the live model
    p.add_argument("--eval-every", type=int, default=0, metavar="N", help="score the model on --eval-bench every N "
                   "steps, into log.jsonl (0 = never)")
    p.add_argument("--eval-bench", metavar="NAMES", help="comma-separated benchmarks, read as 03_evaluate.py reads them")
    p.add_argument("--eval-limit", type=int, default=0, metavar="K", help="the first K questions of each (0 = all)")
    p.add_argument("--eval-data-root", default="data/eval", help="folder holding BENCH/questions.jsonl and BENCH/images/")
    p.add_argument("--eval-max-new-tokens", type=int, default=128, help="the longest answer generated")


def check_values(p, args):
    """Refuse a value that would train nonsense, in one line, before any model is built."""
    positive = ["batch_size", "micro_batch_size", "epochs", "max_length", "lr", "eval_max_new_tokens"]
    non_negative = ["max_steps", "max_grad_norm", "weight_decay", "save_every", "num_workers", "lora", "show_samples",
                    "eval_every", "eval_limit"]
    for name in positive + non_negative:
        value = getattr(args, name)
        if value < 0 or (value == 0 and name in positive):
            p.error(f"--{name.replace('_', '-')} must be {'positive' if name in positive else '>= 0'}, got {value}")
    if args.projector_lr is not None and args.projector_lr <= 0:
        p.error(f"--projector-lr must be positive, got {args.projector_lr}")
    if not 0 <= args.warmup_ratio <= 1:
        p.error(f"--warmup-ratio must lie in [0, 1], got {args.warmup_ratio}")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --output-dir, --overwrite deletes it: give one")
    if bool(args.eval_every) != bool(args.eval_bench):
        p.error("--eval-every N and --eval-bench NAMES go together")
    if args.packing and args.loss_norm == "llava":
        p.error("--loss-norm llava averages the mean loss of each micro-batch, and --packing changes which samples "
                "share a micro-batch: use --loss-norm tokens with --packing")
    if args.packing and args.group_by_length:
        p.error("--group-by-length and --packing both choose which samples share a micro-batch: give one")


def check_output_dir(p, args):
    if args.show_samples:
        return  # writes nothing
    if os.path.isfile(args.output_dir):
        p.error(f"--output-dir {args.output_dir} is a file")
    # an output directory that is or holds what the run reads: --overwrite would delete a stage-1
    # projector, a run would write into its own inputs (a toy preset or hub name is no path)
    output = os.path.realpath(args.output_dir)
    local_model = (lambda name: name if os.path.isabs(vlm.loadable(name)) else None)
    inputs = {"--projector": args.projector, "--data": args.data, "--image-folder": args.image_folder,
              "--llm": local_model(args.llm), "--vision": local_model(args.vision)}
    for flag, path in inputs.items():
        if path and os.path.exists(path) and os.path.commonpath([output, os.path.realpath(path)]) == output:
            p.error(f"--output-dir {args.output_dir} {'is' if os.path.realpath(path) == output else 'holds'} "
                    f"the {flag} {path} this run reads; write the run to another directory")
    try:  # made now, not after an hour of loading and validating
        os.makedirs(args.output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.output_dir).close()
    except OSError as e:
        p.error(f"--output-dir {args.output_dir} is not writable ({e.strerror})")


def fill_defaults(args, stage):
    """The command as typed (`02_finetune.py --llm Qwen/Qwen1.5-7B-Chat --tokens 4`) runs on LLaVA's
    layout under data/ (docs/data.md) and writes runs/Qwen1.5-7B-Chat-quecc-v4/stage2, starting from
    the stage1 folder next to it. Missing data or a missing stage 1 stop here, before a model loads."""
    run = os.path.join("runs", f"{os.path.basename(os.path.normpath(args.llm))}-{args.compressor}-v{args.tokens}")
    args.output_dir = args.output_dir or os.path.join(run, stage["output"])
    for path, kind in ((args.data, "data file"), (args.image_folder, "image folder")):
        if not os.path.exists(path):
            raise SystemExit(f"error: {kind} {path} not found; {stage['source']} (docs/data.md)")
    if args.train_llm and args.projector is None and not args.show_samples:  # rendering needs no projector
        stage1 = os.path.join(os.path.dirname(os.path.normpath(args.output_dir)), "stage1")
        vlm.refuse_earlier_layout(stage1)
        if not os.path.exists(os.path.join(stage1, vlm.CONFIG_FILE)):
            command = ["python", "01_pretrain_projector.py", "--llm", args.llm, "--tokens", str(args.tokens)]
            command += ["--vision", args.vision] if args.vision != VISION else []
            command += ["--compressor", args.compressor] if args.compressor != "quecc" else []
            command += ["--output-dir", stage1] if stage1 != os.path.join(run, "stage1") else []
            raise SystemExit(f"error: no stage-1 projector in {stage1}; run stage 1 first: {shlex.join(command)} "
                             "(or --projector DIR; --projector none starts from a fresh projector)")
        args.projector = stage1
    if args.projector == "none":
        args.projector = None
    if args.projector and not os.path.exists(os.path.join(args.projector, vlm.CONFIG_FILE)):
        vlm.refuse_earlier_layout(args.projector)
        raise SystemExit(f"error: --projector {args.projector} holds no stage-1 output (no {vlm.CONFIG_FILE}); "
                         "give the output directory of 01_pretrain_projector.py, or --projector none")


def parse_args(stage):
    p = argparse.ArgumentParser(description=stage["description"])
    add_training_arguments(p, stage)
    add_recipe_arguments(p, stage)
    args = p.parse_args()
    check_values(p, args)
    if args.qlora and not args.lora:
        args.lora = 64  # QLoRA's usual rank
    args.train_llm = stage["train_llm"]
    fill_defaults(args, stage)
    check_output_dir(p, args)
    if args.lora and not args.train_llm:
        p.error("--lora/--qlora train the LLM; stage 1 trains the projector only")
    if args.standardize_features and args.projector:
        p.error("--standardize-features fits a new projector's statistics; --projector brings its own")
    return args


def check_batch(args, world, compute, say):
    """Say which `accelerate launch` settings this program does not take, and refuse a global batch
    the processes cannot share evenly. -> the micro-batches each process accumulates a step."""
    not_taken = distributed.accelerate_settings_not_taken(
        compute, f"fp32 weights, {DTYPE_NAMES[compute]} compute",
        "torch FSDP2 of each decoder layer whenever more than one process runs, no CPU offload; --grad-checkpointing")
    if not_taken:
        say(not_taken)
    accumulation, remainder = divmod(args.batch_size, world * args.micro_batch_size)
    if remainder or accumulation == 0:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of world size {world} "
                         f"x --micro-batch-size {args.micro_batch_size}")
    return accumulation


def check_token_count(args):
    """A token count the compressor cannot make, refused from the tower's config alone, before the
    models load."""
    with vlm.loading("vision tower", args.vision):
        grid = vlm.vision_grid(args.vision)  # its config alone
    try:
        compressors.check_token_count(args.tokens, grid, args.compressor)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def stop(message):
    """Exit with one line, on every rank at once: a live process group aborts the process on its
    way out, so it ends first."""
    distributed.end_distributed()
    raise SystemExit(message)


# ---------------------------------------------------------------- the model

def precision(args, device):
    """-> (dtype the LLM is held in, compute dtype). What trains is held, reduced and updated in fp32
    whatever dtype its checkpoint stores (Qwen1.5 bf16, Vicuna-1.5 fp16): at stage 2's lr of 2e-5 an
    Adam update is below half a bf16 step for every weight above ~0.01, so bf16 weights would round
    most updates away (LLaVA's DeepSpeed bf16 keeps fp32 masters too). On a GPU the forward and
    backward run in bf16 (autocast; FSDP2 gathers bf16 copies of the fp32 shards and reduces the
    gradients in fp32), on a CPU in fp32. What is frozen (the vision tower, stage 1's LLM, the
    LoRA/QLoRA base) is only ever read, so it is held in the compute dtype."""
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    return (torch.float32 if args.train_llm and not args.lora else compute), compute


def describe_precision(model, compute):
    """The dtypes as they are, for the log: 'weights fp32 (trained), bf16 (frozen); compute bf16'.
    (QLoRA's 4-bit layers are stored as uint8.)"""
    def names(params):
        return "/".join(sorted({DTYPE_NAMES.get(p.dtype, str(p.dtype)) for p in params})) or "-"
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return f"weights {names(trained)} (trained), {names(frozen)} (frozen); compute {DTYPE_NAMES[compute]}"


def reads_question(args):
    return compressors.COMPRESSORS[args.compressor].needs_question


def conv_template(args, tokenizer):
    """--conv-template resolved (conversation.choose_template): QueCC is the compressor that reads
    the question, so stage 1 of any other is text-free."""
    return conversation.choose_template(args.conv_template, tokenizer,
                                        text_free_stage1=not args.train_llm and not reads_question(args))


def build_model(args, llm_dtype, compute):
    quantization = None
    if args.qlora:
        from transformers import BitsAndBytesConfig
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    model, tokenizer, image_processor = vlm.build(args.llm, args.vision, args.tokens, args.compressor,
                                                  llm_dtype, quantization)
    model.vision.to(compute)
    if args.projector:
        vlm.load_projector(model, args.projector)
    model.llm.requires_grad_(args.train_llm and not args.lora)  # with LoRA, peft picks what trains
    if args.lora:
        from peft import LoraConfig, get_peft_model
        model.llm = get_peft_model(model.llm, LoraConfig(r=args.lora, lora_alpha=2 * args.lora,
                                                         target_modules="all-linear", lora_dropout=0.05,
                                                         task_type="CAUSAL_LM"))
    if args.grad_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.grad_checkpointing or not args.train_llm:
        # Stage 1: a micro-batch without an image would otherwise have a loss with no gradient
        # at all (nothing to backpropagate, and FSDP ranks out of step); checkpointing needs it too.
        model.llm.enable_input_require_grads()
    return model, tokenizer, image_processor


def shard_llm(model, compute):
    """FSDP2: each decoder layer is one unit (all-gathered just before it runs), then the rest
    of the LLM (embeddings, final norm, head) as the root unit. The shards keep the weights' dtype (fp32
    when they train: train.precision); to compute in bf16, what is gathered is cast to bf16 and the
    gradients are reduced in fp32. In any other compute dtype FSDP computes in the weights' own."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if compute == torch.bfloat16 else MixedPrecisionPolicy()
    for layer in model.llm.get_decoder().layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model.llm, mp_policy=policy)


def count_params(module):
    """(local, global) parameter counts; under FSDP local is this rank's shard."""
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in module.parameters())
    return local, sum(p.numel() for p in module.parameters())


def prepare_model(args, llm_dtype, compute, device, world, say):
    """build_model, its conversation template chosen and stored with it, the LLM sharded when more
    than one process runs, the whole placed on the device. -> (model, tokenizer, image_processor,
    template)"""
    try:
        model, tokenizer, image_processor = build_model(args, llm_dtype, compute)
    except vlm.ProjectorMismatch as e:
        stop(f"error: {e}")
    try:
        template = conv_template(args, tokenizer)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    # saved with the model (config.json): 03_evaluate renders and preprocesses as trained
    model.config.update(dict(conv_template=template, image_aspect=args.image_aspect, loss_norm=args.loss_norm,
                             image_first=not args.image_after_question))
    say(f"conversation template {template}, images {args.image_aspect}")
    if world > 1:
        if args.lora or args.qlora:
            raise SystemExit("--lora/--qlora are the single-GPU savers; with several processes use FSDP")
        shard_llm(model, compute)
        local, total = count_params(model.llm)
        say(f"FSDP: world={world}, LLM params per rank {local / 1e6:.2f}M of {total / 1e6:.2f}M")
    if not args.qlora:
        model.to(device)
    else:
        model.vision.to(device), model.projector.to(device)
    say(f"precision: {describe_precision(model, compute)}")
    return model, tokenizer, image_processor, template


def make_optimizer(args, model):
    """AdamW (--optim adamw8bit: bitsandbytes' 8-bit AdamW) over the projector and what trains of
    the LLM, each group with its base learning rate (lr_at schedules it). -> (optimizer, groups)"""
    projector_params = list(model.projector.parameters())
    llm_params = [p for p in model.llm.parameters() if p.requires_grad]
    groups = [{"params": projector_params, "base_lr": args.projector_lr or args.lr}]
    if llm_params:
        groups.append({"params": llm_params, "base_lr": args.lr})
    if args.optim == "adamw8bit":
        import bitsandbytes as bnb
        optimizer = bnb.optim.AdamW8bit(groups, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    return optimizer, groups


# ---------------------------------------------------------------- the data

def sample_tokenizer(args, tokenizer):
    """conversation.tokenize with this run's settings, turns -> sample: what training makes of each
    record, run on every record before training (llava_data.check_record) and by
    data_prep/check_llava_data.py --llm."""
    return functools.partial(conversation.tokenize, tokenizer, num_visual_tokens=args.tokens, max_length=args.max_length,
                             image_first=not args.image_after_question, template=conv_template(args, tokenizer))


def print_samples(args):
    """--show-samples N: the first N records as the model sees them, one JSON object a line: the
    whole sequence (special tokens kept, the visual span once as <image>), each loss-carrying span,
    and QueCC's question (null for text-free compressors)."""
    tokenizer = vlm.load_tokenizer(args.llm)
    tokenize = sample_tokenizer(args, tokenizer)
    # skipped records are reported on stderr: stdout is the JSON lines
    records = llava_data.load_records(args.data, args.image_folder, args.skip_bad_samples,
                                      log=lambda message: print(message, file=sys.stderr))
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    for index, record in enumerate(records[:args.show_samples]):
        try:
            sample = tokenize(record["conversations"])
        except ValueError as e:
            raise llava_data.BadSample(f"{llava_data.record_name(args.data, index, record)}: {e}") from None
        ids, labels = sample["input_ids"], sample["labels"]
        text = "".join(decode(list(group)) if key else constants.IMAGE_TOKEN
                       for key, group in itertools.groupby(ids, lambda i: i != constants.IMAGE_SLOT))
        targets = [decode([ids[i] for i, _ in group]) for labelled, group in
                   itertools.groupby(enumerate(labels), lambda pair: pair[1] != constants.IGNORE) if labelled]
        query = decode(sample["query_ids"]) if reads_question(args) else None
        print(json.dumps(dict(id=record.get("id"), text=text, targets=targets, query=query)))


def show_samples(args):
    """--show-samples: print_samples, a bad record or file refused in one line."""
    try:
        return print_samples(args)
    except (llava_data.BadSample, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def load_data(args, rank, say, tokenize):
    """Rank 0 reads and validates the data (each record rendered and tokenized as training will,
    in a process per CPU), once for all ranks, and writes the records training takes to
    OUTPUT/records/; every rank then maps that file (llava_data.RecordFile). A resumed run must
    take the records it began with (runs.data_change). An error reaches every rank, so none waits
    for rank 0 forever. -> (records, their fingerprint: llava_data.write_records)"""
    directory, error, data = os.path.join(args.output_dir, RECORDS_DIR), None, None
    if rank == 0:
        try:
            records = llava_data.valid_records(args.data, args.image_folder, args.skip_bad_samples, log=say,
                                               tokenize=tokenize, processes=len(os.sched_getaffinity(0)))
            data = llava_data.write_records((text for _, text in records), directory)
            error = runs.data_change(args.output_dir, args.data, data) if args.resume else None
        except (llava_data.BadSample, OSError) as e:
            error = str(e)
    error, data = distributed.from_rank0((error, data))
    if error:
        stop(f"error: {error}")
    return llava_data.RecordFile(directory), data


def drop_undecodable(records, args, failed, say):
    """Records whose image passed the header check but could not be decoded into the feature
    cache: refused by name, or skipped with --skip-bad-samples (llava_data.BadSamples). failed:
    {path: why}."""
    if not failed:
        return records
    policy, bad = llava_data.BadSamples(args.skip_bad_samples, say), set()
    for index, record in enumerate(records):
        path = os.path.join(args.image_folder, record["image"]) if "image" in record else None
        if path not in failed:
            continue
        try:
            policy.reject(llava_data.record_name(args.data, None, record), failed[path])
        except llava_data.BadSample as e:
            raise SystemExit(f"error: {e}") from None
        bad.add(index)
    return [record for index, record in enumerate(records) if index not in bad]


def open_feature_cache(args, model, image_processor, records, rank, say):
    """--feature-cache: rank 0 encodes what is missing, the others then read it; a record whose image
    fails to decode is refused or skipped (drop_undecodable). -> (the cache or None, the records)"""
    if not args.feature_cache:
        return None, records
    cache = features.FeatureCache(args.feature_cache, model, image_processor, args.image_aspect)
    failed = None
    if rank == 0:
        paths = [os.path.join(args.image_folder, r["image"]) for r in records if "image" in r]
        encoded, failed = cache.prepare(paths)
        say(f"feature cache {cache.directory}: {encoded} images encoded")
    return cache, drop_undecodable(records, args, distributed.from_rank0(failed), say)


def training_dataset(args, records, tokenizer, image_processor, template, cache):
    return conversation.SupervisedDataset(
        records, args.data, args.image_folder, tokenizer, image_processor, args.tokens, args.max_length,
        image_first=not args.image_after_question, skip_bad=args.skip_bad_samples, feature_cache=cache,
        template=template, aspect=args.image_aspect)


def fit_standardization(model, dataset, pad_id, device, chunk=8):
    """Fit the projector's feature standardization on the first STANDARDIZE_IMAGES image samples:
    the same images on every rank, so every replica of the projector gets the same statistics.
    -> the number of images measured."""
    samples = []
    for index in range(len(dataset)):
        if len(samples) == STANDARDIZE_IMAGES:
            break
        sample = dataset[index]
        if sample is not None and conversation.has_image(sample):  # None: skipped (--skip-bad-samples)
            samples.append(sample)
    if not samples:
        raise SystemExit(f"error: {dataset.path}: no sample with an image, nothing for --standardize-features to measure")

    def encoded(part):  # chunk by chunk, encoded again per statistic: CLIP-L's 256 images at once are ~3 GB
        for start in range(0, len(samples), chunk):
            batch = conversation.collate(samples[start:start + chunk], pad_id)
            hidden = batch["features"] if "features" in batch else model.encode_images(batch["pixel_values"].to(device))
            yield hidden[part].float()

    model.projector.standardize_patches.fit(encoded(0))
    if model.projector.needs_multi_level:
        model.projector.standardize_multi_level.fit(encoded(1))
    return len(samples)


def standardize(model, dataset, pad_id, device, say):
    """--standardize-features: fit_standardization, a bad sample refused by name."""
    try:
        measured = fit_standardization(model, dataset, pad_id, device)
    except llava_data.BadSample as e:  # its message says how to skip it
        raise SystemExit(f"error: {e}") from None
    say(f"standardized vision features with statistics of {measured} training images")


# ---------------------------------------------------------------- data order

def global_batches(num_samples, batch_size, seed, epochs):
    """Deterministic list of global batches (lists of indices), one shuffle per epoch. The
    last incomplete batch of an epoch is dropped so every step has the same global batch."""
    batches = []
    for epoch in range(epochs):
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches += [order[i:i + batch_size] for i in range(0, num_samples - batch_size + 1, batch_size)]
    return batches


def plan_steps(args, dataset):
    """-> the run's global batches, one a step: --epochs of the data, or --max-steps of it."""
    batches = global_batches(len(dataset), args.batch_size, args.seed, args.epochs)
    if not batches:
        raise SystemExit(f"{args.data}: {len(dataset)} samples is less than one global batch ({args.batch_size})")
    if args.max_steps:  # like HF Trainer, max steps overrides epochs and cycles the data
        epochs = math.ceil(args.max_steps / len(batches) * args.epochs)
        batches = global_batches(len(dataset), args.batch_size, args.seed, epochs)[:args.max_steps]
    return batches


def micro_batches(batches, rank, world, micro, lengths=None):
    """Each rank takes an equal share of every global batch, split into micro-batches."""
    out = []
    for batch in batches:
        if lengths is not None:  # similar lengths together: less padding, same global batch
            batch = sorted(batch, key=lambda i: lengths[i])
        share = batch[rank::world]
        out += [share[i:i + micro] for i in range(0, len(share), micro)]
    return out


def approximate_length(record, visual_tokens):
    """LLaVA's modality-length proxy: words in the conversation, plus the visual tokens."""
    words = sum(len(t["value"].split()) for t in record["conversations"])
    return words + (visual_tokens if "image" in record else 0)


def step_loader(dataset, batches, rank, world, args, accumulation, pad_id, lengths=None):
    """-> an iterator over steps, each this rank's `accumulation` micro-batches.
    --packing: the rank's whole share of a step is loaded at once and packed into rows across its
    micro-batches (conversation.collate_packed), the same samples as unpacked."""
    def loader(sampler, collate):
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                                collate_fn=collate))
    if args.packing:
        return loader([batch[rank::world] for batch in batches],
                      lambda s: conversation.collate_packed(s, pad_id, args.max_length, accumulation))
    micro = loader(micro_batches(batches, rank, world, args.micro_batch_size, lengths),
                   lambda s: conversation.collate(s, pad_id))
    return zip(*[micro] * accumulation)  # the micro-batches, `accumulation` at a time


# ---------------------------------------------------------------- one step

def lr_at(step, total, warmup, base):
    """Linear warmup, then cosine to zero (LLaVA scripts/v1_5/*.sh: warmup_ratio 0.03, cosine; docs/sources.md)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def clip_gradients(groups, max_norm):
    """Global gradient norm over all trainable parameters (sharded or not), clipped in place to
    max_norm (0: never). -> the norm before clipping, as logged."""
    grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    norms = [torch.nn.utils.get_total_norm([g for g in grads if hasattr(g, "full_tensor") == sharded])
             for sharded in (True, False) if any(hasattr(g, "full_tensor") == sharded for g in grads)]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    total = torch.stack([n.float().cpu() for n in norms]).norm().item()
    if max_norm and total > max_norm:
        for grad in grads:  # a plain float scales sharded (DTensor) and local gradients alike
            grad.mul_(max_norm / (total + 1e-6))
    return total


def training_flops_per_token(llm, llm_trains, sequence_length):
    """The LLM's share of a training step, per token (the vision tower is frozen and small next
    to it): forward 2N, backward 2N through the activations and, only when the LLM trains, 2N for
    its weight gradients; attention scores, which have no weights, add 12 x layers x width x
    sequence either way (PaLM's MFU)."""
    config = llm.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * sequence_length
    return (6 if llm_trains else 4) * count_params(llm)[1] + attention


def peak_flops(device):
    """The GPU's bf16 peak (BF16_PEAK_FLOPS), for the MFU in the log; None on a CPU or another GPU."""
    return next((v for k, v in BF16_PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None) \
        if device.type == "cuda" else None


def next_step(steps):
    """The next step's micro-batches; a bad sample met in loading stops the run with its name."""
    try:
        return next(steps)
    except llava_data.BadSample as e:  # from a worker: keep its message (llava_data.refusal), not its traceback
        raise SystemExit(f"error: {str(e).strip().splitlines()[-1]}") from None


def train_step(model, optimizer, groups, micro, step, args, accumulation, world, device, compute):
    """One optimizer step on this rank's micro-batches of a global batch, at the learning rates
    already set in the optimizer's groups. -> (the step's loss over all ranks, the gradient norm
    before clipping, this rank's tokens and samples)"""
    # Loss = sum of token losses / label tokens in the WHOLE global batch (all micro-batches,
    # all ranks). Each micro-batch's mean would weight short answers up and make the result
    # depend on how the batch is split; this way it does not. FSDP averages gradients over
    # ranks, hence the factor `world`.
    label_tokens = distributed.all_reduce_sum(sum((b["labels"] != constants.IGNORE).sum().item() for b in micro), device)
    if not label_tokens:  # every sample skipped: a step of loss 0 would be logged as learning
        raise SystemExit(f"error: step {step + 1}: no sample of the global batch has an answer token left")
    loss_sum, tokens, samples = 0.0, 0, 0
    for k, batch in enumerate(micro):
        batch = conversation.to_device(batch, device)
        if world > 1:  # reduce-scatter gradients once per step, not once per micro-batch
            model.llm.set_requires_gradient_sync(k == accumulation - 1)
        with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
            loss, label_count = model(**batch)
        # llava: this micro-batch's mean / micro-batches, as HF Trainer (ranks averaged as above)
        scale = world / max(label_tokens, 1) if args.loss_norm == "tokens" else \
            1 / (accumulation * max(label_count.item(), 1))
        (loss * scale).backward()
        loss_sum += loss.item() * scale / world
        tokens += batch["attention_mask"].sum().item()
        samples += len(batch["has_image"])  # a packed row holds several
    if world > 1:  # the projector is replicated, not sharded: average its gradients by hand
        for p in model.projector.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world
    grad_norm = clip_gradients(groups, args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return distributed.all_reduce_sum(loss_sum, device), grad_norm, tokens, samples


# ---------------------------------------------------------------- checkpoints and resuming

def start_log(args, model, optimizer, rank, world):
    """--resume: the newest checkpoint loaded (runs.load_newest_checkpoint), else step 0; log.jsonl
    cut back to the step the run continues from. -> (that step, the log's path)"""
    start = runs.load_newest_checkpoint(model, optimizer, args.output_dir, rank, world) if args.resume else 0
    log_path = os.path.join(args.output_dir, "log.jsonl")
    if rank == 0:  # keep the log in step with the checkpoint we continue from
        kept = []
        if start and os.path.exists(log_path):  # a line a kill cut short has no newline: it goes
            kept = [line for line in open(log_path) if line.endswith("\n") and json.loads(line)["step"] <= start]
        with open(log_path, "w") as f:
            f.writelines(kept)
    return start, log_path


def save_final(model, tokenizer, args, rank, run):
    """Consolidate (gather FSDP shards, merge LoRA) and write the output directory, with what
    defines the run (settings, data)."""
    extra = dict(stage=2 if args.train_llm else 1, **run)
    if not args.train_llm:
        if rank == 0:
            vlm.save(model, tokenizer, args.output_dir, save_llm=False, extra_config=extra)
        return
    llm_state = get_model_state_dict(model.llm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    if args.lora:
        model.llm = model.llm.merge_and_unload()
        llm_state = None
        if args.qlora:  # export a plain-precision model: 03_evaluate loads it like any other
            model.llm = model.llm.dequantize()
    vlm.save(model, tokenizer, args.output_dir, save_llm=True, extra_config=extra, llm_state=llm_state)


def finish(model, tokenizer, args, rank, run, say):
    """The output directory written (save_final); the records copied for training go."""
    save_final(model, tokenizer, args, rank, run)
    if rank == 0:  # ignore_errors: deleted mid-run by hand, training went on from its open mapping
        shutil.rmtree(os.path.join(args.output_dir, RECORDS_DIR), ignore_errors=True)
    say(f"saved {args.output_dir}")
    distributed.barrier()  # no rank tears its process group down while another still writes or gathers
    distributed.end_distributed()


# ---------------------------------------------------------------- evaluation while training

def read_benches(args):
    """--eval-bench: {name: its questions}, read as 03_evaluate.py reads them ({} without it)."""
    return {name: evaluation.read_benchmark(args.eval_data_root, name)[:args.eval_limit or None]
            for name in args.eval_bench.split(",")} if args.eval_bench else {}


def live_eval(model, tokenizer, image_processor, benches, args, rank, world, device, compute, cache):
    """--eval-every: 03_evaluate.py's scores of the live model, computing as it trains (bf16 on a GPU);
    cache: the benches' images in --feature-cache, or None."""
    model.eval()
    with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
        scores = evaluation.live_scores(model, tokenizer, image_processor, benches,
                                        args.eval_data_root, args.eval_max_new_tokens, rank, world, device, cache)
    model.train()
    return scores


# ---------------------------------------------------------------- the run

def main(stage):
    args = parse_args(stage)
    if args.show_samples:
        return show_samples(args)
    rank, world, device = distributed.setup_distributed()
    torch.manual_seed(args.seed), random.seed(args.seed), np.random.seed(args.seed)
    say = print if rank == 0 else (lambda *a, **k: None)
    llm_dtype, compute = precision(args, device)
    accumulation = check_batch(args, world, compute, say)
    benches = read_benches(args)
    check_token_count(args)
    if runs.prepare_output_dir(args, rank, world):
        say(f"{args.output_dir} holds this run, finished; nothing to do")
        return distributed.end_distributed()

    model, tokenizer, image_processor, template = prepare_model(args, llm_dtype, compute, device, world, say)
    records, data = load_data(args, rank, say, sample_tokenizer(args, tokenizer))
    run = dict(settings=runs.run_settings(args, world), data=data)  # stored with each checkpoint and the output
    cache, records = open_feature_cache(args, model, image_processor, records, rank, say)
    eval_cache = evaluation.feature_cache(args.feature_cache, model, image_processor, benches, args.eval_data_root,
                                          rank) if cache and benches else None
    dataset = training_dataset(args, records, tokenizer, image_processor, template, cache)
    if args.standardize_features:
        standardize(model, dataset, tokenizer.pad_token_id, device, say)
    batches = plan_steps(args, dataset)
    total_steps = len(batches)
    model.config.steps = total_steps  # for the model card
    warmup = math.ceil(args.warmup_ratio * total_steps)
    lengths = [approximate_length(r, args.tokens) for r in records] if args.group_by_length else None
    optimizer, groups = make_optimizer(args, model)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    say(f"trainable parameters: {trainable / 1e6:.2f}M; {total_steps} steps of {args.batch_size} samples "
        f"({accumulation} x {args.micro_batch_size} per device x {world} devices)")
    start, log_path = start_log(args, model, optimizer, rank, world)
    steps = step_loader(dataset, batches[start:], rank, world, args, accumulation, tokenizer.pad_token_id, lengths)
    peak = peak_flops(device)

    # ---- loop
    model.train()
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc=stage["name"])
    for step in bar:
        t0 = time.time()
        micro = next_step(steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, warmup, group["base_lr"])
        loss_value, grad_norm, tokens, samples = train_step(model, optimizer, groups, micro, step, args,
                                                            accumulation, world, device, compute)
        elapsed = time.time() - t0
        tokens_all, samples_all = distributed.all_reduce_sum(tokens, device), distributed.all_reduce_sum(samples, device)
        entry = dict(step=step + 1, loss=loss_value, lr=optimizer.param_groups[-1]["lr"], grad_norm=grad_norm,
                     tokens_per_s=tokens_all / elapsed, samples_per_s=samples_all / elapsed)
        if peak:
            per_token = training_flops_per_token(model.llm, args.train_llm, tokens_all / samples_all)
            entry["mfu"] = per_token * tokens_all / elapsed / (peak * world)
        if args.eval_every and (step + 1) % args.eval_every == 0:  # computing as it trains (bf16 on a GPU)
            entry["eval"] = live_eval(model, tokenizer, image_processor, benches, args, rank, world, device, compute,
                                      eval_cache)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{entry['lr']:.1e}", tok_s=f"{entry['tokens_per_s']:.0f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            runs.save_checkpoint(model, optimizer, step + 1, args.output_dir, rank, run)

    finish(model, tokenizer, args, rank, run, say)
