"""The family matrix: every model family transformers builds from a config and mergekit 0.1.5 ships
an architecture file for, as a tiny random-init model (hidden 32, 2 layers, vocabulary 300, 8 short
examples). Run: ``pytest tests/test_families.py``.

Per family:

* `compute --fisher-type empirical` equals the brute-force batch-1 autograd loop (float64) for every
  stored tensor, to 1e-5 relative, is written under exactly the checkpoint's stored names, and its
  exact-fallback list is the one the README documents (empty but for DeBERTa-v2's relative-position
  tensors; MoE experts, routers and shared experts included);
* stock mergekit's `fisher` and `fisher_ties` (base + two perturbed copies, Fishers from `compute`)
  equal the formulas computed here -- or, where stock mergekit cannot merge the family even with
  `linear` (Falcon, GPT-NeoX), the merge fails with one clear `Error:` line;
* `compute --lora` (LoRA on the attention projections; seq-cls adapters also train the head through
  peft's modules_to_save) equals the brute-force Fisher of the merged dense model W0 + BA, head
  included, under the base checkpoint's names (dense families).

Plus regressions: BERT pair rows with token_type_ids, DeBERTa-v2 at batch 1 and 4, token-routed
Linears.
"""

from __future__ import annotations

import glob
import os

import pytest
import tiny
import torch
from estimator_helpers import compute, lm_reference_examples
from merge_world import run_recipe, write_recipe

from mergekit_fisher.fisher_file import open_fisher

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
FAMILIES = list(tiny.FAMILIES)
LM_ROWS = [{"text": t} for t in tiny.CORPUS[:5]] + [
    {"prompt": "q: what merges?", "completion": " fisher"},
    {"text": "short"},
    {"prompt": tiny.CORPUS[6], "completion": " ok"},
]
CLS_ROWS = [{"text": t, "label": i % 3} for i, t in enumerate(tiny.CORPUS[:5])] + [
    {"text": "a pair", "text_pair": tiny.CORPUS[5], "label": 2},
    {"text": tiny.CORPUS[6], "text_pair": "the lazy dog", "label": 0},
    {"text": "tiny", "text_pair": "x", "label": 1},
]
# families whose forward takes the tokenizer's segment ids (DeBERTa-v3 has no segment embedding:
# passed,
# unused); RoBERTa's tokenizer returns none
SEGMENTS = {"bert", "deberta_v2"}
PLAIN_PAIRS = {"roberta"}
F64 = dict(fisher_type="empirical", dtype="float64", accumulator_dtype="float64")
# README "Supported families": why these take the exact batch-1 path. DeBERTa-v2 reads the relative-
# position
# table as `.weight` (never calling its module), LayerNorms it as one batch-less (2k, H) tensor and
# projects
# it with the attention's own query/key projections: those products are shared by every example of a
# batch.
DEBERTA_EXACT = sorted(
    [
        "deberta.encoder.rel_embeddings.weight",
        "deberta.encoder.LayerNorm.weight",
        "deberta.encoder.LayerNorm.bias",
    ]
    + [
        f"deberta.encoder.layer.{i}.attention.self.{p}_proj.{r}"
        for i in range(2)
        for p in ("query", "key")
        for r in ("weight", "bias")
    ]
)
EXACT = {"deberta_v2": DEBERTA_EXACT}
# LoRA targets: the family's attention projections
LORA_TARGETS = {
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta_v2": ["query_proj", "value_proj"],
}
# stock mergekit 0.1.5 cannot merge these even with `linear`: its architecture file and the
# checkpoint
# disagree (Falcon: the config; GPT-NeoX: the attention.bias buffers a transformers-5 checkpoint no
# longer has)
STOCK_CANNOT_MERGE = {"falcon", "gpt_neox"}


