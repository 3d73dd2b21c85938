"""The processor of a saved VLM (AutoProcessor): chat messages -> the prompt, and the prompt with its
images -> the model's inputs, by this repository's own prompt code (conversation.py), so its inputs
are token for token those generate.py and 03_evaluate.py give the model.

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")

apply_chat_template renders the template the model trained with (conv_template: the LLM's own, or
LLaVA's vicuna_v1 for an LLM without one), the image where training put it (image_first), whatever
the order in the message. The processor then expands the image into V <image> tokens (the saved
tokenizer's added token, config.image_token_id), pads to the left and, for a compressor that reads the
question (QueCC), adds its question's ids (query_ids, query_mask): the first user turn's text, found in
the prompt by rendering a stand-in question the same way (see question).
"""
from transformers import CLIPImageProcessorPil, ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

try:  # in a model folder (modeling_vlm.py explains)
    from .constants import IGNORE, IMAGE_SLOT, IMAGE_TOKEN
    from .conversation import collate, encode_with_image, load_image, query_ids, render, to_messages
    from .llava_data import ROLES
except ImportError:
    from constants import IGNORE, IMAGE_SLOT, IMAGE_TOKEN
    from conversation import collate, encode_with_image, load_image, query_ids, render, to_messages
    from llava_data import ROLES

LLAVA_ROLES = {role: name for name, role in ROLES.items()}  # "user" -> "human", as LLaVA's records name them
STAND_IN = "<question>"


class VLMProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, tokens=1, conv_template="chat", image_first=True,
                 image_aspect="pad", reads_question=False, chat_template=None, **kwargs):
        """tokens, conv_template, image_first, image_aspect: as the model's config says; reads_question:
        whether its compressor reads the question."""
        self.tokens, self.conv_template, self.image_first = tokens, conv_template, image_first
        self.image_aspect, self.reads_question = image_aspect, reads_question
        self.image_token, self.image_token_id = IMAGE_TOKEN, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if not isinstance(image_processor, CLIPImageProcessorPil):  # AutoImageProcessor's torchvision one, where
            image_processor = CLIPImageProcessorPil(**image_processor.to_dict())  # installed, resizes unlike training's
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def apply_chat_template(self, conversation, add_generation_prompt=False, tokenize=False, **kwargs):
        """Messages (content a string, or a list of {"type": "text", "text": ...} and {"type": "image"})
        -> the prompt text, as conversation.render writes it; a list of conversations -> a list."""
        if tokenize:
            raise ValueError("tokenize=True is not supported: call the processor on the prompt, with its images")
        if conversation and isinstance(conversation[0], list):
            return [self.apply_chat_template(c, add_generation_prompt) for c in conversation]
        turns = []
        for message in conversation:
            content = message["content"]
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            text = "\n".join(item["text"] for item in items if item["type"] == "text")
            has_image = any(item["type"] == "image" for item in items)
            turns.append({"from": LLAVA_ROLES[message["role"]], "value": f"{IMAGE_TOKEN}\n{text}" if has_image else text})
        messages, _ = to_messages(turns, self.image_first)
        return render(self.tokenizer, messages, self.conv_template, generation=add_generation_prompt)[0]

    def question(self, prompt):
        """QueCC's question in a prompt from apply_chat_template: the first user turn's text (as
        conversation.to_messages takes it). The prompt must start with what the template writes before
        a question, and the question ends where what it writes after one first appears (in a `plain`
        prompt, which holds one turn, at the end)."""
        content = [{"type": "image"}] * (IMAGE_TOKEN in prompt) + [{"type": "text", "text": STAND_IN}]
        before, after = self.apply_chat_template([{"role": "user", "content": content}], True).split(STAND_IN)
        end = len(prompt) - len(after) if self.conv_template == "plain" else prompt.find(after, len(before))
        if not prompt.startswith(before) or end < len(before) or not prompt[end:].startswith(after):
            raise ValueError(f"cannot find the question in the prompt {prompt[:200]!r}: it must start with a user "
                             "turn as processor.apply_chat_template(messages, add_generation_prompt=True) renders it")
        return prompt[len(before):end]

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs):
        """text: a prompt or a list of them, each with at most one <image>; images: one per <image>, in
        order (PIL images or files). -> input_ids, attention_mask (left-padded), pixel_values (images
        padded to a square or centre-cropped, as in training), and query_ids, query_mask for QueCC."""
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        if any(t.count(IMAGE_TOKEN) > 1 for t in texts) or sum(IMAGE_TOKEN in t for t in texts) != len(images):
            raise ValueError(f"{len(images)} images for {sum(t.count(IMAGE_TOKEN) for t in texts)} {IMAGE_TOKEN} in the "
                             "text: one image per prompt, at most, and one prompt per image")
        images = iter(images)
        samples = []
        for prompt in texts:
            ids, _ = encode_with_image(self.tokenizer, prompt, self.tokens)
            query = query_ids(self.tokenizer, self.question(prompt)) if self.reads_question else []
            pixels = load_image(next(images), self.image_processor, self.image_aspect) \
                if IMAGE_TOKEN in prompt else None
            samples.append(dict(input_ids=ids, labels=[IGNORE] * len(ids), query_ids=query, pixel_values=pixels))
        batch = collate(samples, self.tokenizer.pad_token_id, left=True)
        inputs = dict(input_ids=batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_SLOT, self.image_token_id),
                      attention_mask=batch["attention_mask"])
        names = ["pixel_values"] + ["query_ids", "query_mask"] * self.reads_question
        inputs.update({name: batch[name] for name in names if name in batch})
        return BatchFeature(inputs, tensor_type=return_tensors)


VLMProcessor.register_for_auto_class()  # save_pretrained copies this file and those it imports
