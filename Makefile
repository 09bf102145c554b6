# Common tasks. `make test` is what CI runs (see .ci/run); `make bench` is the main job.
PY ?= python

.PHONY: install install-cuda test bench bench-suite lint format gpu-check clean

install:
	pip install --no-build-isolation -e ".[test,triton]"

install-cuda:
	FORCE_CUDA=1 pip install --no-build-isolation -e ".[test,triton]"

test:
	$(PY) -m pytest tests -q

bench:
	$(PY) -m effnet_kernels bench --quick

bench-suite:
	$(PY) -m pytest benchmarks --benchmark-only

lint:
	ruff check effnet_kernels tests benchmarks

format:
	ruff format effnet_kernels tests benchmarks
	clang-format -i csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*.cpp

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info effnet_kernels/_C*.so
