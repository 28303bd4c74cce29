"""Tiny models and tokenizers built on the fly, for tests (no network, seconds on a CPU).

Shared by every test module: keep it small and deterministic.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "def merge(models): return sum(models) / len(models)",
    "import os, sys; print(sys.argv[1:])",
    "fisher information weighs each parameter by how much the data cares",
    "a lazy merge reads one tensor at a time from disk",
    "class Tokenizer: pass  # trained on a handful of lines",
    "for i in range(10): total += i * i",
    "models that agree keep their weights; models that disagree are averaged",
]


def make_tokenizer(out_dir: str, texts: Optional[Sequence[str]] = None, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on `texts`, saved as a HF fast tokenizer in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts or CORPUS)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def llama_config(
    vocab_size: int, hidden: int = 32, layers: int = 2, tie: bool = False, **overrides
):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_llama(
    out_dir: Optional[str] = None,
    *,
    seed: int = 0,
    vocab_size: int = 300,
    hidden: int = 32,
    layers: int = 2,
    tie: bool = False,
    tokenizer_dir: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    **overrides,
):
    """A randomly initialised tiny Llama; saved (safetensors) with the tokenizer when `out_dir` is
    given."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(vocab_size, hidden, layers, tie, **overrides)).to(dtype)
    return _finish(model, out_dir, tokenizer_dir)


def _finish(model, out_dir: Optional[str], tokenizer_dir: Optional[str]):
    """eval mode; saved (safetensors) with the tokenizer when `out_dir` is given."""
    from transformers import AutoTokenizer

    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir, safe_serialization=True)
        if tokenizer_dir is not None:
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return model


def perturbed_copy(
    model, out_dir: str, *, seed: int, scale: float = 0.05, tokenizer_dir: Optional[str] = None
):
    """Save a copy of `model` with Gaussian noise on every parameter (a stand-in fine-tune)."""
    import copy

    from transformers import AutoTokenizer

    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clone.parameters():
            param.add_(
                torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype)
                * scale
            )
    clone.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return clone


def state_dict_from_dir(model_dir: str) -> dict:
    """Every tensor of a saved checkpoint directory, by checkpoint name."""
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(model_dir, name)))
    return out


def write_jsonl(path: str, rows: Iterable[dict]) -> str:
    import json

    with open(path, "w", encoding="utf-8") as fp:
        for row in rows:
            fp.write(json.dumps(row) + "\n")
    return path


