"""Stage 1: train the projector (QueCC + MLP) on image-caption pairs, LLM and vision frozen.

LLaVA-1.5 numbers: lr 1e-3, global batch 256, 1 epoch, warmup 3%, cosine, no weight decay;
images resized and centre-cropped (pretrain.sh). Text-free compressors use LLaVA's `plain`
template (image, caption); QueCC keeps the human turn, because it needs the question as its
query (as in the paper's release). Only the caption carries loss.

    python 01_pretrain_projector.py --llm Qwen/Qwen1.5-7B-Chat --tokens 4

reads data/LLaVA-Pretrain/ (README 'Data') and writes runs/Qwen1.5-7B-Chat-quecc-v4/stage1.
"""
import train

if __name__ == "__main__":
    train.main(dict(name="stage 1", description=__doc__, lr=1e-3, batch_size=256, train_llm=False,
                    output="stage1", data="data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
                    image_folder="data/LLaVA-Pretrain/images",
                    source="stage 1 trains on LLaVA-558K: blip_laion_cc_sbu_558k.json and images.zip from "
                           "huggingface.co/datasets/liuhaotian/LLaVA-Pretrain, unzipped into data/LLaVA-Pretrain/images"))
