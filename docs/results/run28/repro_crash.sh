#!/bin/bash
# bash docs/results/run28/repro_crash.sh SET (repro, bisect29 or bisect30; see repro_crash.py)
SET=${1:-repro}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site
DEADLINE_S=${DEADLINE_S:-400} python3 docs/results/run28/repro_crash.py $SET /tmp/r28-$SET ${ITERS:-1500} 2>&1 | grep -E "^prepared|^aligned|^result|^total|Traceback" | cut -c1-700
for f in /tmp/r28-$SET/*.log; do echo "== $f"; grep -E "BISECT|it (500|1000|1500) \||Error|launch failure" $f | grep -v "odd grad" | cut -c1-300 | tail -8; done
nvidia-smi -q | grep -iE "xid|retired|remapp" | head; dmesg 2>/dev/null | grep -i xid | tail -5
date -u
