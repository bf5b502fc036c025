import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gateskip.core.tokens import gather_packed, pack_per_sequence, scatter_add_packed


@st.composite
def keep_masks(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 9))
    bits = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    return torch.tensor(bits).view(b, t)


@settings(max_examples=60, deadline=None)
@given(keep=keep_masks(), d=st.integers(1, 5), extra=st.integers(0, 3))
def test_gather_then_scatter_add_equals_masked_add(keep, d, extra):
    """With the capacity read from the mask or given ahead (larger is fine), padding slots add nothing."""
    h = torch.randn(*keep.shape, d)
    y_full = torch.randn(*keep.shape, d)
    for capacity in (None, int(keep.sum(1).max()) + extra):
        index, slot_valid = pack_per_sequence(keep, capacity)
        out = scatter_add_packed(h, index, slot_valid, gather_packed(y_full, index))
        assert torch.allclose(out, h + y_full * keep.unsqueeze(-1))


@settings(max_examples=60, deadline=None)
@given(keep=keep_masks())
def test_packed_layout_holds_kept_positions_in_order(keep):
    index, slot_valid = pack_per_sequence(keep)
    x = torch.arange(keep.numel()).view(*keep.shape, 1).float()
    packed = gather_packed(x, index)[slot_valid].squeeze(-1).long()
    assert packed.tolist() == keep.reshape(-1).nonzero().squeeze(1).tolist()  # batch-major, ascending
    assert slot_valid.sum(1).tolist() == keep.sum(1).tolist()
