"""DecoderStack's GPT for transformers (AutoModelForCausalLM with trust_remote_code=True), copied by export.py beside
the weights it exported. It computes what the stack's GPT.hidden and GPT.logits compute (the same parameter names, so
the stack's state dict loads as it is) on one document per row: position 0 and no previous token at a row's first
token, as the stack's Engine decodes a prompt. Rows are not padded: a batch is rows of equal length, and an
attention_mask, if given, must be all ones. tests/test_export.py holds each part to the stack function it mirrors.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

GATE_DIMS = 12  # the gates (smear, attention, value embedding) read the first 12 dims of their input


class DecoderStackConfig(PretrainedConfig):
    """The stack's ModelConfig (state.json "model"), field for field, plus the special ids generate needs."""
    model_type = "decoderstack"
    attribute_map = {"num_hidden_layers": "n_layers", "hidden_size": "model_dim", "num_attention_heads": "n_heads"}

    vocab_size: int = 32768
    n_layers: int = 11
    model_dim: int = 768
    n_heads: int = 6
    head_dim: int = 128
    mlp_mult: int = 4
    vocab_multiple: int = 128
    long_window_layers: str = "3,10"
    value_embed_layers: str = "1,2,8,9,10"
    bigram_rows_per_vocab: float = 7.5
    attn_scale: float = 0.1
    softcap: list | tuple = (23.0, 5.0, 7.5)
    short_window: int = 768
    long_window: int = 1664
    max_doc_len: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False  # lm_head and embed are both stored; the `tied` buffer says which one embeds


def parse_ints(text):
    return [int(x) for x in str(text).split(",") if x.strip()]


def norm(x):
    """RMS norm computed in fp32, returned in x's dtype."""
    return F.rms_norm(x.float(), (x.size(-1),)).to(x.dtype)


def softcap(logits, cap):
    """The logits the model predicts with (fp32): A * sigmoid((z + B) / C)."""
    a, b, c = cap
    return a * torch.sigmoid((logits.float() + b) / c)


