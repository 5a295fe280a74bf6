"""Gradient checkpointing through cuda_bridge.checkpoint, plain and offloaded (cuda_bridge.offload):
the loss and every LoRA gradient equal those of torch's own checkpointing (torch.utils.checkpoint,
as transformers sets it up) bit for bit and those without checkpointing, over two steps of padded
batches; the recomputation reads the host copies, the inputs come back prefetched but for the
last block's, and nothing outlives a step. On a CPU the copies are plain CPU copies; on a GPU
(`pytest -m gpu`) the peak memory drops by the blocks' inputs."""

import pytest
import torch

from cuda_bridge.checkpoint import BlockCheckpoint, installed
from cuda_bridge.lora import decoder_layers, enable_gradient_checkpointing, enable_transformers_checkpointing
from cuda_bridge.logps import sequence_logps
from cuda_bridge.model import add_adapters, load_pretrained
from cuda_bridge.offload import OffloadedInput, checkpoint_offloader, offload_checkpointed_inputs

MODES = ("none", "torch", "plain", "offload")


def random_model_dir(path, arch="llama", hidden=64, layers=4, vocab=512, heads=4):
    """A random HF model dir with a word-level tokenizer ("w0 w17 ..."): no downloaded model needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads // 2, initializer_range=0.1, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    config = (Qwen3Config(head_dim=hidden // heads, tie_word_embeddings=True, **common) if arch == "qwen3"
              else LlamaConfig(tie_word_embeddings=False, **common))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def lora_model(path, mode, dropout=0.0, num_layers=None, load_in_4bit=False):
    """The model with LoRA on every projection (B moved off 0, so the adapters shape the forward)
    and checkpointing as ``mode`` says; returns (model, offloader or None)."""
    model, _ = load_pretrained(str(path), load_in_4bit=load_in_4bit)
    add_adapters(model, r=4, lora_alpha=8, lora_dropout=dropout, num_layers=num_layers, random_state=0)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    offloader = None
    if mode == "torch":
        enable_transformers_checkpointing(model)  # as transformers sets it up (its name differs by version)
        assert installed(model) is None
    elif mode != "none":
        enable_gradient_checkpointing(model, offload=mode == "offload")
        offloader = checkpoint_offloader(model)
        if mode == "offload" and offloader is None:  # a CPU model: nothing to free, the same logic runs
            offloader = offload_checkpointed_inputs(model)
    model.train()
    return model, offloader


def padded_batch(rows, width, lengths, vocab, seed, device="cpu"):
    ids = torch.randint(3, vocab, (rows, width), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return (ids * mask).to(device), mask.to(device)  # right-padded with id 0


def masked_nll(model, ids, mask):
    logps = sequence_logps(model, ids, attention_mask=mask)
    targets = mask[:, 1:].to(logps.dtype)
    return -(logps * targets).sum() / targets.sum()


def train_step(model, ids, mask, learning_rate=0.5):
    """Loss and gradients of one step, then a plain SGD update (so the next step's weights differ)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    loss = masked_nll(model, ids, mask)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p -= learning_rate * p.grad
    return loss.detach(), grads


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    made = {}

    def make(arch):
        if arch not in made:
            made[arch] = random_model_dir(tmp_path_factory.mktemp(f"offload-{arch}"), arch)
        return made[arch]

    return make


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_offloaded_checkpointing_gives_the_same_loss_and_gradients(model_dirs, monkeypatch, arch):
    monkeypatch.setenv("MACFT_KERNELS", "reference")  # the Triton kernels under the CPU interpreter: minutes
    path = model_dirs(arch)
    models = {mode: lora_model(path, mode) for mode in MODES}
    layers = len(decoder_layers(models["none"][0]))
    offloader = models["offload"][1]
    batches = [padded_batch(3, 20, [20, 13, 7], 512, seed=2), padded_batch(2, 28, [9, 28], 512, seed=3)]
    for step, (ids, mask) in enumerate(batches):
        results = {mode: train_step(models[mode][0], ids, mask) for mode in MODES}
        (loss, grads), (torch_loss, torch_grads), (plain_loss, plain_grads), (offload_loss, offload_grads) = (
            results[m] for m in MODES)
        assert len(grads) == layers * 7 * 2  # lora_a and lora_b of the seven projections of every block
        assert torch.equal(plain_loss, torch_loss) and torch.equal(offload_loss, plain_loss), step
        torch.testing.assert_close(plain_loss, loss, rtol=1e-6, atol=1e-6)
        assert max(g.abs().max().item() for g in grads.values()) > 1e-3
        for name, grad in grads.items():
            assert torch.equal(plain_grads[name], torch_grads[name]), (step, name)
            assert torch.equal(offload_grads[name], plain_grads[name]), (step, name)
            torch.testing.assert_close(plain_grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
        # Every block's input but the first's (a leaf: see cuda_bridge.offload) went out and came back;
        # all but the last block's came back prefetched.
        done = step + 1
        assert (offloader.offloaded, offloader.restored_prefetched, offloader.restored_on_demand) == (
            (layers - 1) * done, (layers - 2) * done, done)
        # The step's graph is gone, and with it every host copy: nothing chains into the next step.
        assert offloader._last_offloaded() is None


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["float", "4bit"])
def test_recomputing_a_block_skips_the_down_projection_whose_output_only_the_residual_reads(
        model_dirs, monkeypatch, load_in_4bit):
    """With the kernels on (Triton; interpreted on a CPU), a block recomputed for its backward runs
    its MLP without the down projection's product, nor the activation before it (the backward makes
    it): only its gradient is wanted there. The loss and gradients are bit for bit those of the same
    checkpointing computing it ("full": no layer class listed as summing its MLP into the residual),
    and torch's checkpointing's to rounding. The first forward, without a graph, takes the fused MLP
    Function as the recomputation does."""
    from cuda_bridge import patching
    from cuda_bridge.kernels import lora_mlp
    from cuda_bridge.kernels.lora_mlp import LoRAMLPFunction

    monkeypatch.delenv("MACFT_KERNELS", raising=False)
    fused = []  # one entry a LoRAMLPFunction forward: the first forward and the recomputation alike
    forward = LoRAMLPFunction.forward
    monkeypatch.setattr(LoRAMLPFunction, "forward", staticmethod(lambda *a: fused.append(1) or forward(*a)))
    activations = []  # one entry a launch of the fused MLP's forward activation kernel
    glu = lora_mlp._glu
    monkeypatch.setattr(lora_mlp, "_glu", lambda *a: activations.append(1) or glu(*a))
    ids, mask = padded_batch(2, 12, [12, 9], 512, seed=4)
    results, products, launches = {}, {}, {}
    modes = ("full", "plain") if load_in_4bit else ("torch", "full", "plain", "offload")  # 4-bit: slow interpreted
    for mode in modes:
        with monkeypatch.context() as patch:
            if mode == "full":
                patch.setattr(patching, "_LAYERS_SUMMING_MLP", ())
            model = lora_model(model_dirs("llama"), "plain" if mode == "full" else mode, load_in_4bit=load_in_4bit)[0]
            downs = []  # one entry a product of a down projection's base layer
            for layer in decoder_layers(model):
                assert (type(layer.mlp.down_proj.linear).__name__ == "QuantizedLinear") == load_in_4bit
                layer.mlp.down_proj.linear.register_forward_hook(lambda *_: downs.append(1))
            fused.clear()
            activations.clear()
            results[mode] = train_step(model, ids, mask)
            products[mode] = len(downs) / len(decoder_layers(model))
            assert len(fused) == 2 * len(decoder_layers(model)), mode
            launches[mode] = len(activations) / len(decoder_layers(model))
    # A product a block in the forward, a second in the recomputation but for the skipping ones, whose
    # backward makes the activation itself
    assert products == {mode: 2 if mode in ("torch", "full") else 1 for mode in modes}
    assert launches == products
    for mode in set(modes) & {"plain", "offload"}:
        assert torch.equal(results[mode][0], results["full"][0]), mode
        for name, grad in results["full"][1].items():
            assert grad.abs().max() > 0 and torch.equal(results[mode][1][name], grad), (mode, name)
            if "torch" in results:
                torch.testing.assert_close(grad, results["torch"][1][name], rtol=1e-5, atol=1e-6)
        if "torch" in results:
            torch.testing.assert_close(results[mode][0], results["torch"][0], rtol=1e-6, atol=1e-6)


def test_recomputed_blocks_draw_the_same_dropout_as_torch_checkpointing(model_dirs, monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    ids, mask = padded_batch(3, 16, [16, 11, 5], 512, seed=7)
    path = model_dirs("llama")  # first: writing the model seeds torch's RNG (run alone, the test made it here)
    results = {}
    for mode in ("torch", "plain", "offload"):
        torch.manual_seed(123)  # the dropout masks of the forward
        results[mode] = train_step(lora_model(path, mode, dropout=0.3)[0], ids, mask)
    torch.manual_seed(123)
    undropped = train_step(lora_model(path, "plain")[0], ids, mask)
    for mode in ("plain", "offload"):
        assert torch.equal(results[mode][0], results["torch"][0]), mode
        for name, grad in results["torch"][1].items():
            assert torch.equal(results[mode][1][name], grad), (mode, name)
    assert not torch.equal(results["plain"][0], undropped[0])  # the dropout did drop


def test_frozen_blocks_and_a_frozen_first_input_still_train_the_adapted_blocks(model_dirs, monkeypatch):
    """Adapters on the last two of four blocks: the first two have nothing to train and inputs that
    take no gradient; the adapted blocks still get torch checkpointing's gradients."""
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    ids, mask = padded_batch(2, 12, [12, 9], 512, seed=8)
    _, expected = train_step(lora_model(model_dirs("llama"), "torch", num_layers=2)[0], ids, mask)
    _, grads = train_step(lora_model(model_dirs("llama"), "plain", num_layers=2)[0], ids, mask)
    assert sorted(grads) == sorted(expected) and len(grads) == 2 * 7 * 2
    for name, grad in expected.items():
        assert grad.abs().max() > 0 and torch.equal(grads[name], grad), name


def test_a_block_whose_input_takes_no_gradient_still_trains_its_weights():
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)  # as a frozen embedding's output
    torch.tanh(x @ weight).square().sum().backward()
    expected, weight.grad = weight.grad, None
    BlockCheckpoint()(lambda h: torch.tanh(h @ weight), x).square().sum().backward()
    assert torch.equal(weight.grad, expected)


def test_inputs_leave_after_the_forward_and_come_back_from_the_host_copies_one_block_ahead(model_dirs, monkeypatch):
    import weakref

    monkeypatch.setenv("MACFT_KERNELS", "reference")
    ids, mask = padded_batch(2, 16, [16, 10], 512, seed=4)
    _, plain_grads = train_step(lora_model(model_dirs("llama"), "plain")[0], ids, mask)
    model, offloader = lora_model(model_dirs("llama"), "offload")
    handles, restored, alive_at_restore = [], [], []
    pack, unpack = offloader.pack, offloader.unpack

    def recording_pack(tensor):
        packed = pack(tensor)
        if isinstance(packed, OffloadedInput):
            handles.append(packed)
        return packed

    def recording_unpack(handle):
        if not isinstance(handle, OffloadedInput):
            return unpack(handle)
        alive_at_restore.append(sum(r() is not None for r in restored))
        tensor = unpack(handle)
        restored.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(offloader, "pack", recording_pack)
    monkeypatch.setattr(offloader, "unpack", recording_unpack)
    loss = masked_nll(model, ids, mask)
    assert len(handles) == len(decoder_layers(model)) - 1
    assert all(h.source() is None for h in handles)  # the model let go of them: only the host copies remain
    for handle in handles:
        handle.host.zero_()  # what the blocks recompute from now
    loss.backward()
    # A block's input is dropped once its backward is done: never more than the one being
    # recomputed and the next one, prefetched (held by its handle), are alive.
    assert alive_at_restore == [0] * len(handles)
    assert sum(h.prefetched is not None for h in handles) == 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.grad, plain_grads[name]), name


