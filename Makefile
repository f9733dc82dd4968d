# ldsc — common tasks. Everything runs inside .venv (created by `make install`).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first: the CPU build (2.13.0) by default; GPU users pass e.g.
#   make install TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-all test-timm bench bench-quality bench-ncut-venv bench-ddp scaling data weights gpu-check gpu-wheels backbone-report clean

install:            ## create .venv, install torch, then ldsc with its test extras
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[test]"

demo:               ## the main job: scikit-image's photographs, pixel backbone (no download)
	$(PY) -m ldsc.run

test:               ## the fast test suite (slow and GPU tests are skipped)
	$(PY) -m pytest -q

test-all:           ## every test, slow and GPU ones included (GPU tests skip without CUDA)
	$(PY) -m pytest -q -m "slow or not slow"

test-timm:          ## the backbone=timm tests (skipped by `make test` with a CPU torch: timm needs a torchvision built for your torch)
	test -x .venv-timm/bin/python || ($(PYTHON) -m venv .venv-timm && .venv-timm/bin/pip install torch torchvision \
	  && .venv-timm/bin/pip install -e ".[test,timm]")
	.venv-timm/bin/python -m pytest -q -p no:cacheprovider -k timm

NCUT_PY ?= $(shell [ -x .venv-ncut/bin/python ] && echo .venv-ncut/bin/python || echo $(PY))

bench:              ## start-up, ldsc vs ncut-pytorch (101 COCO, single image, 300 and 1,000 crops) vs the exact reference (JSON lines)
	[ -d data/crops10k ] || $(PY) experiments/make_images.py --sources ../shared/data/coco_val2017_first100 --n 10000 --out data/crops10k
	$(PY) -m ldsc.bench --ncut-python $(NCUT_PY) --reference-cache outputs/bench/reference | tee -a notes/measurements/bench.jsonl

bench-quality:      ## segmentation quality, ldsc vs ncut-pytorch (both affinities) on labelled composites of 8 and 16 sources, every matching protocol
	$(PY) experiments/bench_quality.py --ncut-python $(NCUT_PY) --out notes/measurements/bench_quality.jsonl

bench-ncut-venv:    ## ncut-pytorch in a venv of its own (.venv-ncut: CPU torch, ldsc, ncut-pytorch), used by make bench
	python3 -m venv .venv-ncut && .venv-ncut/bin/pip install -q torch==2.13.0 && .venv-ncut/bin/pip install -q -e . ncut-pytorch

bench-ddp:          ## one process vs two (trainer=ddp_cpu) on the 101 COCO images: alignment, memory per process
	$(PY) experiments/ddp_compare.py --root ../shared/data/coco_val2017_first100 --devices 2

scaling:            ## whole runs on 300 / 1,000 / 10,000 crops of the COCO images (needs ../shared/data)
	$(PY) experiments/make_images.py --sources ../shared/data/coco_val2017_first100 --n 10000 --out data/crops10k
	$(PY) experiments/scaling.py --source data/crops10k --sizes 300,1000,10000 --reference-sizes 300

gpu-check:          ## every newer backbone at real size (random weights, bf16) into the store + the 100-image pipeline, on a GPU
	$(PY) experiments/gpu_check.py --out notes/measurements/gpu_check.jsonl

gpu-wheels:         ## the wheels the lent GPU machine lacks (it has torch, transformers, timm), into .whl/ (git-ignored)
	@grep -qx '/.whl/' .git/info/exclude 2>/dev/null || (mkdir -p .git/info && echo /.whl/ >> .git/info/exclude)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl diffusers==0.42.1 faiss-cpu==1.15.1

backbone-report:    ## each backbone at its real size with random weights on this CPU: seconds per image, peak memory
	$(PY) experiments/backbone_report.py --size base --brief --out notes/measurements/backbone_report.jsonl

data:               ## COCO val2017 + COCO-Stuff labels into data/coco (needs internet)
	bash experiments/download_coco.sh data/coco

weights:            ## pre-download the paper's pretrained backbones (needs internet; others: hf download <id>)
	$(PY) -c "from huggingface_hub import snapshot_download as d; [d(m) for m in ('CompVis/stable-diffusion-v1-4', 'openai/clip-vit-base-patch16', 'facebook/dino-vitb8', 'facebook/vit-mae-base')]"

clean:
	rm -rf outputs multirun .pytest_cache
