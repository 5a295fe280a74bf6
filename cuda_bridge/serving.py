"""The torch engine of ``macft serve`` (the bridge's ``macft.mlx.serving``): continuous batching
over a transformers model, every loaded adapter served in the same batch.

Multi-adapter layers: as on MLX (see macft.mlx.serving), each adapted linear layer holds every
adapter's factors stacked by slot (macft.serve.adapters), and a batch row with slot k computes

    LoRA:  y = W x + b + s_k (x A_k) B_k
    DoRA:  y = g_k * (W x + s_k (x A_k) B_k) + b,   g_k = m_k / ||W + s_k B_k^T A_k^T||_row

with one batched matmul per factor (``torch.bmm`` on the rows' gathered factors): the arithmetic of
cuda_bridge.lora.LoRALinear for that adapter alone, to float rounding (that layer adds the scaled
update inside its GEMM, ``torch.addmm``, which a per-row scale cannot).

Batching: each request's whole prompt is prefilled alone into a DynamicCache and its first token
sampled from the last logits (as cuda_bridge.generate does); the new rows are then left-padded to
the running batch's length and concatenated, with a 2-D attention mask marking padding and
per-row position ids; finished rows are dropped with index_select and the all-padding columns
at the front trimmed. With chunked prefill the scheduler hands a long prompt over in chunks
(``TorchEngine.prefill``), each one forward pass on the request's own DynamicCache at the
chunk's positions; ``add`` runs the last chunk and samples the first token.
"""

import os
from dataclasses import dataclass

import torch
from torch import nn

from macft.errors import ModelLoadError
from macft.serve.engine import Engine, EngineRequest


class _Router:
    def __init__(self):
        self.rows = None  # (B,) long tensor: the slot of each batch row


class MultiAdapterLinear(nn.Module):
    def __init__(self, linear, router: _Router):
        super().__init__()
        self.linear = linear
        self._router = router
        self.groups = None  # per distinct rank: (A (S, in, r), B (S, r, out), s (S,)); see macft.serve.adapters
        self.dora_g = self.is_dora = None

    @property
    def dims(self) -> tuple[int, int]:
        return self.linear.in_features, self.linear.out_features

    def forward(self, x):
        y = self.linear(x)
        if self.groups is None:
            return y
        rows = self._router.rows
        sz = None
        for a, b, scales in self.groups:  # a row gets zeros from every group but its own: adding them is exact
            z = torch.bmm(torch.bmm(x.to(a.dtype), a[rows]), b[rows])
            part = (scales[rows][:, None, None] * z).to(x.dtype)
            sz = part if sz is None else sz + part
        lora = y + sz
        if self.dora_g is None:
            return lora
        from cuda_bridge.lora import _matmul_without_bias

        dora = self.dora_g[rows][:, None, :].to(x.dtype) * (_matmul_without_bias(self.linear, x) + sz)
        bias = getattr(self.linear, "bias", None)
        if bias is not None:
            dora = dora + bias.to(dora.dtype)
        return torch.where(self.is_dora[rows][:, None, None], dora, lora)


