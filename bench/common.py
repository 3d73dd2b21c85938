"""Helpers the bench scripts share: the repository on the path, the bench LLM presets, common
options and set-up, round-robin timing, machine and model descriptions, test inputs, tables, JSON."""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import toy  # noqa: E402
import vlm  # noqa: E402
from compressors import Projector  # noqa: E402

# bench presets in toy's format (hidden, layers, heads, kv heads, mlp): linear layers dominate
BENCH_PRESETS = {"bench-wide": (512, 4, 8, 4, 2048)}
toy.LLM_SIZES.update(BENCH_PRESETS)  # so vlm.build / vlm.load_llm accept them like toy presets
QUESTION = ("Is there a shape at the top left of the image, and what colour is it? How many shapes are there? "
            "Answer the question using a single word or phrase.")  # 52 prompt tokens with the toy tokenizer
QWEN1_5_0_5B = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                    intermediate_size=2816, vocab_size=151936, tie_word_embeddings=True,
                    max_position_embeddings=32768, rope_theta=1e6, eos_token_id=2, pad_token_id=0)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, image_size=336, projection_dim=768)


def common_args(description, llm="bench-wide", vision="toy", models=True):
    """models=False: a bench that builds its own models takes no --llm/--vision."""
    p = argparse.ArgumentParser(description=description)
    if models:
        p.add_argument("--llm", default=llm, help="toy preset (toy, toy-xs/s/m/l, bench-wide), directory or hub name")
        p.add_argument("--vision", default=vision, help="'toy', directory or hub name")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: a busy, shared CPU times most stably on one; 0 = torch's default)")
    p.add_argument("--rounds", type=int, default=0, help="timing rounds (0 = the script's default)")
    return p


def setup(parser):
    """Parse the options, then set the threads, the dtype (args.torch_dtype) and the seed. -> args"""
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    args.torch_dtype = names[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                              else torch.float32)
    torch.manual_seed(0)
    return args


def timing_rounds(args, gpu, cpu):
    """--rounds, or the script's default for the device."""
    return args.rounds or (gpu if args.device.startswith("cuda") else cpu)


def int_list(text):
    """A comma-separated option, e.g. --batches 1,8 -> [1, 8]."""
    return [int(x) for x in text.split(",")]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def clock(device):
    """The clock a step is timed with: on a CPU with one thread, the process's CPU time, which is what
    an idle core's wall time would be (on a shared machine the others' load would enter the wall
    time, and not evenly: a burst can fall on one of the things compared); otherwise the wall time."""
    return time.process_time if str(device) == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def time_round_robin(calls, rounds, device, warmup=1):
    """calls: {key: fn}. Each round calls every fn once, in order; -> {key: median ms}."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    sync(device)
    samples = {key: [] for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(values) for key, values in samples.items()}


def machine(args):
    info = dict(device=args.device, dtype=str(args.torch_dtype).replace("torch.", ""),
                torch=torch.__version__, python=platform.python_version())
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info.update(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                    threads=torch.get_num_threads())
    return info


def describe_llm(name, llm):
    c = llm.config
    params = sum(p.numel() for p in llm.parameters())
    embedding = llm.get_input_embeddings().weight.numel()
    text = (f"{name}: {params / 1e6:.1f}M parameters ({(params - embedding) / 1e6:.1f}M outside the embedding), "
            f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, MLP {c.intermediate_size}")
    return dict(name=name, params=params, non_embedding_params=params - embedding, hidden=c.hidden_size,
                layers=c.num_hidden_layers, intermediate=c.intermediate_size, text=text)


def print_table(headers, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def build_model(args, tokens, compressor):
    """vlm.build on the chosen device and dtype, eval mode."""
    model, tokenizer, image_processor = vlm.build(args.llm, args.vision, tokens, compressor, args.torch_dtype)
    return model.to(device=args.device, dtype=args.torch_dtype).eval(), tokenizer, image_processor


def swap_projector(model, compressor, tokens):
    """Give the model another (random) projector, keeping its LLM and vision tower: one LLM in
    memory for every compressor."""
    c = model.config
    old = next(model.projector.parameters())
    model.projector = Projector(compressor, tokens, c.grid, c.vision_width, c.llm_width,
                                len(c.key_layers)).to(device=old.device, dtype=old.dtype).eval()
    c.update(dict(tokens=tokens, compressor=compressor))
    return model


def test_images(image_processor, count, seed=0):
    """Synthetic scenes (a coloured square on a coloured ground), as PIL images."""
    from PIL import Image, ImageDraw
    generator = torch.Generator().manual_seed(seed)
    side = image_processor.crop_size["height"]
    images = []
    for _ in range(count):
        colours = [tuple(torch.randint(0, 256, (3,), generator=generator).tolist()) for _ in range(2)]
        x, y = torch.randint(0, side * 2 // 3, (2,), generator=generator).tolist()
        image = Image.new("RGB", (side, side), colours[0])
        ImageDraw.Draw(image).rectangle((x, y, x + side // 3, y + side // 3), fill=colours[1])
        images.append(image)
    return images


def write_json(path, result):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")


def real_shape_models():
    """-> (llm, vision): random-init Qwen1.5-0.5B and CLIP-L/336 shapes, fixed seed."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(**QWEN1_5_0_5B)), CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336))


def save_real_shape_models(directory):
    """DIR/llm and DIR/vision laid out like hub checkpoints (the LLM with the toy tokenizer, whose
    ids all fall inside the real vocabulary), for the scripts that take --llm/--vision DIR."""
    llm, vision = real_shape_models()
    llm.save_pretrained(f"{directory}/llm")
    toy.build_tokenizer().save_pretrained(f"{directory}/llm")
    vision.save_pretrained(f"{directory}/vision")
    size = CLIP_L_336["image_size"]
    processor = toy.build_image_processor()
    processor.size, processor.crop_size = {"shortest_edge": size}, {"height": size, "width": size}
    processor.save_pretrained(f"{directory}/vision")
    return f"{directory}/llm", f"{directory}/vision"


