import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gateskip.tokens import gather_packed, gather_rows, kept_rows, pack_per_sequence, scatter_add_rows


@st.composite
def keep_masks(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 9))
    bits = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    return torch.tensor(bits).view(b, t)


@settings(max_examples=60, deadline=None)
@given(keep=keep_masks(), d=st.integers(1, 5))
def test_gather_then_scatter_add_equals_masked_add(keep, d):
    h = torch.randn(*keep.shape, d)
    y_full = torch.randn(*keep.shape, d)
    rows = kept_rows(keep)
    out = scatter_add_rows(h, rows, gather_rows(y_full, rows))
    assert torch.allclose(out, h + y_full * keep.unsqueeze(-1))


@settings(max_examples=60, deadline=None)
@given(keep=keep_masks())
def test_packed_layout_holds_kept_positions_in_order(keep):
    index, slot_valid = pack_per_sequence(keep)
    x = torch.arange(keep.numel()).view(*keep.shape, 1).float()
    packed = gather_packed(x, index)[slot_valid].squeeze(-1).long()
    assert packed.tolist() == kept_rows(keep).tolist()
    assert slot_valid.sum(1).tolist() == keep.sum(1).tolist()