class AdapterBank:
    def __init__(self, model):
        from macft.serve.adapters import AdapterSet

        self.model = model
        self.router = _Router()
        self.set = AdapterSet()
        self.layers: dict[str, MultiAdapterLinear] = {}
        self.device = next(model.parameters()).device

    def slot(self, name):
        return self.set.slot(name)

    def set_rows(self, slots):
        self.router.rows = torch.tensor(slots, dtype=torch.long, device=self.device)

    def load(self, name, path):
        from cuda_bridge.lora import _is_linear

        modules = dict(self.model.named_modules())

        def layer_dims(module_path):
            layer = self.layers.get(module_path) or modules.get(module_path)
            if isinstance(layer, MultiAdapterLinear):
                return layer.dims
            if layer is not None and _is_linear(layer):
                return layer.in_features, layer.out_features
            return None

        adapter = self.set.add(name, path, layer_dims)
        for module_path in adapter.modules:
            if module_path not in self.layers:
                parent_name, _, leaf = module_path.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                layer = MultiAdapterLinear(getattr(parent, leaf), self.router)
                setattr(parent, leaf, layer)
                self.layers[module_path] = layer
        try:
            self._restack()
        except Exception:
            self.set.remove(name)
            self._restack()
            raise

    def unload(self, name):
        self.set.remove(name)
        self._restack()

    @torch.no_grad()
    def _restack(self):
        from cuda_bridge.lora import base_weight

        for module_path, layer in self.layers.items():
            stack = self.set.stack(module_path, *layer.dims)
            if stack is None:
                layer.groups = layer.dora_g = layer.is_dora = None
                continue
            layer.groups = [tuple(torch.from_numpy(t).to(self.device) for t in group) for group in stack.groups]
            num_slots = self.set.num_slots
            if stack.dora:
                weight = base_weight(layer.linear).float()
                rows = []
                for s in range(num_slots):
                    if s not in stack.dora:
                        rows.append(torch.ones(weight.shape[0], device=self.device))
                        continue
                    lora_a, lora_b, m, scale = (torch.from_numpy(t).to(self.device) if not isinstance(t, float)
                                                else t for t in stack.dora[s])
                    # cuda_bridge.lora.LoRALinear: m / (W.float() + (s B^T) A^T).norm(dim=1)
                    rows.append(m / (weight + (scale * lora_b.t()) @ lora_a.t()).norm(dim=1))
                layer.dora_g = torch.stack(rows)
                layer.is_dora = torch.tensor([s in stack.dora for s in range(num_slots)], device=self.device)
            else:
                layer.dora_g = layer.is_dora = None


@dataclass
class _Prefill:
    """A prompt partly through the model (chunked prefill), not in the batch yet."""
    cache: object  # DynamicCache of one row
    done: int = 0  # prompt tokens in the cache


@dataclass
class _Row:
    id: int
    slot: int
    next_input: int
    position: int  # position id of next_input
    temperature: float
    top_p: float
    top_k: int
    generator: object  # torch.Generator of a sampled row


