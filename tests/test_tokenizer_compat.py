"""device_tolerant: Unsloth notebooks' `.to("cuda")` on tokenizer outputs runs on a machine without CUDA."""

import copy
import pickle
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from macft import tokenizer_compat  # noqa: E402
from macft.tokenizer_compat import DeviceTolerantTokenizer, device_tolerant  # noqa: E402

no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the tokenizer is left unchanged")

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture
def plain(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def tolerant(tokenizer_dir):
    return device_tolerant(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture
def fresh_warning(monkeypatch):
    """The once-per-process warning not yet shown, and every warning recorded (none deduplicated)."""
    monkeypatch.setattr(tokenizer_compat, "_warned_about_missing_device", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _device_warnings(caught):
    return [w for w in caught if "stay on the CPU" in str(w.message)]


@no_cuda_here
def test_call_to_cuda_stays_on_cpu_with_the_same_ids_and_warns_once(plain, tolerant, fresh_warning):
    expected = plain(["hi there"], return_tensors="pt")
    for _ in range(3):
        inputs = tolerant(["hi there"], return_tensors="pt").to("cuda")
        assert isinstance(inputs, transformers.BatchEncoding)
        assert inputs["input_ids"].device.type == "cpu"
        assert inputs["input_ids"].tolist() == expected["input_ids"].tolist()
        assert inputs["attention_mask"].tolist() == expected["attention_mask"].tolist()
    (warning,) = _device_warnings(fresh_warning)
    message = str(warning.message)
    assert "tokenizer(...).to('cuda')" in message and "MLX core / the CPU" in message
    assert warning.filename == __file__  # points at the user's line, not at macft or transformers


@no_cuda_here
def test_chat_template_tensor_to_cuda_stays_on_cpu_and_behaves_as_a_tensor(plain, tolerant, fresh_warning):
    kwargs = dict(tokenize=True, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    expected = plain.apply_chat_template(MESSAGES, **kwargs)
    input_ids = tolerant.apply_chat_template(MESSAGES, **kwargs)
    assert isinstance(input_ids, torch.Tensor)
    assert input_ids.shape == expected.shape and len(input_ids) == 1
    assert input_ids.tolist() == expected.tolist()
    assert input_ids[0, :3].tolist() == expected[0, :3].tolist()
    # ordinary ops give plain tensors: the subclass stays on the tokenizer's output
    assert type(input_ids[0]) is torch.Tensor and type(input_ids + 1) is torch.Tensor
    assert type(torch.cat([input_ids, input_ids])) is torch.Tensor

    for moved in (input_ids.to("cuda"), input_ids.cuda(), input_ids.to(device="cuda:0"),
                  input_ids.to(torch.device("cuda")), input_ids.to(0)):
        assert moved.device.type == "cpu" and moved.tolist() == expected.tolist()
        assert moved.to("cuda").device.type == "cpu"  # moving again is tolerated too
    as_float = input_ids.to("cuda", torch.float32)
    assert as_float.dtype == torch.float32 and as_float.device.type == "cpu"
    (warning,) = _device_warnings(fresh_warning)
    assert "tokenizer.apply_chat_template(...).to('cuda')" in str(warning.message)


@no_cuda_here
def test_chat_template_return_dict_to_cuda(plain, tolerant, fresh_warning):
    kwargs = dict(tokenize=True, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = plain.apply_chat_template(MESSAGES, **kwargs)
    inputs = tolerant.apply_chat_template(MESSAGES, **kwargs).to("cuda")
    assert isinstance(inputs, transformers.BatchEncoding)
    assert inputs["input_ids"].device.type == "cpu"
    assert inputs["input_ids"].tolist() == expected["input_ids"].tolist()
    assert inputs.input_ids.to("cuda").tolist() == expected["input_ids"].tolist()  # moved twice
    assert len(_device_warnings(fresh_warning)) == 1


@no_cuda_here
def test_mps_when_missing_stays_on_cpu(tolerant, fresh_warning):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS: the ids move there")
    ids = tolerant.encode("hi there", return_tensors="pt").to("mps")
    assert ids.device.type == "cpu"
    (warning,) = _device_warnings(fresh_warning)
    assert "tokenizer.encode(...).to('mps')" in str(warning.message) and "no MPS device" in str(warning.message)


@no_cuda_here
def test_to_cpu_and_pad_are_silent_and_equal(plain, tolerant, fresh_warning):
    texts = ["hi there", "hello"]
    inputs = tolerant(texts, padding=True, return_tensors="pt").to("cpu")
    assert inputs["input_ids"].tolist() == plain(texts, padding=True, return_tensors="pt")["input_ids"].tolist()
    assert tolerant.encode("hi", return_tensors="pt").cpu().tolist() == plain.encode("hi", return_tensors="pt").tolist()
    features = {"input_ids": [[1, 2, 3], [4]]}
    padded = tolerant.pad(features, return_tensors="pt").to(torch.device("cpu"))
    assert padded["input_ids"].tolist() == plain.pad(features, return_tensors="pt")["input_ids"].tolist()
    assert _device_warnings(fresh_warning) == []


@no_cuda_here
def test_numpy_and_list_outputs_are_untouched(plain, tolerant):
    import numpy as np

    arrays = tolerant(["hi there"], return_tensors="np")
    assert type(arrays["input_ids"]) is np.ndarray
    assert arrays["input_ids"].tolist() == plain(["hi there"], return_tensors="np")["input_ids"].tolist()
    assert tolerant("hi there")["input_ids"] == plain("hi there")["input_ids"]
    assert tolerant.apply_chat_template(MESSAGES, tokenize=False) == plain.apply_chat_template(MESSAGES, tokenize=False)


@no_cuda_here
def test_same_object_class_name_and_untouched_methods(tokenizer_dir, plain):
    original = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tolerant = device_tolerant(original)
    assert tolerant is original
    assert isinstance(tolerant, transformers.PreTrainedTokenizerBase)
    assert isinstance(tolerant, type(plain)) and type(tolerant).__name__ == type(plain).__name__
    assert device_tolerant(tolerant) is tolerant and type(device_tolerant(tolerant)) is type(tolerant)
    assert hasattr(tolerant, "encode_plus") == hasattr(plain, "encode_plus")  # version detection unchanged
    ids = tolerant(["hi there", "what is it"], padding=True, return_tensors="pt")["input_ids"]
    assert tolerant.batch_decode(ids, skip_special_tokens=True) == plain.batch_decode(ids, skip_special_tokens=True)


@no_cuda_here
def test_save_pretrained_writes_the_same_files_and_reloads(plain, tolerant, tmp_path):
    plain.save_pretrained(tmp_path / "plain")
    tolerant.save_pretrained(tmp_path / "tolerant")
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "tolerant").iterdir())
    for name in names:
        assert (tmp_path / "tolerant" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tolerant")
    assert type(reloaded) is type(plain)
    assert reloaded("hi there")["input_ids"] == plain("hi there")["input_ids"]


@no_cuda_here
def test_pickle_deepcopy_and_datasets_fingerprint(plain, tolerant, fresh_warning):
    from datasets.fingerprint import Hasher

    for copied in (pickle.loads(pickle.dumps(tolerant)), copy.deepcopy(tolerant)):
        assert type(copied) is type(tolerant)
        assert copied(["hi there"], return_tensors="pt").to("cuda")["input_ids"].tolist() == \
            plain(["hi there"], return_tensors="pt")["input_ids"].tolist()
    assert Hasher.hash(tolerant) == Hasher.hash(copy.deepcopy(tolerant))

    inputs = tolerant(["hi there"], return_tensors="pt")
    ids = tolerant.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    for copied in (pickle.loads(pickle.dumps(ids)), copy.deepcopy(ids)):
        assert copied.tolist() == ids.tolist() and copied.to("cuda").device.type == "cpu"
    for copied in (pickle.loads(pickle.dumps(inputs)), copy.deepcopy(inputs)):
        assert copied.to("cuda")["input_ids"].tolist() == inputs["input_ids"].tolist()
    assert Hasher.hash(inputs) == Hasher.hash(copy.deepcopy(inputs))


@no_cuda_here
def test_pickled_tokenizer_and_tensor_load_in_a_fresh_process(tolerant, tmp_path):
    ids = tolerant.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps((tolerant, ids)))
    script = ("import pickle, sys; tok, ids = pickle.load(open(sys.argv[1], 'rb')); "
              "print(tok(['hi there'], return_tensors='pt').to('cuda')['input_ids'].tolist(), ids.cuda().tolist())")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{tolerant(['hi there'])['input_ids']} {ids.tolist()}"


@no_cuda_here
def test_hf_generate_takes_the_tolerant_inputs(tokenizer_dir, plain, tolerant, fresh_warning):
    model = transformers.AutoModelForCausalLM.from_pretrained(tokenizer_dir, dtype=torch.float32)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=plain.eos_token_id)
    expected = model.generate(**plain(["hi there"], return_tensors="pt"), **settings)

    inputs = tolerant(["hi there"], return_tensors="pt").to("cuda")
    out = model.generate(**inputs, **settings)
    assert type(out) is torch.Tensor and out.tolist() == expected.tolist()
    out = model.generate(input_ids=inputs.input_ids.to("cuda"), attention_mask=inputs.attention_mask, **settings)
    assert out.tolist() == expected.tolist()
    out = model.generate(**tolerant(["hi there"], return_tensors="pt").to(model.device), **settings)
    assert out.tolist() == expected.tolist()

    chat = dict(add_generation_prompt=True, return_tensors="pt")
    expected_chat = model.generate(plain.apply_chat_template(MESSAGES, return_dict=False, **chat), **settings)
    input_ids = tolerant.apply_chat_template(MESSAGES, return_dict=False, **chat)
    assert model.generate(input_ids=input_ids.to("cuda"), **settings).tolist() == expected_chat.tolist()
    assert model.generate(input_ids, **settings).tolist() == expected_chat.tolist()  # not moved at all
    assert model.generate(**tolerant.apply_chat_template(MESSAGES, **chat).to("cuda"), **settings).tolist() == \
        expected_chat.tolist()


def test_left_unchanged_where_cuda_is_available_or_not_a_tokenizer(tokenizer_dir, monkeypatch):
    monkeypatch.setattr(tokenizer_compat, "_cuda_available", lambda: True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    plain_class = type(tokenizer)
    assert device_tolerant(tokenizer) is tokenizer and type(tokenizer) is plain_class
    assert not isinstance(tokenizer, DeviceTolerantTokenizer)
    monkeypatch.setattr(tokenizer_compat, "_cuda_available", lambda: False)
    assert device_tolerant(None) is None
    not_a_tokenizer = object()
    assert device_tolerant(not_a_tokenizer) is not_a_tokenizer


def test_left_unchanged_without_torch(tokenizer_dir, monkeypatch):
    monkeypatch.setattr(tokenizer_compat, "_torch_installed", lambda: False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    plain_class = type(tokenizer)
    assert device_tolerant(tokenizer) is tokenizer and type(tokenizer) is plain_class