class Family:
    """One family's tiny world, built on first use: model, data, tokenizer, names."""

    def __init__(self, root: str, family: str, tokenizers: dict):
        self.family = family
        self.task = tiny.family_task(family)
        self.root = os.path.join(root, family)
        kind = (
            "plain"
            if self.task == "causal-lm"
            else ("pair_plain" if family in PLAIN_PAIRS else "pair")
        )
        self.tokenizer_dir = tokenizers[kind]
        self.dir = os.path.join(self.root, "model")
        self.model = tiny.make_family(family, self.dir, seed=7, tokenizer_dir=self.tokenizer_dir)
        self.rows = CLS_ROWS if self.task == "seq-cls" else LM_ROWS
        self.data = tiny.write_jsonl(os.path.join(self.root, "data.jsonl"), self.rows)
        self.stored = tiny.state_dict_from_dir(self.dir)
        self.memory_name = stored_to_memory(self.stored, self.model)

    def both_layouts(self, values: dict) -> dict:
        """Tensors by stored name, plus by in-memory name (MoE experts fused as transformers 5 holds
        them, renamed tensors under their in-memory name too)."""
        shapes = {n: p.shape for n, p in self.model.named_parameters()}
        out = dict(values)
        fused = {}
        for name, (memory, index) in self.memory_name.items():
            if index == ():
                out.setdefault(memory, values[name])
                continue
            if memory not in fused:
                fused[memory] = torch.zeros(shapes[memory], dtype=values[name].dtype)
            fused[memory][index] = values[name]
        out.update(fused)
        return out

    def merged_names(self) -> set:
        """What stock mergekit writes: the stored names, or for MoE the in-memory ones."""
        if self.family not in MOE:
            return set(self.stored)
        return set(dict(self.model.named_parameters()))

    def fresh(self, model_dir=None):
        import transformers

        cls = getattr(transformers, type(self.model).__name__)
        # transformers' grouped expert kernels have no float64: the reference runs the eager loop
        extra = {"experts_implementation": "eager"} if self.family in MOE else {}
        return cls.from_pretrained(model_dir or self.dir, dtype=torch.float64, **extra)

    def examples(self):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        if self.task == "causal-lm":
            return lm_reference_examples(tokenizer, self.rows)
        out = []
        for row in self.rows:
            encoded = tokenizer(row["text"], row.get("text_pair"))
            extra = {"token_type_ids": encoded["token_type_ids"]} if self.family in SEGMENTS else {}
            out.append((encoded["input_ids"], row["label"], extra))
        return out

    def reference(self, model=None):
        """Brute force, by stored name (the in-memory name of the same tensor, by its values)."""
        full = tiny.brute_force_fisher(
            model if model is not None else self.fresh(), self.examples(), task=self.task
        )
        return {stored: full[memory][index] for stored, (memory, index) in self.memory_name.items()}


def assert_matches(actual: dict, expected: dict, rtol: float = 1e-5):
    """assert_fisher_close, with an absolute floor 1e-10 of the model's largest Fisher: tensors
    whose Fisher is 0 analytically (attention key biases: softmax ignores them) carry only
    round-off, ~1e-40."""
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    top = max(float(v.double().abs().max()) for v in expected.values())
    for name, value in expected.items():
        value = value.double()
        atol = rtol * 1e-3 * float(value.abs().max()) + 1e-10 * top
        torch.testing.assert_close(
            actual[name].double(),
            value,
            rtol=rtol,
            atol=atol,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def stored_to_memory(stored: dict, model) -> dict:
    """Checkpoint name -> (in-memory parameter, index) with the same values (random init: unique).

    The index is () for a whole parameter, or (expert, row block) for a per-expert tensor that
    transformers 5 fuses in memory (Mixtral's w1/w3 -> experts.gate_up_proj[e], w2 -> down_proj[e]):
    found by value, independently of the plugin's naming authority."""
    params = {n: p.detach().float() for n, p in model.named_parameters()}
    out = {}
    for name, value in stored.items():
        if not value.is_floating_point():
            continue
        value = value.float()
        hits = [
            (n, ()) for n, p in params.items() if p.shape == value.shape and torch.equal(p, value)
        ]
        if not hits and value.dim() == 2:
            rows = value.shape[0]
            for n, p in params.items():
                if p.dim() != 3 or p.shape[2] != value.shape[1] or p.shape[1] % rows:
                    continue
                for e in range(p.shape[0]):
                    for start in range(0, p.shape[1], rows):
                        index = (e, slice(start, start + rows))
                        if torch.equal(p[index], value):
                            hits.append((n, index))
        assert len(hits) == 1, (name, hits)
        out[name] = hits[0]
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    paths = {
        "plain": str(root / "plain"),
        "pair": str(root / "pair"),
        "pair_plain": str(root / "pair_plain"),
    }
    tiny.make_tokenizer(paths["plain"])
    tiny.make_pair_tokenizer(paths["pair"])
    tiny.make_pair_tokenizer(paths["pair_plain"], segments=False)
    return paths


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, tokenizers):
    root = str(tmp_path_factory.mktemp("families"))
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = Family(root, family, tokenizers)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_compute_equals_brute_force(worlds, tmp_path, family):
    world = worlds(family)
    out = str(tmp_path / "fisher")
    got = compute(world.dir, out, world.data, task=world.task, batch_size=3, **F64)
    # exactly the checkpoint's stored names, tied ones as stored, MoE experts one by one
    assert set(got) == set(world.stored)
    # MoE experts and routers too: the fused-experts fast path (estimator/experts.py)
    assert open_fisher(out).config.fallback_tensors == EXACT.get(family, [])
    assert_matches(got, world.reference())