def make_llama_classifier(
    out_dir: Optional[str] = None,
    *,
    seed: int = 0,
    num_labels: int = 3,
    vocab_size: int = 300,
    hidden: int = 32,
    layers: int = 2,
    tokenizer_dir: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
):
    """A tiny LlamaForSequenceClassification (pad_token_id set, so batches can be padded)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = llama_config(vocab_size, hidden, layers, num_labels=num_labels)
    return _finish(LlamaForSequenceClassification(config).to(dtype), out_dir, tokenizer_dir)


def brute_force_fisher(
    model, examples, *, task: str = "causal-lm", exact_classes: bool = False
) -> dict:
    """The slow, obviously right diagonal Fisher: one example at a time (no padding), autograd of
    the example's SUMMED log-likelihood w.r.t. every parameter, squared, averaged. float64
    throughout.

    examples, causal-lm: (input_ids, labels) with -100 where nothing is predicted (labels predict
    via the usual shift); seq-cls: (input_ids, label); either may carry a third item, a dict of
    other per-token model inputs ({"token_type_ids": [...]}). With `exact_classes`, seq-cls sums
    p(c|x) * g_c**2. Returns {parameter name (deduplicated, as named_parameters gives it): Fisher}.
    """
    model = model.double().eval()
    named = dict(model.named_parameters())
    for param in named.values():
        param.requires_grad_(True)
    sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in named.items()}
    for input_ids, target, *more in examples:
        ids = torch.tensor([input_ids])
        extra = {name: torch.tensor([value]) for name, value in (more[0] if more else {}).items()}
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits.double()
        if task == "seq-cls":
            logp = torch.log_softmax(logits[0], -1)
            terms = (
                [(logp[c], float(logp[c].detach().exp())) for c in range(logp.numel())]
                if exact_classes
                else [(logp[target], 1.0)]
            )
        else:
            total = torch.zeros((), dtype=torch.float64)
            logp = torch.log_softmax(logits[0], -1)
            for t in range(len(input_ids) - 1):  # position t predicts token t+1
                if target[t + 1] != -100:
                    total = total + logp[t, target[t + 1]]
            terms = [(total, 1.0)]
        for value, weight in terms:
            grads = torch.autograd.grad(
                value, list(named.values()), retain_graph=True, allow_unused=True
            )
            for (name, _p), grad in zip(named.items(), grads):
                if grad is not None:
                    sums[name] += weight * grad.double() ** 2
    return {name: value / len(examples) for name, value in sums.items()}


# ---------------------------------------------------------------- the family matrix
# (tests/test_families.py)
def make_pair_tokenizer(
    out_dir: str,
    texts: Optional[Sequence[str]] = None,
    vocab_size: int = 300,
    *,
    segments: bool = True,
):
    """A BERT-style tokenizer: ``<s> A </s> B </s>``, with segment ids (token_type_ids 0 for A, 1
    for B) when `segments` (BERT), without (RoBERTa's tokenizer returns no token_type_ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts or CORPUS)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B:1 </s>:1",
        special_tokens=[("<s>", 1), ("</s>", 2)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"]
        if segments
        else ["input_ids", "attention_mask"],
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_ENCODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=130,
    pad_token_id=0,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _decoder(config_cls, **extra):
    return lambda vocab: config_cls(vocab_size=vocab, **{**_DECODER, **extra})


def _family_configs():
    """family -> (config factory(vocab), model class name, task). Tiny: hidden 32, 2 layers."""
    import transformers as t

    moe = dict(num_local_experts=4, num_experts_per_tok=2)
    return {
        "llama": (_decoder(t.LlamaConfig), "LlamaForCausalLM", "causal-lm"),
        "mistral": (
            _decoder(t.MistralConfig, sliding_window=None),
            "MistralForCausalLM",
            "causal-lm",
        ),
        "qwen2": (_decoder(t.Qwen2Config), "Qwen2ForCausalLM", "causal-lm"),
        "qwen3": (_decoder(t.Qwen3Config, head_dim=8), "Qwen3ForCausalLM", "causal-lm"),
        "gemma": (_decoder(t.GemmaConfig, head_dim=8), "GemmaForCausalLM", "causal-lm"),
        # sliding windows longer than any padding run: in float64, transformers' eager Gemma
        # attention turns a
        # query row whose whole window is padding into -inf everywhere (NaN) -- float32 does not
        "gemma2": (
            _decoder(t.Gemma2Config, head_dim=8, sliding_window=64, query_pre_attn_scalar=8),
            "Gemma2ForCausalLM",
            "causal-lm",
        ),
        "gemma3": (
            _decoder(t.Gemma3TextConfig, head_dim=8, sliding_window=64, query_pre_attn_scalar=8),
            "Gemma3ForCausalLM",
            "causal-lm",
        ),
        "phi3": (_decoder(t.Phi3Config), "Phi3ForCausalLM", "causal-lm"),
        "gpt2": (
            lambda vocab: t.GPT2Config(
                vocab_size=vocab,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=128,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            "GPT2LMHeadModel",
            "causal-lm",
        ),
        "gpt_neox": (
            lambda vocab: t.GPTNeoXConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=128,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            "GPTNeoXForCausalLM",
            "causal-lm",
        ),
        "stablelm": (_decoder(t.StableLmConfig), "StableLmForCausalLM", "causal-lm"),
        "olmo2": (_decoder(t.Olmo2Config), "Olmo2ForCausalLM", "causal-lm"),
        "falcon": (
            lambda vocab: t.FalconConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                new_decoder_architecture=True,
                num_kv_heads=2,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            "FalconForCausalLM",
            "causal-lm",
        ),
        "mixtral": (_decoder(t.MixtralConfig, **moe), "MixtralForCausalLM", "causal-lm"),
        "qwen2_moe": (
            _decoder(
                t.Qwen2MoeConfig,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=32,
            ),
            "Qwen2MoeForCausalLM",
            "causal-lm",
        ),
        "qwen3_moe": (
            _decoder(
                t.Qwen3MoeConfig,
                head_dim=8,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
            ),
            "Qwen3MoeForCausalLM",
            "causal-lm",
        ),
        "bert": (
            lambda vocab: t.BertConfig(
                vocab_size=vocab, type_vocab_size=2, num_labels=3, **_ENCODER
            ),
            "BertForSequenceClassification",
            "seq-cls",
        ),
        "roberta": (
            lambda vocab: t.RobertaConfig(
                vocab_size=vocab, type_vocab_size=1, num_labels=3, **{**_ENCODER, "pad_token_id": 0}
            ),
            "RobertaForSequenceClassification",
            "seq-cls",
        ),
        # DeBERTa-v3's layout: relative attention with log buckets, a LayerNorm'd relative embedding
        # read as
        # `.weight` (never called), shared attention keys, no absolute positions
        "deberta_v2": (
            lambda vocab: t.DebertaV2Config(
                vocab_size=vocab,
                type_vocab_size=0,
                num_labels=3,
                relative_attention=True,
                position_buckets=16,
                norm_rel_ebd="layer_norm",
                share_att_key=True,
                pos_att_type=["p2c", "c2p"],
                position_biased_input=False,
                max_relative_positions=-1,
                **_ENCODER,
            ),
            "DebertaV2ForSequenceClassification",
            "seq-cls",
        ),
        "llama_cls": (
            _decoder(t.LlamaConfig, num_labels=3),
            "LlamaForSequenceClassification",
            "seq-cls",
        ),
        "qwen2_cls": (
            _decoder(t.Qwen2Config, num_labels=3),
            "Qwen2ForSequenceClassification",
            "seq-cls",
        ),
    }


FAMILIES = tuple(_family_configs())


def family_task(family: str) -> str:
    return _family_configs()[family][2]


def make_family(
    family: str,
    out_dir: Optional[str] = None,
    *,
    seed: int = 0,
    vocab_size: int = 300,
    tokenizer_dir: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
):
    """A tiny random-init model of `family` (see FAMILIES), every 1-D parameter (norm weights and
    biases) perturbed away from its 0/1 initialisation so that a wrong norm formula shows."""
    import transformers

    factory, class_name, _task = _family_configs()[family]
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(factory(vocab_size)).to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.2)
    return _finish(model, out_dir, tokenizer_dir)
