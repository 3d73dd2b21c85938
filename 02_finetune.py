"""Stage 2: train the projector and the LLM on instruction data, vision frozen.

LLaVA-1.5 numbers: lr 2e-5, global batch 128, 1 epoch, warmup 3%, cosine, no weight decay;
loss on assistant turns only, in the LLM's own chat template (LLaVA's vicuna_v1 without one);
images padded to square. Start from stage 1's projector.

    accelerate launch 02_finetune.py --llm Qwen/Qwen1.5-7B-Chat --tokens 4

reads data/llava_v1_5_mix665k.json and its images under data/ (README 'Data'), starts from
runs/Qwen1.5-7B-Chat-quecc-v4/stage1 (01's output) and writes runs/Qwen1.5-7B-Chat-quecc-v4/stage2.
"""
import train

if __name__ == "__main__":
    train.main(dict(name="stage 2", description=__doc__, lr=2e-5, batch_size=128, train_llm=True,
                    output="stage2", data="data/llava_v1_5_mix665k.json", image_folder="data",
                    source="stage 2 trains on LLaVA-665K: llava_v1_5_mix665k.json from "
                           "huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K, with the images of COCO, GQA, "
                           "OCR-VQA, TextVQA and Visual Genome under data/ (check them with data_prep/check_llava_data.py)"))
