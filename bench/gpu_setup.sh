# Source on a GPU machine of the device tool, from the repo root: `. bench/gpu_setup.sh || exit`.
# Installs the carried wheels (.whl: pydantic & co, pytest; .whl-ray: a trimmed Ray 2.60.0 for cp312 without
# jars/rllib/tune/train/data/dashboard UI, and what Ray core + Serve need that the image lacks, uvloop
# included: `pip install ray[serve]` brings it through uvicorn[standard], and Ray then runs the proxy's
# and every actor's event loop on it; without it the Serve figures read low) into /tmp/site, puts it and
# the repo on PYTHONPATH (Ray's workers inherit it), keeps NVLink multicast off, and checks that Ray,
# Serve, FastAPI, uvloop and rayspeed import.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl-ray/*.whl || return 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
python3 -c "
import ray, ray.serve, fastapi, torch, uvloop, rayspeed
print('setup ok: ray', ray.__version__, 'fastapi', fastapi.__version__, 'torch', torch.__version__, 'uvloop', uvloop.__version__,
      'gpus', torch.cuda.device_count())" || return 1