def test_an_input_changed_in_place_after_the_forward_is_refused():
    from cuda_bridge.offload import CheckpointOffloader

    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True) * 1.0
    out = CheckpointOffloader()(lambda h: torch.tanh(h @ weight), x)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_unsloth_mode_offloads_on_cuda_and_is_plain_checkpointing_on_a_cpu(model_dirs, monkeypatch):
    import cuda_bridge.lora
    from cuda_bridge import FastLanguageModel

    monkeypatch.setenv("MACFT_KERNELS", "reference")
    path = str(model_dirs("llama"))
    ids, mask = padded_batch(2, 12, [12, 8], 512, seed=5)

    def peft_model(use_gradient_checkpointing):
        model, _ = FastLanguageModel.from_pretrained(path)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=use_gradient_checkpointing)
        model.train()
        masked_nll(model, ids, mask).backward()  # trains whatever the mode
        return model

    on_cpu = peft_model("unsloth")  # nothing to offload to: plain checkpointing, no error
    assert on_cpu.macft.gradient_checkpointing and on_cpu.is_activation_checkpointing
    assert checkpoint_offloader(on_cpu) is None
    assert checkpoint_offloader(peft_model(True)) is None
    assert not peft_model(False).is_activation_checkpointing

    # Where the model is on a GPU, "unsloth" (and only it) takes the offloaded path.
    monkeypatch.setattr(cuda_bridge.lora, "_on_gpu", lambda model: True)
    offloaded = peft_model("unsloth")
    assert checkpoint_offloader(offloaded).offloaded == len(decoder_layers(offloaded)) - 1
    assert checkpoint_offloader(peft_model(True)) is None
    enable_gradient_checkpointing(offloaded)  # plain checkpointing again undoes it
    assert checkpoint_offloader(offloaded) is None


