"""DecoderStack-medium's GPT (nanochat's) for transformers (AutoModelForCausalLM with trust_remote_code=True), copied
by export.py beside the weights it exported from decoderstack_medium_pt-eval-sft.py. It computes what that stack's
GPT.hidden and GPT.logits compute (the same parameter names, so its state dict loads as it is) on one document per
row: position 0 and no previous token at a row's first token, as the stack's Engine decodes a prompt. Rows are not
padded: a batch is rows of equal length, and an attention_mask, if given, must be all ones. tests/test_medium.py
holds it to the stack logit by logit.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

GATE_DIMS = 12  # the value-embedding gates read the first 12 dims of their block's input
SMEAR_DIMS = 24  # the smear gate reads the first 24 of the normed embedding


class DecoderStackMediumConfig(PretrainedConfig):
    """The medium stack's ModelConfig (state.json "model"), field for field, plus the special ids generate needs."""
    model_type = "decoderstack_medium"
    attribute_map = {"num_hidden_layers": "n_layers", "hidden_size": "model_dim", "num_attention_heads": "n_heads"}

    vocab_size: int = 32768
    n_layers: int = 24
    model_dim: int = 1536
    n_heads: int = 12
    head_dim: int = 128
    mlp_mult: int = 4
    vocab_multiple: int = 64
    window_pattern: str = "SSSL"
    rope_base: float = 100000.0
    qk_scale: float = 1.2
    softcap: list | tuple = (30.0, 0.0, 7.5)
    short_window: int = 768
    long_window: int = 2048
    max_doc_len: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False


def norm(x):
    """RMS norm computed in fp32, returned in x's dtype."""
    return F.rms_norm(x.float(), (x.size(-1),)).to(x.dtype)


def softcap(logits, cap):
    """The logits the model predicts with (fp32): A * sigmoid((z + B) / C) (nanochat's 15 tanh(z / 15), plus 15)."""
    a, b, c = cap
    return a * torch.sigmoid((logits.float() + b) / c)


class Rotary(nn.Module):
    """RoPE on every dim: dim i turns with dim i + D/2 at base^(-2i/D) radians per token. The frequencies are computed
    per call in fp32 (not a buffer: transformers builds models on the meta device, where a buffer's values are lost)."""

    def __init__(self, head_dim, base):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, x, positions):
        freqs = self.base ** -(torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=x.device) / self.head_dim)
        angles = positions.float()[..., None] * freqs
        cos, sin = angles.cos()[..., None, :].to(x.dtype), angles.sin()[..., None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, config, layer_idx, has_value_embed):
        super().__init__()
        inner, dim = config.n_heads * config.head_dim, config.model_dim
        self.layer_idx, self.n_heads, self.head_dim = layer_idx, config.n_heads, config.head_dim
        self.q, self.k, self.v = (nn.Parameter(torch.zeros(inner, dim)) for _ in range(3))
        self.o = nn.Parameter(torch.zeros(dim, inner))
        self.fc = nn.Parameter(torch.zeros(config.mlp_mult * dim, dim))
        self.proj = nn.Parameter(torch.zeros(dim, config.mlp_mult * dim))
        self.ve_gate = nn.Parameter(torch.zeros(config.n_heads, GATE_DIMS)) if has_value_embed else None

    def forward(self, x, ve, rotary, positions, scale, window, cache):
        """x: (B, S, dim) new tokens at `positions` (B, S); cache: a transformers Cache holding the earlier ones, or
        None. A query at position i sees the keys at positions j with 0 <= i - j <= window (the stack's mask)."""
        h = norm(x)
        heads = (*x.shape[:-1], self.n_heads, self.head_dim)
        q, k, v = (h @ self.q.T).view(heads), (h @ self.k.T).view(heads), (h @ self.v.T).view(heads)
        if ve is not None:
            v = v + 3 * torch.sigmoid(h[..., :GATE_DIMS] @ self.ve_gate.T)[..., None] * ve.view_as(v)
        q, k = norm(rotary(q, positions)), norm(rotary(k, positions))  # rotate, then QK-norm
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D): the layout of transformers' caches
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        gap = positions[:, None, :, None] - torch.arange(k.size(2), device=x.device)  # query minus key position
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=(gap >= 0) & (gap <= window), scale=scale)
        x = x + y.transpose(1, 2).flatten(-2) @ self.o.T
        return x + torch.relu(norm(x) @ self.fc.T).square() @ self.proj.T