class TorchEngine(Engine):
    """``macft serve`` on the bridge: one transformers model, any number of adapters, one batch."""

    def __init__(self, model=None, max_context: int | None = None, name: str | None = None):
        from cuda_bridge.generate import eos_token_ids
        from cuda_bridge.model import load_pretrained

        self.model, self.tokenizer = load_pretrained(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = next(self.model.parameters()).device
        self.eos_token_ids = set(eos_token_ids(self.model, self.tokenizer))
        config = self.model.config
        self.context_length = int(max_context or getattr(config, "max_position_embeddings", None) or 4096)
        self.vocab_size = int(config.vocab_size)
        if name:
            self.name = name
        elif model is None:
            from macft.default_model import DEFAULT_MODEL_NAME

            self.name = DEFAULT_MODEL_NAME
        else:
            self.name = str(model)
        self._check_cache()
        self.bank = AdapterBank(self.model)
        self.rows: list[_Row] = []
        self.cache = None  # DynamicCache of the batch
        self.mask = None  # (B, T) 1 for real tokens, 0 for left padding
        self.prefills: dict[int, _Prefill] = {}  # request id -> its prefill in progress

    def _check_cache(self):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", [])):
            raise ModelLoadError(f"{self.name}: sliding-window attention layers; macft serve batches models with a "
                                 f"plain KV cache only")

    def load_adapter(self, name, path):
        self.bank.load(name, path)

    def unload_adapter(self, name):
        self.bank.unload(name)

    @torch.inference_mode()
    def prefill(self, request: EngineRequest, end: int):
        from transformers import DynamicCache

        part = self.prefills.get(request.id)
        if part is None:
            part = self.prefills[request.id] = _Prefill(DynamicCache(config=self.model.config))
        self.bank.set_rows([self.bank.slot(request.adapter)])
        self._feed(request.prompt_ids, part, end)

    def _feed(self, prompt: list[int], part: _Prefill, end: int):
        """One forward pass of prompt[part.done:end] on the prefill's cache: the logits of its last token."""
        ids = torch.tensor([prompt[part.done:end]], device=self.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones((1, end), dtype=torch.long, device=self.device),
                         position_ids=torch.arange(part.done, end, device=self.device)[None],
                         past_key_values=part.cache, use_cache=True, logits_to_keep=1)
        part.cache, part.done = out.past_key_values, end
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def add(self, requests: list[EngineRequest]) -> dict[int, int]:
        from transformers import DynamicCache

        marks = {req.id: self.prefills[req.id].done for req in requests if req.id in self.prefills}
        prefilled, rows, first = [], [], {}
        try:
            for req in requests:
                slot = self.bank.slot(req.adapter)
                part = self.prefills.get(req.id) or _Prefill(DynamicCache(config=self.model.config))
                self.bank.set_rows([slot])
                logits = self._feed(req.prompt_ids, part, len(req.prompt_ids))
                s = req.sampling
                generator = None
                if s.temperature > 0:
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed(s.seed % 2**63 if s.seed is not None
                                          else int.from_bytes(os.urandom(8), "little") >> 1)
                row = _Row(id=req.id, slot=slot, next_input=0, position=len(req.prompt_ids),
                           temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, generator=generator)
                token = self._sample(logits, [row])[0]
                row.next_input = token
                first[req.id] = token
                prefilled.append(part.cache)
                rows.append(row)
            self._merge(prefilled)
        except BaseException:
            self._rewind(marks)  # the prefills in progress stay as they were (see Engine.add)
            raise
        for req in requests:
            self.prefills.pop(req.id, None)
        self.rows += rows
        return first

    def _rewind(self, marks: dict[int, int]):
        """Put prefills in progress back to ``marks`` (request id -> prompt tokens done)."""
        for rid, done in marks.items():
            part = self.prefills[rid]
            part.cache.crop(done)
            part.done = done

    def _merge(self, caches):
        """Append the new rows' caches (one row each) to the batch's, left-padded to one length."""
        from transformers import DynamicCache

        num_layers = len(caches[0].layers)
        parts = []  # per source: ([(keys, values) per layer], mask)
        if self.cache is not None:
            parts.append(([(l.keys, l.values) for l in self.cache.layers], self.mask))
        for c in caches:
            kv = [(l.keys, l.values) for l in c.layers]
            parts.append((kv, torch.ones((1, kv[0][0].shape[-2]), dtype=torch.long, device=self.device)))
        length = max(mask.shape[1] for _, mask in parts)
        merged = DynamicCache(config=self.model.config)
        for i in range(num_layers):
            keys = torch.cat([_left_pad(kv[i][0], length) for kv, _ in parts])
            values = torch.cat([_left_pad(kv[i][1], length) for kv, _ in parts])
            layer = merged.layers[i]
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        self.mask = torch.cat([nn.functional.pad(mask, (length - mask.shape[1], 0)) for _, mask in parts])
        self.cache = merged

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        if not self.rows:
            return {}
        self.bank.set_rows([r.slot for r in self.rows])
        ids = torch.tensor([[r.next_input] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True)
        self.cache = out.past_key_values
        tokens = self._sample(out.logits[:, -1, :], self.rows)
        for row, token in zip(self.rows, tokens):
            row.next_input = token
            row.position += 1
        return {row.id: token for row, token in zip(self.rows, tokens)}

    def _sample(self, logits, rows) -> list[int]:
        """Greedy rows as cuda_bridge.sampling.sample_tokens; sampled rows with their own generator
        and Gumbel-max, so a seeded row draws the same tokens in any batch (macft.mlx.serving.gumbel_max)."""
        from cuda_bridge.sampling import apply_top_k, apply_top_p

        logprobs = logits.float().log_softmax(-1)
        tokens = logprobs.argmax(-1)
        for i, row in enumerate(rows):
            if row.temperature <= 0:
                continue
            lp = logprobs[i:i + 1]
            if 0 < row.top_p < 1.0:
                lp = apply_top_p(lp, row.top_p)
            if row.top_k > 0:
                lp = apply_top_k(lp, row.top_k)
            u = torch.rand(lp.shape, generator=row.generator, device=lp.device).clamp_(min=1e-20, max=1 - 1e-7)
            tokens[i] = (lp / row.temperature - torch.log(-torch.log(u))).argmax(-1)[0]
        return tokens.tolist()

    def remove(self, ids):
        ids = set(ids)
        for rid in ids:
            self.prefills.pop(rid, None)
        keep = [i for i, r in enumerate(self.rows) if r.id not in ids]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        start = int(mask.any(0).nonzero()[0])  # the columns before it are padding in every row left
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.mask = mask[:, start:]
        self.rows = [self.rows[i] for i in keep]


def _left_pad(t, length: int):
    """(B, H, T, D) -> (B, H, length, D), zeros in front."""
    return nn.functional.pad(t, (0, 0, length - t.shape[-2], 0))
