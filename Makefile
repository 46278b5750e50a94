# sam-fast-serve: build the archive, run TorchServe on 127.0.0.1, segment images.
VENV         ?= .venv
PY           := $(VENV)/bin/python
MODEL_NAME   ?= sam-fast
MODEL_CONFIG ?= model-config.yaml
# Default: checkpoints/<the file name model-config.yaml names>.
SAM_CHECKPOINT ?= checkpoints/$(shell $(PY) -c "from pathlib import Path; from sam_fast_serve.deploy import checkpoint_name; print(checkpoint_name(Path('$(MODEL_CONFIG)')))" 2>/dev/null)
IMAGES       ?= out/samples/astronaut.png out/samples/chelsea.png

.PHONY: install test archive serve stop demo smoke download samples bench

install:
	bash install_segment_anything_fast.sh

test:
	$(PY) -m pytest -q tests

download:
	$(PY) -m sam_fast_serve.deploy download --config $(MODEL_CONFIG) --dest $(SAM_CHECKPOINT)

archive:
	$(PY) -m sam_fast_serve.deploy archive --checkpoint $(SAM_CHECKPOINT) --config $(MODEL_CONFIG) --model-name $(MODEL_NAME)

serve:
	@test -f model_store/$(MODEL_NAME).tar.gz || { echo "no model_store/$(MODEL_NAME).tar.gz: run make archive first" >&2; exit 1; }
	@mkdir -p logs
	$(VENV)/bin/torchserve --start --ncs --ts-config config.properties --model-store model_store \
		--models $(MODEL_NAME)=$(MODEL_NAME).tar.gz > logs/console.log 2>&1
	$(PY) -m sam_fast_serve.deploy wait-ready --model $(MODEL_NAME)

stop:
	-$(VENV)/bin/torchserve --stop

samples:
	$(PY) -m sam_fast_serve.deploy samples out/samples

# The main job, end to end: real weights (downloaded if missing), archive, serve, segment, stop.
demo: samples
	@test -f $(SAM_CHECKPOINT) || $(MAKE) --no-print-directory download
	$(MAKE) --no-print-directory archive serve
	$(PY) inference.py $(IMAGES) --out out/demo; status=$$?; $(MAKE) --no-print-directory stop; exit $$status

# SMOKE MODE: random weights, a small grid, thresholds 0 and NMS off. Checks the plumbing only;
# the masks mean nothing.
smoke: samples
	$(PY) -m sam_fast_serve.deploy random-checkpoint checkpoints/random_vit_b.pth
	$(MAKE) --no-print-directory archive serve SAM_CHECKPOINT=checkpoints/random_vit_b.pth MODEL_CONFIG=tests/smoke-config.yaml
	$(PY) inference.py $(IMAGES) --out out/smoke; status=$$?; $(MAKE) --no-print-directory stop; exit $$status

bench:
	$(PY) benchmarks/bench_engine.py