class DecoderStackMediumForCausalLM(PreTrainedModel, GenerationMixin):
    """nanochat's GPT as the medium stack trains it: normed embedding with smear, x0 and residual lambdas, value
    embeddings with gates on alternating layers, QK-norm, RoPE, SSSL sliding windows, relu^2 MLP, backout of the middle
    layer, untied lm_head, softcapped logits over vocab_size (the tables have padded rows no id reaches).
    Activations are in the weights' dtype; norms, RoPE angles and logits are fp32.

    forward(input_ids (B, S), cache=None, last_ids=None, ...): with a cache holding a row's first n tokens, input_ids
    are its tokens n, n+1, ...; last_ids (B,) are the tokens before them (token n-1), which the smear reads.
    generate passes them itself (prepare_inputs_for_generation); they are needed whenever the cache is not empty."""
    config_class = DecoderStackMediumConfig
    base_model_prefix = ""
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        padded = -(-config.vocab_size // config.vocab_multiple) * config.vocab_multiple
        dim, L, inner = config.model_dim, config.n_layers, config.n_heads * config.head_dim
        self.value_embed_layers = [i for i in range(L) if i % 2 == (L - 1) % 2]
        pattern = config.window_pattern
        self.windows = [config.long_window if pattern[i % len(pattern)] == "L" or i == L - 1 else config.short_window
                        for i in range(L)]
        self.blocks = nn.ModuleList(Block(config, i, i in self.value_embed_layers) for i in range(L))
        self.embed = nn.Parameter(torch.zeros(padded, dim))
        self.lm_head = nn.Parameter(torch.zeros(padded, dim))
        self.value_embeds = nn.Parameter(torch.zeros(len(self.value_embed_layers), padded, inner))
        self.resid_lambdas = nn.Parameter(torch.zeros(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Parameter(torch.zeros(SMEAR_DIMS))
        self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.backout_lambda = nn.Parameter(torch.zeros(()))
        self.rotary = Rotary(config.head_dim, config.rope_base)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, last_ids=None, logits_to_keep=0,
                **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("DecoderStack models take unpadded rows: attention_mask must be all ones")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        B, S = input_ids.shape
        if last_ids is None:
            if past:
                raise ValueError("with a non-empty cache, pass last_ids: each row's token before input_ids")
            last_ids = input_ids.new_full((B,), -1)
        prev_ids = torch.cat([last_ids.view(B, 1).to(input_ids), input_ids[:, :-1]], dim=1)
        positions = past + torch.arange(S, device=input_ids.device).expand(B, S)

        x = norm(F.embedding(input_ids, self.embed))
        # smear: each token adds a gated share of the previous token's normed embedding (none at the document start)
        before = norm(F.embedding(prev_ids.clamp(min=0), self.embed))
        before = torch.where((prev_ids >= 0)[..., None], before, torch.zeros_like(before))
        x = x0 = x + self.smear_lambda * torch.sigmoid(x[..., :SMEAR_DIMS] @ self.smear_gate)[..., None] * before
        L, backout = self.config.n_layers, None
        scale = self.config.qk_scale ** 2 / self.config.head_dim ** 0.5
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = (F.embedding(input_ids, self.value_embeds[self.value_embed_layers.index(i)])
                  if i in self.value_embed_layers else None)
            x = block(x, ve, self.rotary, positions, scale, self.windows[i], cache)
            if i == L // 2:
                backout = x
        h = norm(x - self.backout_lambda * backout)
        h = h[:, -logits_to_keep:] if logits_to_keep else h
        logits = softcap(h @ self.lm_head[:self.config.vocab_size].T, self.config.softcap)
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """transformers' inputs (the new tokens, the cache) plus last_ids: the token before the new ones, which the
        full sequence generate holds still has."""
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        before = input_ids.size(1) - inputs["input_ids"].size(1)
        if before > 0:
            inputs["last_ids"] = input_ids[:, before - 1]
        return inputs