def test_offloading_needs_checkpointing_on(model_dirs):
    model, _ = load_pretrained(str(model_dirs("llama")))
    with pytest.raises(ValueError, match="gradient checkpointing is off"):
        offload_checkpointed_inputs(model)


def test_bench_offload_flag_needs_grad_checkpoint():
    from typer.testing import CliRunner

    from macft.bench import bench_app

    result = CliRunner().invoke(bench_app, ["sft", "--backend", "cuda", "--offload-checkpoints"])
    assert result.exit_code != 0 and "--grad-checkpoint" in result.output, result.output


# ----------------------------------------------------------------------------- on a GPU (pytest -m gpu)


@pytest.mark.gpu
def test_gpu_offloading_lowers_the_peak_by_the_blocks_inputs(tmp_path, cuda, capsys):
    """bf16, Triton kernels, 16 blocks of hidden 1024, batch 4 x 1024: each block's input is
    4 x 1024 x 1024 x 2 bytes = 8 MiB; offloaded, the peak drops by at least 80% of 15 of them
    (13 to 15 expected: cuda_bridge.offload's arithmetic). Plain and offloaded train as torch's own
    checkpointing does, within its step-to-step noise, at its peak (within one block input)."""
    layers, hidden, rows, width = 16, 1024, 4, 1024
    path = random_model_dir(tmp_path / "model", "llama", hidden=hidden, layers=layers, vocab=4096, heads=8)
    ids, mask = padded_batch(rows, width, [width, width, width - 100, width // 2], 4096, seed=6, device=cuda)
    block_input_bytes = rows * width * hidden * 2

    def run(mode, steps):
        """Loss and flat gradients of each step (the weights stay put), and the second step's peak
        above what the first left allocated (kernels compiled, caching allocators filled)."""
        model, offloader = lora_model(path, mode)
        assert next(model.parameters()).dtype == torch.bfloat16
        params = [p for p in model.parameters() if p.requires_grad]
        results, peak = [], None
        for step in range(steps):
            if step == 1:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            for p in params:
                p.grad = None
            loss = masked_nll(model, ids, mask)
            loss.backward()
            torch.cuda.synchronize()
            if step == 1:
                peak = torch.cuda.max_memory_allocated() - base
            results.append((loss.detach(), torch.cat([p.grad.float().flatten() for p in params])))
        if offloader is not None:
            assert (offloader.offloaded, offloader.restored_on_demand) == (steps * (layers - 1), steps)
        del model, params
        torch.cuda.empty_cache()
        return results, peak

    (_, (plain_loss, plain_grads), (plain_loss_again, plain_grads_again)), plain_peak = run("plain", 3)
    (_, (offload_loss, offload_grads)), offload_peak = run("offload", 2)
    (_, (torch_loss, torch_grads)), torch_peak = run("torch", 2)
    saved = plain_peak - offload_peak
    with capsys.disabled():
        print(f"\n[gpu] offloaded checkpointing: peak {offload_peak / 2**20:.0f} MiB vs plain {plain_peak / 2**20:.0f} "
              f"MiB, {saved / 2**20:.0f} MiB saved = {saved / block_input_bytes:.1f} block inputs of "
              f"{block_input_bytes / 2**20:.0f} MiB; torch's checkpointing {torch_peak / 2**20:.0f} MiB")
    assert saved >= 0.8 * (layers - 1) * block_input_bytes
    assert plain_peak <= torch_peak + block_input_bytes  # the recomputation holds what torch's does
    # The same kernels on the same inputs: equal (bit for bit where the kernels are deterministic), up
    # to what plain checkpointing itself varies by from one step to the next (attention backward
    # kernels may accumulate in any order).
    loss_noise = (plain_loss_again - plain_loss).abs().item()
    assert (offload_loss - plain_loss).abs().item() <= 4 * loss_noise
    assert (torch_loss - plain_loss).abs().item() <= 4 * loss_noise
    noise = (plain_grads_again - plain_grads).norm().item()
    for grads in (offload_grads, torch_grads):
        assert (grads - plain_grads).norm().item() <= 4 * noise + 1e-6 * plain_grads.norm().item()
