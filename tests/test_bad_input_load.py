"""Bad model files and bad `load`/`encode` arguments: each one InputError (a ValueError) that names the file and
field, or the argument, and says what is accepted. A tiny random BERT (2 layers, width 64) saved by minilm keeps
every case cheap."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minilm
from minilm.encoder import BertConfig, BertEncoder
from minilm.errors import MissingFileError
from minilm.tokenizer import SentenceTokenizer


@pytest.fixture(scope="module")
def tiny_dir(model_dir, tmp_path_factory):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    model = minilm.SentenceEncoder(BertEncoder(config), SentenceTokenizer.from_dir(model_dir), ("mean",),
                                   normalize=True, source_dir=model_dir)
    return model.save(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return minilm.load(str(tiny_dir), device="cpu")


def edit_json(name, change):
    def mutate(model_dir):
        path = model_dir / name
        value = json.loads(path.read_text())
        change(value)  # in place
        path.write_text(json.dumps(value))
    return mutate


def write(name, text):
    return lambda model_dir: (model_dir / name).write_text(text)


def remove(name):
    return lambda model_dir: (model_dir / name).unlink()


def edit_tensors(change):
    def mutate(model_dir):
        path = model_dir / "model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return mutate


def reorder(*names):
    """modules.json with its modules (named by class) in another order, or some left out."""
    def change(modules):
        by_name = {module["type"].rsplit(".", 1)[-1]: module for module in modules}
        modules[:] = [by_name[name] for name in names]
    return edit_json("modules.json", change)


def set_module_path(name, path):
    def change(modules):
        next(module for module in modules if module["type"].endswith(name)).update(path=path)
    return edit_json("modules.json", change)


def symlink_out(folder):
    """The module's folder moved out of the model folder, a symlink left in its place."""
    def mutate(model_dir):
        outside = model_dir.parent / f"outside-{folder}"
        shutil.move(model_dir / folder, outside)
        (model_dir / folder).symlink_to(outside, target_is_directory=True)
    return mutate


def vocab_only(change):
    """A checkpoint without tokenizer.json (minilm then reads vocab.txt and tokenizer_config.json), changed."""
    def mutate(model_dir):
        (model_dir / "tokenizer.json").unlink()
        edit_json("tokenizer_config.json", change)(model_dir)
    return mutate


def without_sbert_config(change):
    """No sentence_bert_config.json (the length limit then comes from tokenizer_config.json), changed."""
    def mutate(model_dir):
        (model_dir / "sentence_bert_config.json").unlink()
        edit_json("tokenizer_config.json", change)(model_dir)
    return mutate


def truncate(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])


WORD = "embeddings.word_embeddings.weight"
FFN = "encoder.layer.1.intermediate.dense.weight"

