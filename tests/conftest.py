"""Shared fixtures: the embedded SmolLM2 model and tiny random models of several architectures.

Tiny models use initializer_range=0.1 (HF default 0.02) so that their logits are not all but
uniform: a few LoRA steps then move the loss measurably.

Everything runs offline (HF_HUB_OFFLINE=1). Tiny models are real transformers models with
random weights (2 layers, hidden 64) and SmolLM2's real tokenizer, saved as HF directories.
"""

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A test worker of several (README: -n 2 on CI's two cores) takes its share of the cores for BLAS and
# torch: two threads a worker oversubscribe them and spin (measured on CI's machine: 13-21% more wall
# time, 3x the system time). Set before OpenBLAS and torch load, and inherited by the subprocesses
# (command-line runs, ranks); a value set outside is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, str(_THREADS))
import macft  # noqa: E402  (loads OpenBLAS before any test imports mlx.core or torch, as `python -m macft` does)

if "TRITON_INTERPRET" not in os.environ:
    # Without a GPU the Triton kernels run under Triton's interpreter. Triton reads this when it is
    # first imported (transformers and peft may import it long before a kernel test runs), so it is
    # decided here, before any test module loads.
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

TINY_ARCHS = ("llama", "qwen2", "qwen3", "gemma", "mistral", "phi3")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json")


def pytest_collection_modifyitems(items):
    """The files holding end-to-end (``slow``) tests run first, in collection order otherwise. Under
    ``--dist loadfile`` a whole file runs on one worker, and files are handed out in this order:
    a long file handed out last would leave one worker alone on it at the end, the other core idle."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: each file's tests stay together


_DEFAULT_BLAS_THREADS = None


@pytest.fixture(autouse=True)
def blas_threads_for_the_backend(request):
    """One OpenBLAS thread while a bridge (torch) test runs, as cuda_bridge asks for in a torch-only
    process (macft.openblas: OpenBLAS's threads and torch's contend, ~50x slower attention); the
    default for everything else, where MLX's matmuls use every core the worker has (see the top).
    The thread count changes OpenBLAS's rounding on some CPUs (AMD EPYC), so a bridge run in-process
    (a ``[cuda]`` case) gets the one thread its subprocesses get, for their results to be compared
    bit for bit."""
    global _DEFAULT_BLAS_THREADS
    from macft.openblas import set_openblas_threads

    nodeid = request.node.nodeid
    torch_test = "cuda_bridge" in nodeid or "torch" in nodeid or "[cuda" in nodeid
    previous = set_openblas_threads(1 if torch_test else (_DEFAULT_BLAS_THREADS or os.cpu_count()))
    if _DEFAULT_BLAS_THREADS is None:
        _DEFAULT_BLAS_THREADS = previous
    yield


@pytest.fixture(scope="session")
def smollm2_hf_dir():
    """SmolLM2-135M-Instruct as an HF directory (float32), materialized from the embedded GGUF."""
    from macft.default_model import default_model_dir

    return default_model_dir("hf")


@pytest.fixture(scope="session")
def smollm2_mlx_dir():
    """SmolLM2-135M-Instruct as an MLX directory (float32)."""
    from macft.default_model import default_model_dir

    return default_model_dir("mlx")


def _tiny_config(arch: str, vocab_size: int, bos: int, eos: int):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, initializer_range=0.1, bos_token_id=bos, eos_token_id=eos,
                  tie_word_embeddings=arch in ("gemma", "qwen3"))
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    if arch == "gemma":
        return transformers.GemmaConfig(head_dim=16, **common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    if arch == "phi3":
        return transformers.Phi3Config(pad_token_id=0, **common)
    raise ValueError(arch)


def _add_top_level_rope_theta(config_path):
    """transformers 5 nests rope_theta under rope_parameters; configs on the hub (and the
    loaders users have, mlx_lm among them) have it at the top level, as transformers 4 wrote it."""
    import json

    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(request):
    """The tiny models' tokenizer: SmolLM2's, from the embedded model; on a GPU host without that
    package, the tokenizer directory named by MACFT_TEST_TOKENIZER (`pytest -m gpu` there)."""
    override = os.environ.get("MACFT_TEST_TOKENIZER")
    return Path(override) if override else request.getfixturevalue("smollm2_hf_dir")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Factory: tiny_model_dir("qwen2") -> path of an HF dir with random weights (seeded)."""
    made = {}

    def make(arch: str):
        if arch in made:
            return made[arch]
        import torch
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
        config = _tiny_config(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(path, safe_serialization=True)
        _add_top_level_rope_theta(path / "config.json")
        for name in _TOKENIZER_FILES:
            if (tiny_tokenizer_dir / name).exists() and not (path / name).exists():
                shutil.copy(tiny_tokenizer_dir / name, path / name)
        made[arch] = path
        return path

    return make


_SMALL_VOCAB_CORPUS = (
    "The quick brown fox jumps over the lazy dog, and then it sleeps. A small tokenizer learns its merges "
    "from this paragraph. Foxes and dogs sleep in the shade; the keeper writes the weather in a notebook "
    "every morning, and the sea wind carries salt.")


@pytest.fixture(scope="session")
def small_vocab_model_dir(tmp_path_factory):
    """Factory: small_vocab_model_dir("llama" | "qwen2") -> a tiny random HF model whose tokenizer is a
    400-token byte-level BPE trained here (with <|im_start|>/<|im_end|> specials). For GGUF files,
    which every reader parses token by token: SmolLM2's 49k tokens take seconds each time."""
    made = {}

    def make(arch: str):
        if arch in made:
            return made[arch]
        import torch
        import transformers
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.train_from_iterator([_SMALL_VOCAB_CORPUS], trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                                         eos_token="<|im_end|>", unk_token="<|endoftext|>")
        config = _tiny_config(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"small-vocab-{arch}")
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
        _add_top_level_rope_theta(path / "config.json")
        tokenizer.save_pretrained(path)
        made[arch] = path
        return path

    return make
