"""Convert an output directory of 01/02 written before model folders (vlm_config.json; stage 2 also
llm/ and projector.safetensors) into today's layout, in place, once:

    python convert_model.py runs/Qwen1.5-7B-Chat-quecc-v4/stage2

Stage 1 gets config.json (its projector and tokenizer stay); stage 2 becomes a Hugging Face model
folder (vlm.write_model_folder), its vision tower read from the --vision it was trained with.
"""
import argparse
import json
import os
import shutil

from safetensors.torch import load_file

import vlm
from modeling_vlm import VLMConfig


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="an output directory of 01/02 holding vlm_config.json")
    args = p.parse_args()
    legacy = os.path.join(args.directory, vlm.LEGACY_CONFIG_FILE)
    if not os.path.exists(legacy):
        p.error(f"{legacy} not found: {args.directory} is not an output directory of the earlier layout")
    with open(legacy) as f:
        saved = json.load(f)
    llm_dir = saved.pop("llm_dir", None)
    if llm_dir is None:  # stage 1
        VLMConfig(**saved).to_json_file(os.path.join(args.directory, vlm.CONFIG_FILE))
    else:
        model, tokenizer, _ = vlm.build(os.path.join(args.directory, llm_dir), saved["vision"], saved["tokens"],
                                        saved["compressor"])
        model.projector.load_state_dict(load_file(os.path.join(args.directory, vlm.PROJECTOR_FILE)))
        vlm.save(model, tokenizer, args.directory, save_llm=True, extra_config=saved)  # replaces projector.safetensors
        shutil.rmtree(os.path.join(args.directory, llm_dir))
    os.remove(legacy)
    print(f"converted {args.directory}")


if __name__ == "__main__":
    main()
