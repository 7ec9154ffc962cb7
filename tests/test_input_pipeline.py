"""Tests of the device prefetch of streamed batches."""

import jax
import numpy as np
import pytest

from ddlr import input_pipeline


def _counted(elements, read):
  for element in elements:
    read.append(element)
    yield element


def _batches(count):
  return [
    (np.full(3, i, np.int32), {"images": np.full((2, 2), i, np.float32)}) for i in range(count)
  ]


@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_prefetch_keeps_order_on_device(count):
  fetched = list(input_pipeline.prefetch_to_device(_batches(count), size=2))
  assert len(fetched) == count
  for i, (ids, rest) in enumerate(fetched):
    assert isinstance(ids, jax.Array) and isinstance(rest["images"], jax.Array)
    np.testing.assert_array_equal(ids, np.full(3, i))
    np.testing.assert_array_equal(rest["images"], np.full((2, 2), i))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_prefetch_reads_size_elements_ahead(size):
  read = []
  fetched = input_pipeline.prefetch_to_device(_counted(_batches(6), read), size=size)
  assert not read  # nothing is read before the first element is asked for
  for i in range(6):
    next(fetched)
    # While element i is used, elements up to i + size have been copied.
    assert len(read) == min(i + 1 + size, 6)
  assert next(fetched, None) is None


def test_prefetch_rejects_size_below_one():
  with pytest.raises(ValueError, match=r"prefetch size=0 is invalid; expected at least 1"):
    next(input_pipeline.prefetch_to_device(_batches(2), size=0))
