import pytest

from neo_common.protocol import Place
from neo_gateway.block_manager import BlockManager


def test_allocate_grows_by_whole_blocks_and_free_returns_all():
    bm = BlockManager(num_blocks=8, block_size=16, place=Place.GPU)
    assert bm.allocate(1, 1) == bm.table(1) and len(bm.table(1)) == 1
    bm.allocate(1, 16)
    assert len(bm.table(1)) == 1, "16 tokens still fit one block"
    bm.allocate(1, 17)
    assert len(bm.table(1)) == 2
    bm.allocate(2, 40)
    assert len(bm.table(2)) == 3 and bm.num_free == 3
    assert set(bm.table(1)).isdisjoint(bm.table(2))
    bm.free(1)
    bm.free(2)
    assert bm.num_free == 8 and bm.usage == 0.0


def test_cannot_allocate_beyond_pool():
    bm = BlockManager(num_blocks=4, block_size=16)
    bm.allocate(1, 48)
    assert bm.can_allocate(2, 16) and not bm.can_allocate(2, 17)
    assert not bm.can_allocate(2, 16, reserve=1)
    with pytest.raises(MemoryError):
        bm.allocate(2, 17)
    assert 2 not in bm.tables or bm.tables[2] == [], "a failed allocation takes nothing"
    assert bm.num_free == 1
