"""`mergekit-fisher convert`: foreign names and containers -> format v1, checked against the
model."""

import os

import pytest
import tiny
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mergekit_fisher.cli import main
from mergekit_fisher.fisher_file import open_fisher
from mergekit_fisher.tools.names import match_names, normalize


class NotATensor:  # a pickled instance of this must never be loaded
    pass


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny.make_llama(str(path), hidden=16, layers=1, vocab_size=64)
    shapes = {n: tuple(t.shape) for n, t in tiny.state_dict_from_dir(str(path)).items()}
    return path, shapes


def importance(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=generator) for n, s in shapes.items()}


def test_normalize_and_match_names():
    assert (
        normalize("module.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    )
    assert (
        normalize("base_model.model.model.layers.0.q_proj.base_layer.weight")
        == "model.layers.0.q_proj.weight"
    )
    assert normalize("_orig_mod.module.lm_head.weight") == "lm_head.weight"
    targets = [
        "model.layers.0.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        "transformer.h.0.attn.weight",
    ]
    match = match_names(
        [
            "layers.0.q_proj.weight",
            "module.lm_head.weight",
            "norm.weight",
            "h.0.attn.weight",
            "step",
            "weight",
        ],
        targets,
    )
    assert match.mapping == {
        "layers.0.q_proj.weight": "model.layers.0.q_proj.weight",  # `model.` added
        "module.lm_head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight",
        "h.0.attn.weight": "transformer.h.0.attn.weight",  # unique dotted suffix
    }
    assert match.unmatched == ["step", "weight"]
    assert set(match.ambiguous["weight"]) == set(targets)  # suffix of every target: not guessed


def test_torch_save_dict_with_module_prefix(model, tmp_path):
    path, shapes = model
    values = importance(shapes)
    source = {("module." + n if i % 2 else n): v for i, (n, v) in enumerate(values.items())}
    source["module.classifier.weight"] = torch.ones(2, 2)  # not in the model: reported, not written
    torch.save(source, tmp_path / "fisher.pt")
    out = tmp_path / "out"
    result = run("convert", tmp_path / "fisher.pt", out, "--model", path, "--num-examples", "40")
    assert result.exit_code == 0, result.output
    converted = open_fisher(str(out))
    assert sorted(converted.names()) == sorted(shapes)
    for name, value in values.items():
        assert torch.equal(converted.get_tensor(name), value)
    assert converted.config.num_examples == 40 and converted.config.model == str(path)
    renamed = sum(1 for n in source if n.startswith("module.")) - 1
    assert (
        f"matched: {len(shapes)} of {len(source)} input tensors ({renamed} renamed)"
        in result.output
    )
    assert "unmatched input tensors (not written): 1\n    module.classifier.weight" in result.output
    assert "model tensors without a Fisher: 0" in result.output


def test_safetensors_file_and_directory_with_peft_names(model, tmp_path):
    path, shapes = model
    values = importance(shapes, seed=1)
    peft = {
        "base_model.model." + n.replace(".weight", ".base_layer.weight") if "proj" in n else n: v
        for n, v in values.items()
    }
    save_file(peft, str(tmp_path / "imp.safetensors"))
    result = run(
        "convert", tmp_path / "imp.safetensors", tmp_path / "a.safetensors", "--model", path
    )
    assert result.exit_code == 0, result.output
    converted = open_fisher(str(tmp_path / "a.safetensors"))
    assert {n: converted.get_tensor(n) for n in converted.names()}.keys() == values.keys()
    assert all(torch.equal(converted.get_tensor(n), v) for n, v in values.items())
    # a directory holding two files, half of the model each; bf16 values come out as float32
    directory = tmp_path / "parts"
    directory.mkdir()
    names = sorted(values)
    save_file(
        {n: values[n].to(torch.bfloat16) for n in names[::2]}, str(directory / "part1.safetensors")
    )
    torch.save({"module." + n: values[n] for n in names[1::2]}, directory / "part2.pt")
    result = run("convert", directory, tmp_path / "b", "--model", path)
    assert result.exit_code == 0, result.output
    converted = open_fisher(str(tmp_path / "b"))
    assert sorted(converted.names()) == names
    for n in names[::2]:
        assert torch.equal(converted.get_tensor(n), values[n].to(torch.bfloat16).float())
    for n in names[1::2]:
        assert torch.equal(converted.get_tensor(n), values[n])


def _bad_inputs(tmp_path, shapes):
    values = importance(shapes, seed=2)
    name = sorted(shapes)[0]
    cases = {}
    torch.save({"a": NotATensor()}, tmp_path / "object.pt")
    cases["object.pt"] = (
        "refusing it: it holds a pickled Python object (test_tools_convert.NotATensor), "
        "not only tensors"
    )
    (tmp_path / "junk.pt").write_text("not a torch file")
    cases["junk.pt"] = "refusing it: its pickle uses an instruction a dict of tensors does not need"
    torch.save([values[name]], tmp_path / "list.pt")
    cases["list.pt"] = "expected a dict of tensors, found a list"
    torch.save({"state_dict": {name: values[name]}}, tmp_path / "nested.pt")
    cases["nested.pt"] = (
        "entry 'state_dict' is a dict (a nested dict: save obj['state_dict'] itself)"
    )
    torch.save(
        {"unrelated.x": torch.ones(2), "also.not.there": torch.ones(1)}, tmp_path / "nothing.pt"
    )
    cases["nothing.pt"] = "none of the 2 input tensors matches a tensor of the model"
    torch.save({**values, name: torch.ones(3, 3)}, tmp_path / "shape.pt")
    cases["shape.pt"] = f"does not match the model's {shapes[name]} [Fisher file"
    negative = dict(values)
    negative[name] = values[name] - 0.5
    torch.save(negative, tmp_path / "negative.pt")
    cases["negative.pt"] = "these are not squared gradients"
    nan = dict(values)
    nan[name] = values[name].clone()
    nan[name][0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    cases["nan.safetensors"] = "1 non-finite (NaN/Inf) value(s)"
    torch.save({name: torch.ones(shapes[name], dtype=torch.int64)}, tmp_path / "ints.pt")
    cases["ints.pt"] = "dtype torch.int64 is not floating point"
    torch.save({"module." + name: values[name], name: values[name]}, tmp_path / "twice.pt")
    cases["twice.pt"] = "map onto this model tensor"
    return cases, name


def test_bad_inputs_are_refused_with_one_message_and_no_output(model, tmp_path):
    path, shapes = model
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases, name = _bad_inputs(inputs, shapes)
    outdir = tmp_path / "outputs"
    outdir.mkdir()
    for filename, message in cases.items():
        result = run("convert", inputs / filename, outdir / "out", "--model", path)
        assert result.exit_code == 2, (filename, result.output)
        assert message in result.output, (filename, result.output)
        assert (
            result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
        ), result.output
        assert (
            "weights_only=False" not in result.output and "`False`" not in result.output
        )  # never that advice
        assert os.listdir(outdir) == [], filename  # nothing written, no temporary leftovers
    # the error names the tensor
    result = run("convert", inputs / "negative.pt", outdir / "out", "--model", path)
    assert f"tensor {name}]" in result.output


def test_model_and_output_problems(model, tmp_path):
    path, shapes = model
    torch.save(importance(shapes), tmp_path / "f.pt")
    pickled = tmp_path / "pickled_model"
    pickled.mkdir()
    torch.save({"w": torch.ones(1)}, pickled / "pytorch_model.bin")
    result = run("convert", tmp_path / "f.pt", tmp_path / "o", "--model", pickled)
    assert (
        result.exit_code == 2 and "pickle-only" in result.output and not (tmp_path / "o").exists()
    )
    (tmp_path / "exists").mkdir()
    result = run("convert", tmp_path / "f.pt", tmp_path / "exists", "--model", path)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (
        run(
            "convert", tmp_path / "f.pt", tmp_path / "exists", "--model", path, "--overwrite"
        ).exit_code
        == 0
    )
    assert sorted(open_fisher(str(tmp_path / "exists")).names()) == sorted(shapes)


def test_renaming_a_fisher_file_keeps_its_provenance(model, tmp_path):
    from mergekit_fisher.fisher_file import FisherConfig, write_fisher

    path, shapes = model
    values = importance(shapes, seed=3)
    write_fisher(
        {"_orig_mod." + n: v for n, v in values.items()},
        tmp_path / "compiled",
        FisherConfig(fisher_type="sampled", num_examples=17, num_tokens=300, dataset_hash="h"),
    )
    result = run(
        "convert",
        tmp_path / "compiled",
        tmp_path / "out.safetensors",
        "--model",
        path,
        "--num-examples",
        "20",
    )
    assert result.exit_code == 0, result.output
    config = open_fisher(str(tmp_path / "out.safetensors")).config
    # carried from the input's fisher_config.json, except what an option overrides
    assert (config.fisher_type, config.num_tokens, config.dataset_hash, config.num_examples) == (
        "sampled",
        300,
        "h",
        20,
    )
    assert config.model_extra["renamed"]["_orig_mod.lm_head.weight"] == "lm_head.weight"
