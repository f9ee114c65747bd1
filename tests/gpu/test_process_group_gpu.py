"""A plain run's NCCL group (parallel.ensure_process_group) on one GPU: made on an in-process store, on the process's
GPU but not bound to it (communicators made lazily), barriers without a guessed device, made again after it is
destroyed."""

import pytest

from test_operations import check_plain_run_group

pytestmark = pytest.mark.gpu


def test_plain_run_sets_its_gpu_and_makes_communicators_lazily():
    check_plain_run_group()