# id -> (file that is bad, how, what the message must name besides the file)
BAD_FILES = {
    "config-hidden-size-string": ("config.json", edit_json("config.json", lambda c: c.update(hidden_size="64")),
                                  "'hidden_size'"),
    "config-zero-heads": ("config.json", edit_json("config.json", lambda c: c.update(num_attention_heads=0)),
                          "'num_attention_heads'"),
    "config-heads-do-not-divide": ("config.json", edit_json("config.json", lambda c: c.update(num_attention_heads=3)),
                                   "not divisible"),
    "config-missing-vocab": ("config.json", edit_json("config.json", lambda c: c.pop("vocab_size")), "'vocab_size'"),
    "config-bool-layers": ("config.json", edit_json("config.json", lambda c: c.update(num_hidden_layers=True)),
                           "'num_hidden_layers'"),
    "config-unknown-activation": ("config.json", edit_json("config.json", lambda c: c.update(hidden_act="swish")),
                                  "'hidden_act'"),
    "config-eps-string": ("config.json", edit_json("config.json", lambda c: c.update(layer_norm_eps="1e-12")),
                          "'layer_norm_eps'"),
    "config-dropout-above-one": ("config.json", edit_json("config.json", lambda c: c.update(hidden_dropout_prob=1.5)),
                                 "'hidden_dropout_prob'"),
    "config-not-json": ("config.json", write("config.json", "{hidden_size: 64"), "cannot read"),
    "config-a-list": ("config.json", write("config.json", "[1, 2]"), "JSON object"),
    "config-missing": ("config.json", remove("config.json"), "no such file"),
    "tokenizer-not-json": ("tokenizer.json", write("tokenizer.json", "not json at all"), "tokenizer"),
    "tokenizer-wrong-structure": ("tokenizer.json", write("tokenizer.json", '{"version": "1.0", "model": 5}'),
                                  "tokenizer"),
    "modules-not-json": ("modules.json", write("modules.json", "[{"), "cannot read"),
    "modules-not-a-list": ("modules.json", write("modules.json", '{"type": "Pooling"}'), "JSON list"),
    "modules-pooling-without-path": ("modules.json", edit_json("modules.json", lambda m: m[1].pop("path")),
                                     "'path'"),
    "modules-pooling-path-outside": ("modules.json", edit_json("modules.json", lambda m: m[1].update(path="../..")),
                                     "'path'"),
    "modules-unknown-module": ("modules.json", edit_json("modules.json", lambda m: m.append(
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})), "Dense"),
    "modules-entry-without-type": ("modules.json", edit_json("modules.json", lambda m: m[0].pop("type")), "'type'"),
    "modules-two-poolings": ("modules.json", edit_json("modules.json", lambda m: m.append(dict(m[1]))),
                             "second Pooling"),
    # modules.json is followed exactly or not at all (issue 23): sentence-transformers computes these differently
    "modules-normalize-before-pooling": ("modules.json", reorder("Transformer", "Normalize", "Pooling"),
                                         "Transformer, Normalize, Pooling; minilm computes Transformer, Pooling"),
    "modules-pooling-first": ("modules.json", reorder("Pooling", "Transformer", "Normalize"), "in that order"),
    "modules-without-pooling": ("modules.json", reorder("Transformer", "Normalize"), "Transformer, Normalize;"),
    "modules-transformer-only": ("modules.json", reorder("Transformer"), "the modules are Transformer;"),
    "modules-empty": ("modules.json", write("modules.json", "[]"), "the modules are none"),
    "modules-normalize-path-outside": ("modules.json", set_module_path("Normalize", "../elsewhere"),
                                       "(Normalize) field 'path' is '../elsewhere'"),
    "modules-normalize-path-absolute": ("modules.json", set_module_path("Normalize", "/tmp"),
                                        "(Normalize) field 'path' is '/tmp'"),
    "modules-pooling-path-not-a-name": ("modules.json", set_module_path("Pooling", "1_Pooling/../1_Pooling"),
                                        "(Pooling) field 'path'"),
    "modules-pooling-path-a-number": ("modules.json", set_module_path("Pooling", 1), "(Pooling) field 'path' is 1"),
    "modules-pooling-symlink-out": ("modules.json", symlink_out("1_Pooling"), "a symlink out of it"),
    "modules-normalize-symlink-out": ("modules.json", symlink_out("2_Normalize"),
                                      "(Normalize) field 'path' is '2_Normalize'"),
    "st-config-default-prompt-unknown": ("config_sentence_transformers.json", edit_json(
        "config_sentence_transformers.json", lambda c: c.update(prompts={"query": "query: "},
                                                                default_prompt_name="passage")),
        "'default_prompt_name'"),
    "st-config-not-json": ("config_sentence_transformers.json", write("config_sentence_transformers.json", "{"),
                           "cannot read"),
    "tokenizer-config-lower-case-string": ("tokenizer_config.json", vocab_only(lambda c: c.update(do_lower_case="no")),
                                           "'do_lower_case'"),
    "tokenizer-config-length-negative": ("tokenizer_config.json", without_sbert_config(
        lambda c: c.update(model_max_length=-5)), "'model_max_length'"),
    "sbert-not-json": ("sentence_bert_config.json", write("sentence_bert_config.json", "{'max_seq_length': 8}"),
                       "cannot read"),
    "sbert-length-string": ("sentence_bert_config.json", edit_json("sentence_bert_config.json",
                            lambda c: c.update(max_seq_length="256")), "'max_seq_length'"),
    "sbert-length-above-positions": ("sentence_bert_config.json", edit_json("sentence_bert_config.json",
                                     lambda c: c.update(max_seq_length=9999)), "'max_seq_length'"),
    "sbert-lower-case-string": ("sentence_bert_config.json", edit_json("sentence_bert_config.json",
                                lambda c: c.update(do_lower_case="yes")), "'do_lower_case'"),
    "pooling-not-json": ("1_Pooling/config.json", write("1_Pooling/config.json", "mean"), "cannot read"),
    "pooling-unknown-mode": ("1_Pooling/config.json", write("1_Pooling/config.json", '{"pooling_mode": "median"}'),
                             "median"),
    "pooling-mode-a-number": ("1_Pooling/config.json", write("1_Pooling/config.json", '{"pooling_mode": 5}'),
                              "'pooling_mode'"),
    "pooling-wrong-width": ("1_Pooling/config.json", edit_json("1_Pooling/config.json",
                            lambda c: c.update(word_embedding_dimension=384)), "'word_embedding_dimension'"),
    "pooling-missing": ("1_Pooling/config.json", remove("1_Pooling/config.json"), "no such file"),
    "weights-missing": ("model.safetensors", remove("model.safetensors"), "no model.safetensors"),
    "weights-truncated": ("model.safetensors", truncate, "damaged or truncated"),
    "weights-wrong-shape": ("model.safetensors", edit_tensors(lambda t: t.update({WORD: torch.zeros(100, 64)})),
                            "'embeddings.word.weight' has shape"),
    "weights-missing-tensor": ("model.safetensors", edit_tensors(lambda t: t.pop(FFN)), FFN),
    "weights-nan": ("model.safetensors", edit_tensors(lambda t: t[FFN].__setitem__((3, 5), float("nan"))),
                    "'layers.1.ffn_in.weight' holds NaN"),
    "weights-inf": ("model.safetensors", edit_tensors(lambda t: t[WORD].__setitem__((7, 1), float("-inf"))),
                    "'embeddings.word.weight' holds NaN or infinite"),
    "weights-integer": ("model.safetensors", edit_tensors(lambda t: t.update({FFN: t[FFN].long()})),
                        "expected floating point"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_model_file_names_file_and_field(tiny_dir, tmp_path, case):
    name, mutate, field = BAD_FILES[case]
    target = tmp_path / "model"
    shutil.copytree(tiny_dir, target)
    mutate(target)
    with pytest.raises(minilm.InputError) as error:
        minilm.load(str(target), device="cpu")
    message = str(error.value)
    assert name.rsplit("/", 1)[-1] in message and field in message, message
    assert "\n" not in message
    if case.endswith("-missing"):  # a file that is not there is also a FileNotFoundError
        assert isinstance(error.value, MissingFileError) and isinstance(error.value, FileNotFoundError)



def test_a_folder_that_is_no_model_is_its_error_alone(tiny_dir, tmp_path, caplog):
    """A folder without config.json (a run's output, a data folder) passed as a model (train.py --teacher, --model):
    the one error, not first a warning that modules.json is missing, which is said only for a folder that loads
    (a plain transformers checkpoint)."""
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(minilm.InputError, match="config.json"):
        minilm.load(str(tmp_path), device="cpu")
    assert not caplog.records, caplog.text
    plain = tmp_path / "plain"
    shutil.copytree(tiny_dir, plain)
    (plain / "modules.json").unlink()
    minilm.load(str(plain), device="cpu")
    assert "has no modules.json" in caplog.text

BAD_LOAD_ARGUMENTS = {
    "max-seq-length-above-positions": (dict(max_seq_length=9999), "max_seq_length=9999"),
    "max-seq-length-string": (dict(max_seq_length="64"), "max_seq_length='64'"),
    "max-seq-length-one": (dict(max_seq_length=1), "max_seq_length=1"),
    "unknown-attention-backend": (dict(backends={"attention": "flash"}), "attention backend 'flash'"),
    "unknown-backend-piece": (dict(backends={"attention_backend": "math"}), "unknown piece 'attention_backend'"),
    "unknown-device": (dict(device="gpu0"), "device 'gpu0'"),
    "device-minilm-does-not-run-on": (dict(device="mps"), "device 'mps': minilm runs on the CPU and CUDA"),
}


@pytest.mark.parametrize("case", BAD_LOAD_ARGUMENTS)
def test_bad_load_argument_is_named(tiny_dir, case):
    arguments, named = BAD_LOAD_ARGUMENTS[case]
    with pytest.raises(minilm.InputError, match="expected") as error:
        minilm.load(str(tiny_dir), **{"device": "cpu", **arguments})
    assert named in str(error.value)


def test_max_seq_length_is_never_clamped_silently(tiny_dir, tiny):
    assert minilm.load(str(tiny_dir), device="cpu", max_seq_length=512).max_seq_length == 512
    with pytest.raises(minilm.InputError, match="position embeddings"):
        tiny.max_seq_length = 513
    assert tiny.max_seq_length == 256  # unchanged by the refused value


BAD_ENCODE_ARGUMENTS = {
    "sentences-dict": (dict(sentences={"a": 1}), "not dict"),
    "sentences-bytes": (dict(sentences=b"bytes"), "not bytes"),
    "sentences-none": (dict(sentences=None), "not NoneType"),
    "sentences-int": (dict(sentences=5), "not int"),
    "sentences-set": (dict(sentences={"a", "b"}), "not set"),
    "sentence-none-in-list": (dict(sentences=["a", "b", None]), "sentence 2 is NoneType"),
    "sentence-bytes-in-tuple": (dict(sentences=("a", b"b")), "sentence 1 is bytes"),
    "sentence-list-in-list": (dict(sentences=["a", ["b"]]), "sentence 1 is list"),
    "sentence-lone-surrogate": (dict(sentences=["a", "b \ud800"]), "text 1 holds '\\ud800' at character 2"),
    "batch-size-zero": (dict(batch_size=0), "batch_size must be an integer >= 1, not 0"),
    "batch-size-float": (dict(batch_size=1.5), "batch_size must be an integer >= 1, not 1.5"),
    "batch-size-bool": (dict(batch_size=True), "batch_size must be an integer >= 1, not True"),
    "batch-size-string": (dict(batch_size="32"), "batch_size must be an integer >= 1, not '32'"),
    "normalize-string": (dict(normalize="no"), "normalize must be None (follow the model), True or False, not 'no'"),
    "normalize-int": (dict(normalize=0), "normalize must be None"),
    "convert-to-list": (dict(convert_to="list"), "convert_to must be one of ('numpy', 'tensor'), not 'list'"),
    "convert-to-unhashable": (dict(convert_to=["numpy"]), "convert_to must be one of"),
    "precision-int4": (dict(precision="int4"), "precision must be one of ('fp32', 'bf16', 'fp16'"),
    "precision-none": (dict(precision=None), "precision must be one of"),
    "token-budget-string": (dict(token_budget="yes"), "token_budget must be True or False, not 'yes'"),
    "show-progress-none": (dict(show_progress=None), "show_progress must be True or False"),
}


@pytest.mark.parametrize("case", BAD_ENCODE_ARGUMENTS)
def test_bad_encode_argument_is_named(tiny, case):
    arguments, message = BAD_ENCODE_ARGUMENTS[case]
    arguments = {"sentences": ["a sentence"], **arguments}
    with pytest.raises(minilm.InputError) as error:
        tiny.encode(**arguments)
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)  # `except ValueError` catches every bad input


