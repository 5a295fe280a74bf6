"""Fixtures of the server tests: a tiny qwen2 (biased q/k/v projections), three adapters of
different kinds, ranks and targets, and one real server on a free loopback port."""

import pytest

API_KEY = "test-key-123"


def make_adapter(base_dir, out_dir, *, r, alpha, targets=None, num_layers=None, dora=False, seed=0):
    """An adapter whose weights are random (B is perturbed away from zero so it changes the
    answers; DoRA's magnitudes too), saved with macft's own save_adapter."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from macft import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(base_dir))
    FastLanguageModel.get_peft_model(model, r=r, lora_alpha=alpha, target_modules=targets, num_layers=num_layers,
                                     use_dora=dora, use_gradient_checkpointing=False, random_state=seed)
    mx.random.seed(seed + 100)
    weights = []
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            value = 0.4 * mx.random.normal(value.shape)
        elif name.endswith(".m"):
            value = value * (1 + 0.3 * mx.random.uniform(-1, 1, value.shape))
        weights.append((name, value))
    model.load_weights(weights, strict=False)
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def serve_base(tiny_model_dir):
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def serve_adapters(serve_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    return {
        "lora8": make_adapter(serve_base, root / "lora8", r=8, alpha=16, seed=1),
        # another rank, two targets, last layer only, a scale that is not a power of two
        "qv4": make_adapter(serve_base, root / "qv4", r=4, alpha=12, targets=["q_proj", "v_proj"], num_layers=1,
                            seed=2),
        "dora": make_adapter(serve_base, root / "dora", r=4, alpha=8, dora=True, seed=3),
    }


@pytest.fixture(scope="session")
def server(serve_base, serve_adapters):
    from macft.serve.cli import start

    handle = start(str(serve_base), {k: str(v) for k, v in serve_adapters.items()}, api_key=API_KEY,
                   max_concurrency=32, max_tokens_default=16)
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def base_name(serve_base):
    return str(serve_base)
