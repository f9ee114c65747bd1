"""A plain run's NCCL group (parallel.ensure_process_group) on one GPU: made on an in-process store, bound to the
process's GPU (no device guessed from the rank), and made again after it is destroyed."""

import pytest

from test_operations import check_plain_run_group

pytestmark = pytest.mark.gpu


def test_plain_run_binds_its_nccl_group_to_its_gpu():
    check_plain_run_group()