class Rotary(nn.Module):
    """Half-truncated RoPE with the trained frequencies (a buffer: YaRN may have stretched them)."""

    def __init__(self, head_dim):
        super().__init__()
        self.register_buffer("freqs", torch.zeros(head_dim // 2), persistent=True)

    def forward(self, x, positions):
        angles = positions.float()[..., None] * self.freqs.float()
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
        self.attn_gate = nn.Parameter(torch.zeros(config.n_heads, GATE_DIMS))
        self.ve_gate = nn.Parameter(torch.zeros(config.n_heads, GATE_DIMS)) if has_value_embed else None

    def forward(self, x, ve, rotary, positions, scale, window, cache):
        """x: (B, S, dim) new tokens at `positions` (B, S); cache: a transformers Cache holding the earlier ones, or
        None. A query at position i sees the keys at positions j with 0 <= i - j <= window (the stack's mask)."""
        h = norm(x)
        heads = (*x.shape[:-1], self.n_heads, self.head_dim)
        q, k, v = (h @ self.q.T).view(heads), (h @ self.k.T).view(heads), (h @ self.v.T).view(heads)
        q, k = rotary(norm(q), positions), rotary(norm(k), positions)  # QK-norm, then rotate
        if ve is not None:
            v = v + 2 * torch.sigmoid(h[..., :GATE_DIMS] @ self.ve_gate.T)[..., None] * ve.view_as(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D): the layout of transformers' caches
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        key_positions = torch.arange(k.size(2), device=x.device)
        gap = positions[:, None, :, None] - key_positions  # (B, 1, S, T): query position minus key position
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=(gap >= 0) & (gap <= window), scale=scale)
        y = y.transpose(1, 2) * torch.sigmoid(h[..., :GATE_DIMS] @ self.attn_gate.T)[..., None]
        x = x + y.flatten(-2) @ self.o.T
        return x + torch.relu(norm(x) @ self.fc.T).square() @ self.proj.T


class DecoderStackForCausalLM(PreTrainedModel, GenerationMixin):
    """The stack's GPT: smear gate, bigram hash embedding, value embeddings, U-net skips, block lambdas, QK-norm,
    half-truncated RoPE, per-layer sliding windows, attention gates, relu^2 MLP, softcapped logits over vocab_size
    (the embedding tables have padded rows that no id reaches). Activations are in the weights' dtype; norms, RoPE
    angles and logits are fp32.

    forward(input_ids (B, S), cache=None, last_ids=None, ...): with a cache holding a row's first n tokens, input_ids
    are its tokens n, n+1, ...; last_ids (B,) are the tokens before them (token n-1), which the smear gate and the
    bigram hash read. generate passes them itself (prepare_inputs_for_generation); they are needed whenever the
    cache is not empty."""
    config_class = DecoderStackConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    # loaded in bf16 or fp16 too, the trained frequencies and attention scale stay fp32, as in the stack (whose
    # buffers stay fp32 under autocast): a bf16 frequency is off by up to 0.4%, radians at position 1000
    _keep_in_fp32_modules_strict = ["rotary", "attn_scale"]

    def __init__(self, config):
        super().__init__(config)
        padded = -(-config.vocab_size // config.vocab_multiple) * config.vocab_multiple
        dim, L, inner = config.model_dim, config.n_layers, config.n_heads * config.head_dim
        self.value_embed_layers = [i for i in parse_ints(config.value_embed_layers) if i < L]
        long_layers = set(i for i in parse_ints(config.long_window_layers) if i < L)
        self.windows = [config.long_window if i in long_layers else config.short_window for i in range(L)]
        self.blocks = nn.ModuleList(Block(config, i, i in self.value_embed_layers) for i in range(L))
        self.lm_head = nn.Parameter(torch.zeros(padded, dim))
        self.embed = nn.Parameter(torch.zeros(padded, dim))
        self.value_embeds = nn.Parameter(torch.zeros(len(self.value_embed_layers), padded, inner))
        self.bigram_rows = max(2, int(config.bigram_rows_per_vocab * config.vocab_size))
        self.bigram_embed = nn.Parameter(torch.zeros(self.bigram_rows, dim))
        self.smear_gate = nn.Parameter(torch.zeros(GATE_DIMS))
        self.block_lambdas = nn.Parameter(torch.zeros(L, 3))
        self.skip_weights = nn.Parameter(torch.zeros(L // 2))
        self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.rotary = Rotary(config.head_dim)
        self.register_buffer("attn_scale", torch.tensor(float(config.attn_scale)))  # grown by YaRN in training
        self.register_buffer("tied", torch.tensor(True))  # lm_head embeds too until training untied them
        self.post_init()

    def bigram_ids(self, ids, prev_ids):
        """Hash of (previous token, token); a document start (prev_ids < 0) gets the reserved last row."""
        h = ((36313 * ids) ^ (27191 * prev_ids.clamp(min=0))) % (self.bigram_rows - 1)
        return torch.where(prev_ids < 0, self.bigram_rows - 1, h)

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

        embed = self.lm_head if bool(self.tied) else self.embed
        e = F.embedding(input_ids, embed)
        # smear: each token takes a gated share of the previous token's embedding (none at the document start)
        before = F.embedding(prev_ids.clamp(min=0), embed)
        before = torch.where((prev_ids >= 0)[..., None], before, torch.zeros_like(before))
        e = e + self.smear_lambda * torch.sigmoid(e[..., :GATE_DIMS] @ self.smear_gate)[..., None] * before
        x = x0 = norm(e)
        bigram = F.embedding(self.bigram_ids(input_ids, prev_ids), self.bigram_embed)
        skips, L, scale = [], self.config.n_layers, float(self.attn_scale)
        for i, block in enumerate(self.blocks):
            if i >= L - L // 2 and skips:  # U-net: the first half's outputs feed the second half, mirrored
                x = x + self.skip_weights[L - 1 - i] * skips.pop()
            a, b, c = self.block_lambdas[i]
            x = a * x + b * x0 + c * bigram
            ve = (F.embedding(input_ids, self.value_embeds[self.value_embed_layers.index(i)])
                  if i in self.value_embed_layers else None)
            x = block(x, ve, self.rotary, positions, scale, self.windows[i], cache)
            if i < L // 2:
                skips.append(x)
        h = norm(x)[:, -logits_to_keep:] if logits_to_keep else norm(x)
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
