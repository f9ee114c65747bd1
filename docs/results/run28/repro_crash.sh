#!/bin/bash
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site
DEADLINE_S=${DEADLINE_S:-400} python3 docs/results/run28/repro_crash.py /tmp/r28 ${ITERS:-1500} 2>&1 | grep -E "^prepared|^aligned|^main|^no_|^adamw|^mixers|^total|Traceback" | cut -c1-600
for f in /tmp/r28/*.log; do echo "== $f"; grep -E "it (500|1000|1500) \||Error|launch failure" $f | cut -c1-200 | tail -4; done
nvidia-smi -q | grep -iE "xid|retired|remapp" | head; dmesg 2>/dev/null | grep -i xid | tail -5
date -u
