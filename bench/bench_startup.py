"""Start-up at full scale: a synthetic llava_v1_5_mix665k.json (665,298 records, about 1 GB, LLaVA's
mix of sources) and its image layout, then seconds from launch to the first optimizer step and the
peak memory of each process, for 02_finetune.py with the toy LLM and --max-steps 1, in one process
and under torchrun with 2.

    python bench/bench_startup.py --dir /tmp/llava665k        # makes the data once (~1 GB + links)

The images are hard links to one small JPEG, one name per distinct image of each source, so every
header read is a real open and read of a cached file: a cold disk or a network file system is slower.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

import psutil
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = 665_298
# LLaVA-1.5's mix by image folder: (records, distinct images, question-answer turns per record);
# text-only records are ShareGPT conversations, long and multi-turn
SOURCES = {"coco/train2017": (364_100, 118_000, 4), "gqa/images": (72_140, 72_140, 6),
           "ocr_vqa/images": (80_000, 80_000, 3), "textvqa/train_images": (21_953, 21_953, 1),
           "vg/VG_100K": (86_417, 86_417, 5), None: (40_688, 0, 4)}
LINKS = 50_000  # names per file (ext4 allows 65,000 hard links)
WORDS = ("the a of and to in is what color shape person table image sign left right two three "
         "building street car man woman dog cat white black red blue green yellow small large").split()


def sentence(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def make_data(directory, seed=0):
    rng = random.Random(seed)
    data = os.path.join(directory, "data")
    os.makedirs(os.path.join(directory, "sources"), exist_ok=True)
    links = 0
    records = []
    for folder, (count, images, turns) in SOURCES.items():
        if folder:
            os.makedirs(os.path.join(data, folder), exist_ok=True)
            for i in range(images):
                source = os.path.join(directory, "sources", f"{links // LINKS}.jpg")
                if links % LINKS == 0:
                    Image.new("RGB", (64, 48), (120, 90, 60)).save(source)
                os.link(source, os.path.join(data, folder, f"{i:012d}.jpg"))
                links += 1
        for i in range(count):
            conversation = []
            for t in range(rng.randint(1, 2 * turns - 1)):
                question = sentence(rng, rng.randint(6, 14) if folder else rng.randint(10, 50))
                if t == 0 and folder:
                    question = "<image>\n" + question
                answer = sentence(rng, rng.randint(2, 15) if folder else rng.randint(50, 200))
                conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            record = {"id": f"{folder or 'sharegpt'}-{i}", "conversations": conversation}
            if folder:
                record["image"] = f"{folder}/{rng.randrange(images):012d}.jpg"
                record["model"] = ""
            records.append(record)
    rng.shuffle(records)
    path = os.path.join(data, "llava_v1_5_mix665k.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=4)  # the released file is indented
    return path


def measure(directory, processes):
    """-> (seconds from launch to the first line of log.jsonl, peak RSS of each training process in
    GB, its unshared memory (USS) at the first step in GB), largest first. Data-loader workers are
    counted as processes of their own."""
    out = os.path.join(directory, f"out-{processes}")
    args = ["02_finetune.py", "--llm", "toy", "--vision", "toy", "--tokens", "4", "--projector", "none",
            "--data", os.path.join(directory, "data", "llava_v1_5_mix665k.json"),
            "--image-folder", os.path.join(directory, "data"), "--output-dir", out,
            "--max-steps", "1", "--batch-size", "8", "--micro-batch-size", "4", "--num-workers", "2"]
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    log = os.path.join(out, "log.jsonl")
    if os.path.exists(log):
        os.remove(log)
    start = time.time()
    process = psutil.Popen(launcher + args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, held, first_step = {}, {}, None
    while process.poll() is None:
        tree = [process] + process.children(recursive=True)
        if processes > 1:  # torchrun itself holds no data
            tree = tree[1:]
        stepped = first_step is None and os.path.exists(log) and os.path.getsize(log)
        if stepped:
            first_step = time.time() - start
        for p in tree:
            try:
                peak[p.pid] = max(peak.get(p.pid, 0), p.memory_info().rss / 1e9)
                if stepped:
                    held[p.pid] = p.memory_full_info().uss / 1e9
            except psutil.Error:
                pass
        time.sleep(0.2)
    if process.returncode:
        raise SystemExit(process.stderr.read().decode()[-3000:])
    return first_step, sorted(peak.values(), reverse=True), sorted(held.values(), reverse=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/llava665k")
    p.add_argument("--processes", default="1,2")
    args = p.parse_args()
    path = os.path.join(args.dir, "data", "llava_v1_5_mix665k.json")
    if not os.path.exists(path):
        t = time.time()
        make_data(args.dir)
        print(f"made {path} ({os.path.getsize(path) / 1e9:.2f} GB) in {time.time() - t:.0f} s")
    results = {}
    for processes in map(int, args.processes.split(",")):
        seconds, peak, held = measure(args.dir, processes)
        results[processes] = dict(first_step_s=round(seconds, 1), peak_rss_gb=[round(g, 2) for g in peak],
                                  uss_at_first_step_gb=[round(g, 2) for g in held])
        print(f"{processes} process(es): first optimizer step after {seconds:.1f} s; per process (workers too): "
              f"peak RSS {', '.join(f'{g:.2f}' for g in peak)} GB, unshared at the first step "
              f"{', '.join(f'{g:.2f}' for g in held)} GB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
