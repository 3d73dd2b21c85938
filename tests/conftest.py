"""Shared fixtures: a small toy dataset and the toy tokenizer, built once per test session."""
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs the tests in several processes (pytest-xdist)
    # Two tests may start torchrun at once: each finds a free port (torchrun reads --standalone from here).
    os.environ.setdefault("PET_STANDALONE", "1")
    # One thread per worker, and per script it starts: a worker per core, not cores fought over.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_script(*args, check=True, timeout=600, env=None, cwd=ROOT):
    """Run a repo script (or module with -m) in a process of its own, as a user would. Scripts are
    found in the repo whatever cwd (a test's own data/ and runs/ layout). It is forked from a
    process that imported the libraries once, as the demo runs its scripts (toy.demo.run_script),
    unless the test gives it an environment of its own, or it is torchrun or `-c`: then a new interpreter."""
    if cwd != ROOT and args[0].endswith(".py"):
        args = (os.path.join(ROOT, args[0]), *args[1:])
    if env is None and (args[0].endswith(".py") or args[0] == "-m" and args[1] != "torch.distributed.run"):
        result = forked(args, cwd, timeout)
    else:
        result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                                timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def forked(args, cwd, timeout):
    """run_script in a fork of toy.demo's script server (about a second to start, not eight).
    -> subprocess.CompletedProcess"""
    from toy import demo
    with tempfile.TemporaryDirectory() as streams:
        stdout, stderr = os.path.join(streams, "stdout"), os.path.join(streams, "stderr")
        child = demo.SCRIPTS.Process(target=demo.run_script, args=(args, stdout, stderr, str(cwd)),
                                     kwargs=dict(environ=dict(os.environ)))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(args, timeout)
        return subprocess.CompletedProcess(args, child.exitcode, open(stdout).read(), open(stderr).read())


def checkpoint_dtypes(directory):
    """{tensor name: dtype} of a sharded (torch.distributed.checkpoint) training checkpoint: weights and
    optimizer states."""
    from torch.distributed.checkpoint import FileSystemReader
    metadata = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {name: m.properties.dtype for name, m in metadata.items() if hasattr(m, "properties")}


@pytest.fixture(scope="module")
def one_thread():
    """A toy's tiny matmuls run many times faster on one thread of a busy machine; and one thread
    sums in one order, whichever process runs the model."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sharp_model(compressor, tokens=4, llm="toy-xs", draw=12):
    """A toy VLM whose LLM and projector weights are redrawn at unit scale, so greedy answers differ
    from image to image and from question to question (a default-init toy answers "" to everything,
    which no comparison could catch). draw: the seed of the weights, chosen so that they do with the
    toy tower of width 32. -> (model in eval mode, tokenizer, image processor)"""
    import torch
    import vlm
    with torch.random.fork_rng():
        torch.manual_seed(1)  # the parts not redrawn below (biases) are drawn alike in every process
        model, tokenizer, image_processor = vlm.build(llm, "toy", tokens, compressor)
        # from a random init, not the pretrained toy LLM: its answers barely depend on a new projector
        model.llm.load_state_dict(type(model.llm)(model.llm.config).state_dict())
    generator = torch.Generator().manual_seed(draw)  # one whose answers vary with the image
    with torch.no_grad():
        for name, p in list(model.llm.named_parameters()) + list(model.projector.named_parameters()):
            if p.ndim == 2:
                std = 0.3 if "embed" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.eval(), tokenizer, image_processor


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    run_script("-m", "toy.make_data", "--out", str(out), "--num-train", "160", "--num-eval", "10")
    return out


@pytest.fixture(scope="session")
def tokenizer():
    import toy
    return toy.build_tokenizer()


@pytest.fixture(scope="session")
def toy_llm_dirs(tmp_path_factory):
    """The toy-s LLM saved twice with the same values: in bf16, as Qwen1.5 is on the hub, and in fp32.
    -> {"bf16": directory, "fp32": directory}"""
    import torch
    import toy
    root = tmp_path_factory.mktemp("llms")
    tokenizer = toy.build_tokenizer()
    llm = toy.build_llm("toy-s", len(tokenizer))
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        llm.to(dtype).save_pretrained(root / name)  # bf16 first: the fp32 copy holds the rounded values
        tokenizer.save_pretrained(root / name)
    return {name: root / name for name in ("bf16", "fp32")}