# ---------------------------------------------------------------- merges
def _perturbed_pair(world):
    paths = []
    for seed in (1, 2):
        path = os.path.join(world.root, f"copy{seed}")
        if not os.path.isdir(path):
            tiny.perturbed_copy(
                world.model, path, seed=seed, scale=0.05, tokenizer_dir=world.tokenizer_dir
            )
        paths.append(path)
    return paths


def _fisher_of(world, model_dir, tmp_path, label):
    out = str(tmp_path / label)
    compute(model_dir, out, world.data, task=world.task, fisher_type="empirical", batch_size=4)
    return out


def _mean_normalized(fisher_dir):
    fisher = open_fisher(fisher_dir)
    values = {n: fisher.get_tensor(n).double() for n in fisher.names()}
    mean = torch.cat([v.flatten() for v in values.values()]).mean()
    return {n: v / mean for n, v in values.items()}


def _recipe(method, models, fishers, weights, base=None, parameters=None):
    recipe = {
        "merge_method": method,
        "dtype": "float32",
        "models": [
            {"model": m, "parameters": {"weight": w, "fisher": f}}
            for m, f, w in zip(models, fishers, weights)
        ],
    }
    if base:
        recipe["base_model"] = base
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def _run_stock_cli(recipe, tmp_path):
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from mergekit_fisher.merge.registry import ensure_registered

    ensure_registered()
    path = write_recipe(recipe, str(tmp_path / f"{recipe['merge_method']}.yml"))
    out = str(tmp_path / f"out_{recipe['merge_method']}")
    result = CliRunner().invoke(mergekit_yaml, [path, out, "--quiet", "--no-write-model-card"])
    return result, glob.glob(os.path.join(out, "*.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_merge(worlds, tmp_path, family):
    world = worlds(family)
    models = _perturbed_pair(world)
    fishers = [_fisher_of(world, m, tmp_path, f"f{i}") for i, m in enumerate(models)]
    if family in STOCK_CANNOT_MERGE:
        linear, _ = _run_stock_cli(
            {
                "merge_method": "linear",
                "dtype": "float32",
                "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
            },
            tmp_path,
        )
        assert linear.exit_code != 0  # stock mergekit itself cannot merge this family
        result, shards = _run_stock_cli(_recipe("fisher", models, fishers, [1.0, 1.0]), tmp_path)
        assert result.exit_code != 0 and not shards
        # a clean exit, not a crash
        assert isinstance(result.exception, SystemExit), repr(result.exception)
        assert result.output.count("Error:") == 1, result.output
        assert "stock mergekit cannot merge" in result.output, result.output
        return
    # stock mergekit writes MoE experts in transformers' fused in-memory layout: look up either way
    states = {m: world.both_layouts(tiny.state_dict_from_dir(m)) for m in [world.dir] + models}
    normalized = [world.both_layouts(_mean_normalized(f)) for f in fishers]
    floor = 1e-6

    weights = [1.0, 2.0]
    merged = run_recipe(_recipe("fisher", models, fishers, weights), str(tmp_path / "fisher_out"))
    assert set(merged) == world.merged_names(), sorted(set(merged) ^ world.merged_names())
    for name, value in merged.items():
        coefficients = [w * (f[name] + floor) for w, f in zip(weights, normalized)]
        expected = sum(c * states[m][name].double() for c, m in zip(coefficients, models)) / sum(
            coefficients
        )
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6, msg=name)

    merged = run_recipe(
        _recipe(
            "fisher_ties", models, fishers, [1.0, 1.0], base=world.dir, parameters={"density": 1.0}
        ),
        str(tmp_path / "ties_out"),
    )
    assert set(merged) == world.merged_names(), sorted(set(merged) ^ world.merged_names())
    base = states[world.dir]
    for name, value in merged.items():
        fisher = torch.stack([f[name] + floor for f in normalized])
        rel = fisher / fisher.mean(0)
        deltas = torch.stack([states[m][name].double() - base[name].double() for m in models])
        weighted = deltas * rel
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = (deltas.sign() == elected).double()
        divisor = (rel * agree).sum(0)
        divisor[divisor == 0] = 1
        expected = base[name].double() + (weighted * agree).sum(0) / divisor
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- LoRA
def _adapter(world, targets):
    """A LoRA on `targets` (seq-cls: peft's SEQ_CLS also trains the head, modules_to_save),
    non-trivial B and head; returns (adapter dir, merged dense model in float64)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    path = os.path.join(world.root, "adapter")
    if not os.path.isdir(path):
        torch.manual_seed(3)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets,
            init_lora_weights=False,
            task_type="SEQ_CLS" if world.task == "seq-cls" else "CAUSAL_LM",
            fan_in_fan_out=world.family == "gpt2",
        )
        peft_model = get_peft_model(world.fresh().float(), config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".modules_to_save." in name:  # the trained head: not the base head any more
                    param.add_(torch.randn_like(param) * 0.1)
        peft_model.save_pretrained(path)
    merged = PeftModel.from_pretrained(world.fresh(), path).merge_and_unload()
    return path, merged


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_equals_dense_merged_brute_force(worlds, tmp_path, family):
    world = worlds(family)
    adapter, merged = _adapter(world, LORA_TARGETS.get(family, ["q_proj", "v_proj"]))
    out = str(tmp_path / "lora")
    got = compute(world.dir, out, world.data, task=world.task, lora=adapter, batch_size=3, **F64)
    assert set(got) == set(
        world.stored
    )  # base names: no .base_layer., no modules_to_save / original_module
    assert open_fisher(out).config.fallback_tensors == EXACT.get(family, [])
    assert_matches(got, world.reference(merged))
    if world.task == "seq-cls":  # the head's Fisher is the trained copy's, under the base name
        head = (
            "score.weight"
            if "score.weight" in world.stored
            else next(
                n for n in world.stored if n.startswith("classifier.") and n.endswith("weight")
            )
        )
        base_only = compute(
            world.dir, str(tmp_path / "base"), world.data, task=world.task, batch_size=3, **F64
        )
        assert not torch.allclose(got[head], base_only[head], rtol=1e-3)


def test_seq_cls_adapter_targets_and_adapter_space_include_the_head(worlds, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    world = worlds("llama_cls")
    adapter, merged = _adapter(world, ["q_proj", "v_proj"])
    targets = compute(
        world.dir,
        str(tmp_path / "t"),
        world.data,
        task=world.task,
        lora=adapter,
        params="adapter-targets",
        batch_size=3,
        **F64,
    )
    expected = {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")
    }
    assert set(targets) == expected | {"score.weight"}
    reference = world.reference(merged)
    assert_matches(targets, {n: reference[n] for n in targets})

    space = compute(
        world.dir,
        str(tmp_path / "a"),
        world.data,
        task=world.task,
        lora=adapter,
        space="adapter",
        batch_size=3,
        **F64,
    )
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), framework="pt") as handle:
        assert set(space) == set(handle.keys())
    assert "base_model.model.score.weight" in space
    peft_model = PeftModel.from_pretrained(world.fresh(), adapter)
    full = tiny.brute_force_fisher(peft_model, world.examples(), task=world.task)
    by_param = {id(p): full[n] for n, p in peft_model.named_parameters() if n in full}
    from mergekit_fisher.estimator.lora import adapter_names

    expected = {names[0]: by_param[pid] for pid, names in adapter_names(peft_model).items()}
    assert_matches(space, expected)


# ---------------------------------------------------------------- regressions
def test_bert_pair_rows_pass_token_type_ids(worlds, tmp_path):
    """The segment ids of pair rows reach the model: without them BERT's Fisher is another one."""
    world = worlds("bert")
    got = compute(world.dir, str(tmp_path / "f"), world.data, task="seq-cls", batch_size=4, **F64)
    assert_matches(got, world.reference())
    without = tiny.brute_force_fisher(
        world.fresh(), [e[:2] for e in world.examples()], task="seq-cls"
    )
    name = "bert.embeddings.token_type_embeddings.weight"
    assert float(got[name][1].abs().sum()) > 0  # segment 1 is used by the pair rows
    assert float(without[name][1].abs().sum()) == 0
    worst = max(
        float((got[n].double() - without[world.memory_name[n][0]]).norm() / got[n].double().norm())
        for n in got
    )
    assert worst > 0.1, worst


@pytest.mark.parametrize("batch_size", [1, 4])
def test_deberta_v2_at_batch_sizes(worlds, tmp_path, batch_size):
    """DeBERTa-v2 crashed at batch >= 2 (a hook replaced its batch-less relative-position
    projections) and wrote an all-zero rel_embeddings.weight at batch 1 (read as `.weight`, its
    module never called)."""
    world = worlds("deberta_v2")
    out = str(tmp_path / "f")
    got = compute(world.dir, out, world.data, task="seq-cls", batch_size=batch_size, **F64)
    assert float(got["deberta.encoder.rel_embeddings.weight"].abs().max()) > 0
    assert open_fisher(out).config.fallback_tensors == DEBERTA_EXACT
    assert_matches(got, world.reference())


class RoutedMLP(torch.nn.Module):
    """A token-routed expert (transformers 4.x MoE style): tokens whose id is in `routed` go through
    `expert(hidden[top_x])`, a (tokens, H) input that holds no example axis."""

    def __init__(self, inner, hidden: int, routed, ids_of):
        super().__init__()
        self.inner = inner
        self.expert = torch.nn.Linear(hidden, hidden, dtype=torch.float64)
        self.routed = routed
        self.ids_of = ids_of  # -> the current forward's input ids

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        top_x = torch.isin(self.ids_of().reshape(-1), self.routed).nonzero().squeeze(-1)
        out = self.inner(x).reshape(-1, x.shape[-1]).index_add(0, top_x, self.expert(flat[top_x]))
        return out.reshape(x.shape)


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_routed_linear_takes_the_exact_path(task):
    """Token 9 routed: example 0 holds two, example 1 none, example 2 one -- 3 routed rows for a
    batch of 3, which passed the old batch-size check by shape and gave a 21.7 % wrong Fisher."""
    from mergekit_fisher.estimator.data import Example, collate
    from mergekit_fisher.estimator.engine import FisherEngine

    model = (
        tiny.make_llama(seed=11) if task == "causal-lm" else tiny.make_llama_classifier(seed=11)
    ).double()
    state = {}
    model.register_forward_pre_hook(
        lambda _m, _a, kwargs: state.update(ids=kwargs["input_ids"]), with_kwargs=True
    )
    layer = model.model.layers[0]
    layer.mlp = RoutedMLP(layer.mlp, 32, torch.tensor([9]), lambda: state["ids"])
    model.eval().requires_grad_(False)
    rows = [[5, 9, 9, 4, 12], [6, 7, 8], [9, 3, 3, 3]]
    if task == "causal-lm":
        examples = [Example(i, ids, list(ids)) for i, ids in enumerate(rows)]
        reference_examples = [(ids, list(ids)) for ids in rows]
    else:
        examples = [Example(i, ids, None, i % 3) for i, ids in enumerate(rows)]
        reference_examples = [(ids, i % 3) for i, ids in enumerate(rows)]
    engine = FisherEngine(
        model, task=task, fisher_type="empirical", accumulator_dtype=torch.float64
    )
    engine.step(collate(examples, 0, task))
    got = engine.fisher()
    engine.close()
    assert {"model.layers.0.mlp.expert.weight", "model.layers.0.mlp.expert.bias"} <= set(
        engine.fallback_keys()
    )
    assert_matches(got, tiny.brute_force_fisher(model, reference_examples, task=task))
