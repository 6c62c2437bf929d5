"""The launch rules kernels/launch.py owns (pure host code, no kernel runs): the vocabulary split, the
PyTorch path's chunks, the sampling head's row tiles per arch."""

from __future__ import annotations

import pytest
import torch

from hypo_fast.kernels import launch

META = torch.device("meta")


@pytest.mark.parametrize("vocab", [1, 63, 64, 65, 1000, 128256])
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64])
def test_vocabulary_splits_cover_the_vocabulary_once(vocab, splits):
    """Splits of whole tiles, in order, each holding at least one column, together exactly [0, V)."""
    cfg = launch.TileConfig(32, 64, 32, 1, 1)
    n_tiles, used, width = launch.vocab_splits(100, vocab, cfg, META, 90, splits)
    assert n_tiles == 4 and width % cfg.block_v == 0 and 1 <= used <= splits
    columns = [c for s in range(used) for c in range(s * width, min((s + 1) * width, vocab))]
    assert columns == list(range(vocab)) and (used - 1) * width < vocab


@pytest.mark.parametrize("n_rows,vocab,elements,min_chunk,width", [
    (4, 1000, 400, 16, 100), (4, 1000, 400, 256, 256), (0, 50, 400, 16, 50), (1000, 7, 10, 1, 1)])
def test_vocabulary_chunks_follow_the_element_budget(n_rows, vocab, elements, min_chunk, width):
    chunks = list(launch.vocab_chunks(n_rows, vocab, elements, min_chunk))
    assert chunks[0] == (0, min(width, vocab)) and chunks[-1][1] == vocab
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(chunks, chunks[1:]))  # contiguous, no overlap
    assert all(hi - lo == width for lo, hi in chunks[:-1])


@pytest.mark.parametrize("arch", launch.ARCHS)
def test_head_row_tile_is_the_smallest_holding_the_batch(arch):
    buckets = launch.head_row_buckets(arch)
    assert buckets == [16, 32, 64, 128]
    for rows, tile in [(1, 16), (16, 16), (17, 32), (100, 128), (128, 128), (256, 128)]:
        cfg = launch.head_tile(torch.bfloat16, arch, rows)
        assert cfg == launch.TILES["sample_head"]["half"][arch][tile] and cfg.block_n == tile


def test_head_row_buckets_are_the_arch_columns_row_tiles(monkeypatch):
    """An arch whose column has other row tiles gets other buckets, and head_tile picks among them."""
    table = {name: dict(column) for name, column in launch.TILES["sample_head"].items()}
    for name in table:
        table[name][80] = {b: c for b, c in table[name][80].items() if b in (32, 128)}
    monkeypatch.setitem(launch.TILES, "sample_head", table)
    assert launch.head_row_buckets(80) == [32, 128] and launch.head_row_buckets(90) == [16, 32, 64, 128]
    assert launch.head_tile(torch.float32, 80, 8).block_n == 32
    assert launch.head_tile(torch.float32, 80, 64).block_n == 128
    assert launch.head_tile(torch.float32, 90, 8).block_n == 16
