"""Other module types on the fast path: GPT-2 (HF Conv1D, LayerNorm with bias, learned position embeddings
whose output starts the graph, tied wte/lm_head) equals brute force; `--device-map auto` changes nothing."""

from __future__ import annotations

import torch

import tiny
from estimator_helpers import assert_fisher_close, compute, lm_reference_examples

ROWS = [{"text": t} for t in tiny.CORPUS[:4]] + [{"prompt": "p:", "completion": " the end"}]


def _gpt2(path, tokenizer_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(8)
    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=128, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(torch.randn_like(module.weight) * 0.2)
                module.bias.add_(torch.randn_like(module.bias) * 0.2)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)


def test_gpt2_equals_brute_force(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model_dir = str(tmp_path / "gpt2")
    _gpt2(model_dir, tokenizer_dir)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), ROWS)
    got = compute(model_dir, str(tmp_path / "f"), data, fisher_type="empirical", batch_size=3, dtype="float64",
                  accumulator_dtype="float64")
    from mergekit_fisher.fisher_file import open_fisher

    assert open_fisher(str(tmp_path / "f")).config.fallback_tensors == []  # all on the fast path
    reference = tiny.brute_force_fisher(GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float64),
                                        lm_reference_examples(AutoTokenizer.from_pretrained(tokenizer_dir), ROWS))
    stored = set(tiny.state_dict_from_dir(model_dir))
    assert set(got) == stored
    assert_fisher_close(got, {name: reference[name] for name in stored})


def test_device_map_auto_changes_nothing(tokenizer_dir, tmp_path):
    model_dir = str(tmp_path / "m")
    tiny.make_llama(model_dir, seed=3, tokenizer_dir=tokenizer_dir)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), ROWS)
    plain = compute(model_dir, str(tmp_path / "a"), data, fisher_type="empirical", batch_size=2)
    mapped = compute(model_dir, str(tmp_path / "b"), data, fisher_type="empirical", batch_size=2, device_map="auto")
    for name in plain:
        torch.testing.assert_close(mapped[name], plain[name], rtol=1e-6, atol=0)
