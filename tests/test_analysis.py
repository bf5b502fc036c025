"""Gate analysis: statistics on hand-made cases, and the plots and summary on a tiny model."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gateskip import GateConfig, GateSkipError, SkipPlan, SkipStats, add_gates
from gateskip.evaluation.analysis import (
    CLASSES, PLOTS, STATS, SUMMARY, GateRecord, _layer_ranges, analyze, anchor_finding, class_keep_rates, class_means, classify,
    collect, first_token_rank, token_class,
)
from gateskip.cli import main

torch.set_num_threads(1)

WORDS = ["<s>", ".", ",", " the", " cat", " sat", "\n", " 42", " of", " mat", "!", " dog"]


class WordTokenizer:
    """Decodes ids by a fixed word list: enough of a tokenizer for the analysis."""

    bos_token_id = 0

    def decode(self, ids):
        return "".join(WORDS[i] for i in ids)


def tiny_gated(seed=0, layers=3, skip_bos=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    gates = GateConfig(kind="vector", init_std=0.5, init_bias=0.0, skip_bos=skip_bos)
    return add_gates(LlamaForCausalLM(cfg).eval(), gates)


def test_token_class_reads_the_decoded_text():
    assert token_class(".") == "punctuation"
    assert token_class(" ,") == "punctuation"
    assert token_class(" The") == "function word"
    assert token_class(" cat") == "content word"
    assert token_class("\n") == "other"
    assert token_class(" 42") == "other"


def test_classify_marks_the_first_real_token_and_padding():
    ids = torch.tensor([[0, 4, 1, 3], [6, 6, 3, 9]])
    valid = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]).bool()  # second row left-padded
    got = classify(WordTokenizer(), ids, valid)
    idx = CLASSES.index
    assert got[0].tolist() == [idx("first"), idx("content word"), idx("punctuation"), idx("function word")]
    assert got[1].tolist() == [-1, -1, idx("first"), idx("content word")]


def _record(first_high: bool) -> tuple[GateRecord, torch.Tensor]:
    """Two sequences of four tokens, modules attn.0, mlp.0, attn.1, mlp.1 (early third = layer 0 of 3 layers)."""
    keys = ["attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]
    ids = torch.tensor([[0, 4, 1, 3], [0, 5, 2, 8]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    imp = torch.full((6, 2, 4), 0.5)
    imp[:, :, 2] = 0.7  # punctuation
    imp[:, :, 0] = 0.9 if first_high else 0.1
    keep = imp > 0.6
    return GateRecord(keys, ids, imp, valid, keep, 0.5), classify(WordTokenizer(), ids, valid)


def test_class_statistics_on_a_hand_made_record():
    record, classes = _record(first_high=True)
    means = class_means(record, classes)
    assert means["first"] == pytest.approx([0.9] * 6)
    assert means["punctuation"] == pytest.approx([0.7] * 6)
    assert means["content word"] == pytest.approx([0.5] * 6)
    assert means["function word"] == pytest.approx([0.5] * 6)
    assert means["other"] == [None] * 6
    assert first_token_rank(record) == [1.0] * 6
    rates = class_keep_rates(record, classes)
    assert rates["first"] == 1.0 and rates["punctuation"] == 1.0 and rates["content word"] == 0.0


def test_anchor_verdict_follows_the_numbers():
    found = anchor_finding(*_record(first_high=True), layers=3)
    assert found["early_layers"] == 1
    assert found["attn"]["anchor"] and found["mlp"]["anchor"]
    assert found["attn"]["first"] == pytest.approx(0.9)
    assert found["attn"]["other_tokens"] == pytest.approx((0.5 * 4 + 0.7 * 2) / 6)
    assert found["attn"]["first_leads_layers"] == [0, 1, 2]
    low = anchor_finding(*_record(first_high=False), layers=3)
    assert not low["attn"]["anchor"] and not low["mlp"]["anchor"]
    assert low["attn"]["first_is_top_share"] == 0.0
    assert low["mlp"]["first_leads_layers"] == []


def test_layer_ranges_read_like_a_person_writes_them():
    assert _layer_ranges([0, 1, 2, 5, 7, 8]) == "layers 0-2, 5, 7-8"
    assert _layer_ranges([3]) == "layers 3"


@pytest.mark.parametrize("skip_bos", [True, False])
def test_collect_records_the_decisions_the_model_made(skip_bos):
    model = tiny_gated(skip_bos=skip_bos)
    ids = torch.randint(1, len(WORDS), (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    record = collect(model, ids, mask, budget=0.5)
    assert record.keys == model.gate_bank.module_keys()
    assert record.importance.shape == (6, 3, 10)
    assert record.importance.min() > 0 and record.importance.max() < 1
    stats = SkipStats()
    with torch.no_grad():
        model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=0.5, stats=stats))
    for i, key in enumerate(record.keys):  # the replayed decisions skip what the real forward skipped
        skipped = int((record.valid & ~record.keep[i]).sum())
        assert skipped == stats.modules()[key].skipped == 5 + 5 + 3
    assert not record.keep[:, 2, 7:].any()  # padding is never kept
    if not skip_bos:
        assert record.keep[:, :, 0].all()


def test_collect_needs_gates():
    model = tiny_gated()
    from gateskip import remove_gates

    remove_gates(model)
    with pytest.raises(GateSkipError, match="gates"):
        collect(model, torch.ones(1, 4, dtype=torch.long))


def test_analyze_writes_plots_and_summary(tmp_path):
    model = tiny_gated()
    model.gate_bank.thresholds = {"0.5": {k: 0.5 for k in model.gate_bank.module_keys()}}
    ids = torch.cat([torch.zeros(4, 1, dtype=torch.long), torch.randint(1, len(WORDS), (4, 15))], 1)
    stats = analyze(model, WordTokenizer(), ids, None, tmp_path, budget=0.25, text="random words")
    for name in PLOTS.values():
        png = tmp_path / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = (tmp_path / SUMMARY).read_text()
    assert "anchor" in summary and "random words" in summary and "0.5" in summary
    saved = json.loads((tmp_path / STATS).read_text())
    assert saved["tokens"] == 64 and saved["class_counts"]["first"] == 4
    assert sum(saved["class_counts"].values()) == 64
    assert saved["anchor"] == json.loads(json.dumps(stats["anchor"]))
    kept = sum(saved["keep_rates"][c] * n for c, n in saved["class_counts"].items() if n)
    assert kept / 64 == pytest.approx(0.75)  # 4 of each sequence's 16 tokens skip every module at budget 0.25


def test_analyze_says_when_gates_are_untrained(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(WORDS))
    model = add_gates(LlamaForCausalLM(cfg).eval(), GateConfig(kind="lowrank", rank=4))
    analyze(model, WordTokenizer(), torch.randint(0, len(WORDS), (2, 8)), None, tmp_path, untrained=True)
    assert "untrained" in (tmp_path / SUMMARY).read_text()
    assert not (tmp_path / PLOTS["thresholds"]).exists()  # nothing calibrated, no threshold plot


def test_cli_rejects_bad_sizes(tmp_path, capsys):
    assert main(["analyze", "smollm2-135m", "--out", str(tmp_path), "--sequences", "0"]) == 2
    assert "--sequences: must be at least 1" in capsys.readouterr().err


def test_a_lead_in_the_mean_alone_is_no_anchor():
    record, classes = _record(first_high=True)
    record.importance[:, :, 0] = 0.75  # above every class mean ...
    record.importance[:, 0, 1] = 0.8  # ... but a content word tops sequence 0
    record.importance[:, 1, 1] = 0.2
    record.importance[:, 1, 2] = 0.76  # and a comma tops sequence 1
    found = anchor_finding(record, classes, layers=3)
    assert found["attn"]["first"] > max(found["attn"]["by_class"].values())
    assert found["attn"]["first_is_top_share"] == 0.0
    assert not found["attn"]["anchor"]