def test_good_encode_arguments_still_work(tiny):
    import numpy as np

    texts = ("one", "two words")  # a tuple, numpy strings and numpy ints are all fine
    expected = tiny.encode(list(texts))
    assert np.array_equal(tiny.encode(texts, batch_size=np.int64(2)), expected)
    assert np.array_equal(tiny.encode(np.array(texts)), expected)
    assert np.array_equal(tiny.encode(iter(texts)), expected)
    with pytest.raises(minilm.InputError, match="encode also takes one string"):
        tiny.tokenize("a single string")  # the training path takes a list


def test_a_failing_encode_leaves_a_training_model_training(tiny, monkeypatch):
    """encode runs in eval mode and restores the model's mode however it ends: an evaluation during training that
    meets a bad input must not leave dropout off for the rest of the run."""
    original, calls = minilm.SentenceEncoder.forward, []

    def fails_at_the_second_batch(self, *args, **kwargs):
        calls.append(self.training)
        if len(calls) == 2:
            raise RuntimeError("the second batch failed")
        return original(self, *args, **kwargs)

    tiny.train()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(minilm.SentenceEncoder, "forward", fails_at_the_second_batch)
            with pytest.raises(RuntimeError, match="the second batch failed"):
                tiny.encode(["one", "two words", "three words here"], batch_size=1)
        assert calls == [False, False]  # encode ran in eval mode
        assert tiny.training and all(module.training for module in tiny.modules())
        with pytest.raises(minilm.InputError, match="surrogate"):  # a bad text found by the tokenizer, mid-way
            tiny.encode(["fine", "not \ud800 fine"])
        assert tiny.training and all(module.training for module in tiny.modules())
    finally:
        tiny.eval()
