"""The two helpers mergekit's own test suite imports from its `tests/common.py`, which its sdist
does not ship. Written for `scripts/test_mergekit_suite.sh`, which runs that suite with the plugin
installed: a tiny Llama builder and a merge-then-check runner, with the same names and arguments."""

import os
import tempfile
from typing import Callable, Optional

from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    validate: Optional[Callable[[str], None]] = None,
    auto_arch: bool = False,  # the suite passes it for VLMs; mergekit 0.1.5 infers those itself
):
    """Merge into a temporary directory; the output must have weights (one file or an index), a
    config, and no NaN."""
    with tempfile.TemporaryDirectory() as out:
        run_merge(config, out_path=out, options=MergeOptions())
        weights = ("model.safetensors", "model.safetensors.index.json")
        assert any(os.path.exists(os.path.join(out, name)) for name in weights), (
            "no weights written"
        )
        assert os.path.exists(os.path.join(out, "config.json")), "no config.json written"
        if check_nan:
            for name in sorted(os.listdir(out)):
                if name.endswith(".safetensors"):
                    with safe_open(os.path.join(out, name), framework="pt") as handle:
                        for key in handle.keys():
                            assert not handle.get_tensor(key).isnan().any(), f"NaN in {key}"
        if validate:
            validate(out)


def make_picollama(path: str, vocab_size: int = 64) -> str:
    """A random 2-layer Llama (hidden 32) saved as safetensors in `path`."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_hidden_layers=2,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def make_gpt2size(path: str) -> str:
    """A random GPT-2 with its 12 layers (tiny widths) saved in `path`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    # 12 layers, as GPT-2
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=12, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def make_picogranite(path: str, vocab_size: int = 64) -> str:
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=2,
    )
    GraniteForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def make_picoLlaVa(path: str) -> str:  # noqa: N802 (the suite's name)
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_hidden_layers=2,
        ),
        image_token_index=63,
    )
    LlavaForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return str(path)
