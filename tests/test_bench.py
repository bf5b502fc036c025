"""gateskip.inference.bench's decoding rows on a tiny model: the compiled decode step is timed beside the
eager one, and every row says whether its tokens equal HF generate's."""

import torch

from gateskip.inference.bench import decode_speed, print_decode, same_text
from test_generation import calibrated, random_prompts

torch.set_num_threads(1)


def test_decode_speed_times_compiled_beside_eager(capsys):
    model = calibrated("llama")
    ids, _ = random_prompts([9], seed=4)
    result = decode_speed(model, ids, None, (0.0, 0.5), new_tokens=4, rounds=1, compile=True)
    rows = [(r["target"], r.get("compiled")) for r in result["rows"]]
    assert rows == [(None, None), (0.0, False), (0.5, False), (0.0, True), (0.5, True)]
    eager, compiled = result["rows"][1:3], result["rows"][3:]
    assert [r["same_as_hf"] for r in compiled] == [r["same_as_hf"] for r in eager]
    assert [r["net_saving"] for r in compiled] == [r["net_saving"] for r in eager]
    assert result["first_compiled_call_s"] > 0
    print_decode(result)
    out = capsys.readouterr().out
    assert "first compiled call (compiling included)" in out and " 0.5 compiled" in out


def test_same_text_ends_each_row_at_its_first_stop_token():
    # HF generate under min_new_tokens bans the stop token (2), so where our row stops it goes on.
    reference = torch.tensor([[7, 7, 5, 6, 8], [7, 7, 5, 6, 8]])
    stopped = torch.tensor([[7, 7, 5, 2, 9], [7, 7, 5, 6, 8]])
    assert same_text(stopped, reference, prompt=2, stops={2})
    assert not same_text(stopped, reference, prompt=2, stops=set())
    differs = torch.tensor([[7, 7, 4, 2, 9], [7, 7, 5, 6, 8]])
    assert not same_text(differs, reference, prompt=2, stops={2})
