"""A feature cache for the frozen vision tower: each image is encoded once per encoder
(train.py --feature-cache, any tower, toy or real).

The vision tower never trains (both stages), so its hidden states for an image are
the same in every run of a sweep, every epoch and every evaluation. The cache keeps
the hidden states that the projector reads (the select layer and QueCC's key
layers, each stored once) for one image in one file:

    DIR/<encoder key>/<image key>.safetensors   (layers, grid^2, width) fp16, CLS dropped

encoder key: a hash of the tower's weights, its config and the image processor's
config (not the folder they came from), so a retrained or differently preprocessed
encoder never reads stale features, and a moved or saved one keeps its cache.
image key: a hash of the image file's bytes, so the same picture under two paths
(a symlinked evaluation folder) is encoded once. Writes are atomic
(temporary file + rename), so concurrent runs may share one cache.

    cache = FeatureCache(DIR, model, image_processor)   # model: a vlm.VLM
    encoded, failed = cache.prepare(paths)  # encode the images not yet in the cache
    patches, multi_level = cache.load(path)  # what VLM.encode_images returns, one image
"""
import hashlib
import io
import json
import os

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import conversation


def _hash_bytes(chunks):
    digest = hashlib.sha1()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:20]


# Where a tower or processor was loaded from, and the class a model folder names to load it with,
# do not change what it computes: left out of the key, so a moved or saved model keeps its cache.
PROVENANCE = ("_name_or_path", "auto_map", "processor_class")


def encoder_key(vision, image_processor):
    """Weights + config of the tower + preprocessing -> a short hex key."""
    def described(settings):
        fields = {k: v for k, v in settings.to_dict().items() if k not in PROVENANCE}
        return json.dumps(fields, sort_keys=True, default=str).encode()

    def chunks():
        yield described(vision.config)
        yield described(image_processor)
        for name, tensor in sorted(vision.state_dict().items()):
            yield name.encode()
            yield tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return _hash_bytes(chunks())


def image_key(path, aspect="pad"):
    """The file's bytes. Cropped (conversation.load_image), a non-square image is another picture
    and gets its own key; a square one is the same padded or cropped, so stages 1 and 2 share it."""
    with open(path, "rb") as f:
        data = f.read()
    if aspect == "crop":
        with Image.open(io.BytesIO(data)) as image:
            data += b"crop" if image.width != image.height else b""
    return _hash_bytes([data])


class FeatureCache:
    def __init__(self, directory, model, image_processor, aspect="pad", batch_size=64):
        self.model, self.image_processor, self.batch_size = model, image_processor, batch_size
        self.aspect = aspect  # conversation.load_image's
        depth = model.vision.config.num_hidden_layers + 1  # hidden_states: embeddings + each layer
        self.select = model.config.select_layer % depth
        keys = [k % depth for k in model.config.key_layers]
        # every compressor's layers are stored, so runs of different compressors write identical files
        self.layers = sorted({self.select, *keys})
        self.keys = keys if model.projector.needs_multi_level else None
        self.directory = os.path.join(directory, encoder_key(model.vision, image_processor))
        os.makedirs(self.directory, exist_ok=True)
        self._keys = {}  # image path -> image key

    def file(self, path):
        if path not in self._keys:
            self._keys[path] = image_key(path, self.aspect)
        return os.path.join(self.directory, self._keys[path] + ".safetensors")

    def _has(self, file):
        """A cached file holds every layer this encoder's projectors read. A corrupt one (a disk
        error, a copy cut short) is named and deleted, so that it is computed again."""
        if not os.path.exists(file):
            return False
        try:
            with safe_open(file, "pt") as f:
                layers, shape = json.loads(f.metadata()["layers"]), f.get_slice("hidden").get_shape()
        except Exception as e:
            print(f"feature cache: {file} is corrupt ({type(e).__name__}: {e}); computing it again")
            os.remove(file)
            return False
        return set(self.layers) <= set(layers) and len(shape) == 3 and shape[0] == len(layers)

    def prepare(self, paths, desc="vision features"):
        """Encode, in batches, the images whose features are not cached yet. An image that fails
        to decode is left out. -> (images encoded, {path: why} for every path of those that failed,
        so a caller needs no other look at the cache to know which records lost their image)."""
        todo, paths_of = [], {}  # paths_of: cache file -> the paths holding that image
        for path in paths:
            file = self.file(path)
            if file not in paths_of and not self._has(file):
                todo.append((path, file))
            paths_of.setdefault(file, []).append(path)
        vision = self.model.vision
        device, dtype = next(vision.parameters()).device, next(vision.parameters()).dtype
        vision.eval()
        failed, failed_files = {}, 0
        for start in tqdm(range(0, len(todo), self.batch_size), desc=desc, disable=not todo, leave=False):
            chunk, images = [], []
            for path, file in todo[start:start + self.batch_size]:
                try:
                    images.append(conversation.load_image(path, self.image_processor, self.aspect))
                    chunk.append((path, file))
                except Exception as e:  # passed the header check, fails to decode: a truncated file
                    failed.update((p, f"cannot decode {path}: {e}") for p in paths_of[file])
                    failed_files += 1
            if not chunk:
                continue
            pixels = torch.stack(images)
            with torch.no_grad():
                states = vision(pixels.to(device, dtype), output_hidden_states=True).hidden_states
            stacked = torch.stack([states[i][:, 1:] for i in self.layers], dim=1).half().cpu()
            for (_, file), hidden in zip(chunk, stacked):
                tmp = f"{file}.{os.getpid()}.tmp"
                save_file({"hidden": hidden.contiguous()}, tmp, metadata={"layers": json.dumps(self.layers)})
                os.replace(tmp, file)
        return len(todo) - failed_files, failed

    def load(self, path):
        """-> (patches (grid^2, C), multi_level (grid^2, 4C) or None), float32, one image."""
        with safe_open(self.file(path), "pt") as f:
            hidden, stored = f.get_tensor("hidden").float(), json.loads(f.metadata()["layers"])
        layer = {index: hidden[k] for k, index in enumerate(stored)}
        patches = layer[self.select]
        multi_level = torch.cat([layer[k] for k in self.keys], dim=-1) if self.keys else None
        return patches, multi_level
