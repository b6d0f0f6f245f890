"""nanochat's GPT (moe3 branch), written afresh with identical state-dict names, shapes, init and math:
rotary (-theta convention, base 1e5) before QK norm x1.2, sliding-window attention, value embeddings
with gates, smear, x0/residual lambdas, backout, softcapped logits over a vocab padded to 64.
Attention: FlexAttention on CUDA while training (windows and packed-document masks as block masks),
with cuDNN's causal kernel (full windows) and diagonal band (short windows) taking over on Hopper where they
apply, SDPA elsewhere (explicit boolean mask); rotary + QK norm as Triton kernels in training on CUDA
(trainer.rotary_norm), and on Hopper the MLP's relu^2 fused into its GEMMs (trainer.relu2_mlp) and the
loss computed over the supervised rows only (trainer.softcap_ce).
Optionally, `doc_ids` (B, T) keeps packed documents apart."""
from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from trainer import cudnn_window, relu2_mlp, rotary_norm, softcap_ce
from trainer.common import Linear, compute_dtype
from trainer.config import GPTConfig
from trainer.moe import MoE, update_expert_biases

SMEAR_CHANNELS, VE_GATE_CHANNELS = 24, 12
SOFTCAP, ROPE_BASE, QK_SCALE, ROTARY_OVERCOMPUTE = 15.0, 100_000, 1.2, 10
_BLOCK_MASKS: dict = {}  # (T, left, device) -> BlockMask, for rows without document ids
# Training-path kernel choices. bench/bench_train.py --variants times alternatives in one process, and
# tests/test_model.py checks each against the plain path on CUDA; bench/RESULTS.md has the measurements.
# FlexAttention kernel options (block sizes, warps, ...); None = inductor's defaults for the card.
FLEX_KERNEL_OPTIONS: dict | None = None
# A layer whose window spans the whole row, in rows without document ids and without GQA, needs no block
# mask: SDPA's causal kernel of this backend ("cudnn", "flash") runs it instead of flex. "auto": cuDNN on
# Hopper (SM 9.0), where it measured 25 % faster than flex for the layer (3.0 vs 4.0 ms) and 3.7 ms faster for
# a d20 step; flex elsewhere (unmeasured). None: flex for every layer.
CAUSAL_SDPA_BACKEND: str | None = "auto"
_SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
# A short window, in rows without document ids and without GQA: "cudnn" runs it as cuDNN's diagonal band
# (trainer.cudnn_window, the optional [cuda] extra) instead of flex. "auto": cudnn on Hopper where the frontend
# loads, flex elsewhere. None: flex.
WINDOW_BACKEND: str | None = "auto"
# Rotary + QK norm of q and k in training: "triton" runs trainer.rotary_norm's kernels (which keep only the
# output for the backward), "auto" wherever Triton imports on CUDA in 16 bits, None the plain expression.
ROTARY_NORM_KERNEL: str | None = "auto"
# The dense MLP in training: "triton" runs trainer.relu2_mlp (relu^2 and its gradient fused into two Triton
# GEMMs through TMA), "auto" on Hopper where Triton imports in 16 bits, None the plain expression.
MLP_KERNEL: str | None = "auto"
# The training loss: "triton" runs trainer.softcap_ce (lm_head over the supervised rows only, softcap and
# cross-entropy in one Triton kernel), "auto" on Hopper where Triton imports in 16 bits, None the plain
# expression. Only for a summed or mean loss with gradients on: evaluation keeps the plain expression.
LOSS_KERNEL: str | None = "auto"
# Evaluation and decoding on CUDA: not cuDNN, which builds a new plan for every new key length (at every
# decode step, in every layer; at every batch width in a categorical eval). Flash takes the unmasked calls,
# memory-efficient attention the masked ones.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _hopper(device: torch.device) -> bool:
    """SM 9.0, where the "auto" kernel choices were measured."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def causal_sdpa_backend(device: torch.device, dtype: torch.dtype) -> SDPBackend | None:
    """The SDPA backend for full-window training layers (CAUSAL_SDPA_BACKEND resolved for the device), or None
    (flex). fp32 always stays on flex: the fused causal kernels are 16-bit only."""
    choice = CAUSAL_SDPA_BACKEND
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    if choice == "auto":
        choice = "cudnn" if _hopper(device) and torch.backends.cudnn.is_available() else None
    if choice is None:
        return None
    if choice not in _SDPA_BACKENDS:
        raise ValueError(f"CAUSAL_SDPA_BACKEND={choice!r}: expected one of {sorted(_SDPA_BACKENDS)}, 'auto' or None")
    return _SDPA_BACKENDS[choice]


def _kernel_choice(setting: str, choice: str | None, explicit: str, device: torch.device, dtype: torch.dtype,
                   module, needs: str, hopper_only: bool = True) -> bool:
    """One training-path kernel setting resolved: `choice` (the value of this module's `setting`) is "auto",
    `explicit` or None. None, a CPU or an fp32 model: the plain path. "auto": wherever `module` (its
    available() / load_error()) loads, on Hopper only when hopper_only (where it was measured). `explicit`:
    where it loads, else an error naming what it needs. A shape the kernel cannot take is the caller's check."""
    if choice not in ("auto", explicit, None):
        raise ValueError(f"{setting}={choice!r}: expected {explicit!r}, 'auto' or None")
    if choice is None or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if choice == "auto":
        return module.available() and (not hopper_only or _hopper(device))
    if not module.available():
        raise RuntimeError(f"{setting}={explicit!r} needs {needs}: {module.load_error()}")
    return True


def window_band(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether short-window training layers run as cuDNN's band (WINDOW_BACKEND resolved for the device)."""
    return _kernel_choice("WINDOW_BACKEND", WINDOW_BACKEND, "cudnn", device, dtype, cudnn_window,
                          "the cuDNN frontend (pip install '.[cuda]')")


def rotary_norm_kernel(device: torch.device, dtype: torch.dtype, head_dim: int = 128) -> bool:
    """Whether training runs trainer.rotary_norm's Triton kernels (ROTARY_NORM_KERNEL resolved). They take
    power-of-two head dims only (nanochat's are 128): other models keep the plain expression."""
    if not _kernel_choice("ROTARY_NORM_KERNEL", ROTARY_NORM_KERNEL, "triton", device, dtype, rotary_norm, "Triton",
                          hopper_only=False):
        return False
    if head_dim & (head_dim - 1):
        if ROTARY_NORM_KERNEL == "triton":
            raise ValueError(f"ROTARY_NORM_KERNEL='triton' takes power-of-two head dims, not {head_dim}")
        return False
    return True


def loss_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the training loss runs trainer.softcap_ce (LOSS_KERNEL resolved)."""
    return _kernel_choice("LOSS_KERNEL", LOSS_KERNEL, "triton", device, dtype, softcap_ce, "Triton")


def mlp_kernel(device: torch.device, dtype: torch.dtype, width: int) -> bool:
    """Whether the training MLP runs trainer.relu2_mlp's fused GEMMs (MLP_KERNEL resolved): TMA needs
    Hopper or later and 16-byte aligned rows."""
    if not _kernel_choice("MLP_KERNEL", MLP_KERNEL, "triton", device, dtype, relu2_mlp, "Triton with TMA descriptors"):
        return False
    if width % 8 == 0 and torch.cuda.get_device_capability(device)[0] >= 9:
        return True
    if MLP_KERNEL == "triton":
        raise RuntimeError(f"MLP_KERNEL='triton' needs SM 9.0 or later and a width divisible by 8 (got {width} "
                           f"on SM {'.'.join(map(str, torch.cuda.get_device_capability(device)))})")
    return False


@dataclass(frozen=True)
class CudnnBand:
    """block_masks' plan for a short window that cuDNN runs as a diagonal band: no block mask needed."""
    left: int


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def has_value_embed(layer: int, n_layer: int) -> bool:
    """Alternate layers, the last one included."""
    return layer % 2 == (n_layer - 1) % 2


def short_window(seq_len: int) -> int:
    """The S window: a quarter of the row, rounded up to 128."""
    return math.ceil(seq_len / 4 / 128) * 128


def window_sizes(config: GPTConfig) -> list[int]:
    """Left window per layer: query t sees keys t-left..t. L = sequence_len, S = a quarter rounded up to 128."""
    long = config.sequence_len
    short = short_window(long)
    pattern = config.window_pattern.upper()
    lefts = [long if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
    lefts[-1] = long
    return lefts


def rotary_tables(seq_len: int, head_dim: int, device=None, dtype=torch.float32):
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]


def apply_rotary(x, cos, sin):
    """x (B, T, H, D), halves rotated by -theta (nanochat's convention; checkpoints depend on it)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def attention_mask(T: int, left: int, doc_ids=None, device=None) -> torch.Tensor:
    """Boolean (T, T), or (B, 1, T, T) with doc_ids: causal, within the window, same document."""
    pos = torch.arange(T, device=device)
    gap = pos[:, None] - pos[None, :]
    mask = (gap >= 0) & (gap <= left)
    if doc_ids is None:
        return mask
    return (mask & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


@functools.cache
def _compiled(fn):
    """torch.compile'd on first use (importing inductor takes seconds); eager flex is only a slow fallback."""
    return torch.compile(fn, dynamic=False)


def _window_mod(left: int):
    def window(b, h, q, kv):
        return (q >= kv) & (q - kv <= left)
    return window


def _window_doc_mod(left: int, doc_ids):
    window = _window_mod(left)

    def window_doc(b, h, q, kv):
        return window(b, h, q, kv) & (doc_ids[b, q] == doc_ids[b, kv])
    return window_doc


@torch.compiler.disable
def block_masks(T: int, lefts: set[int], doc_ids, device, gqa: bool = False, dtype=torch.float32) -> dict:
    """FlexAttention block mask per window; cached per (T, left, device) when there are no document ids.
    A window without document ids or GQA gets the kernel that runs it without a block mask, where there is
    one: full, the SDPA backend (causal_sdpa_backend); short, CudnnBand (window_band). Compile-disabled: one
    clean graph break at the top of the forward instead of tracing mask building."""
    make = _compiled(create_block_mask)
    masks = {}
    plain = doc_ids is None and not gqa
    causal = causal_sdpa_backend(torch.device(device), dtype) if plain else None
    band = plain and window_band(torch.device(device), dtype)
    for left in lefts:
        if causal is not None and left >= T - 1:
            masks[left] = causal
        elif band and left < T - 1:
            masks[left] = CudnnBand(left)
        elif doc_ids is None:
            key = (T, left, str(device))
            if key not in _BLOCK_MASKS:
                _BLOCK_MASKS[key] = make(_window_mod(left), None, None, T, T, device=device)
            masks[left] = _BLOCK_MASKS[key]
        else:
            masks[left] = make(_window_doc_mod(left, doc_ids), doc_ids.size(0), None, T, T, device=device)
    return masks


def attend(q, k, v, left: int, doc_ids=None, mask=None):
    """q (B, Hq, T, D), k/v (B, Hkv, T, D); GQA shares each kv head among Hq/Hkv query heads. `mask`: a
    flex BlockMask, or the SDPA backend of a full causal window, or a CudnnBand (block_masks), or None (SDPA,
    explicit mask)."""
    T, gqa = q.size(2), q.size(1) != k.size(1)
    if isinstance(mask, SDPBackend):  # a full-window layer: the causal kernel block_masks chose
        with sdpa_kernel([mask]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if isinstance(mask, CudnnBand):
        return cudnn_window.band_attention(q, k, v, mask.left)
    if mask is not None:
        flex = flex_attention if torch.compiler.is_compiling() else _compiled(flex_attention)
        return flex(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=FLEX_KERNEL_OPTIONS)
    if left >= T - 1 and doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(T, left, doc_ids, q.device),
                                          enable_gqa=gqa)


@dataclass
class KVCache:
    """Inference state, a static buffer per layer: keys and values (B, Hkv, max_len, D) of the slots filled so
    far (`pos`, the same for every row) and the last slot's pre-smear embedding (smear mixes each token with the
    one before it). Rows of different lengths are left-padded (`set_padding`): row b's first `offsets[b]` slots
    are padding, its token in slot s has position s - offsets[b], and no real query attends to a pad slot."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int = 0
    prev: torch.Tensor | None = None
    offsets: torch.Tensor | None = None  # (B,) long, on the cache's device; None: no row is padded
    max_offset: int = 0
    _masks: dict = field(default_factory=dict)  # per forward call: (left, T) -> mask (shared by layers)
    # static decoding (see `make_static`): the position as a device tensor, every step the same shapes
    static: bool = False
    pos_t: torch.Tensor | None = None
    prev_buf: torch.Tensor | None = None
    _offsets_t: torch.Tensor | None = None
    _slots: torch.Tensor | None = None

    def make_static(self) -> None:
        """Switch to static decode steps (after the prefill): one token per row per step, the position kept
        on the device and advanced there, attention over the whole buffer with a mask built on the device,
        the smear state in a fixed buffer. Nothing depends on a Python int, so a step can be captured as a
        CUDA graph and replayed. The unwritten slots are zeroed (masked keys must hold finite values)."""
        if self.prev is None:
            raise ValueError("make_static needs a prefilled cache")
        device, B = self.k[0].device, self.k[0].size(0)
        for buf in self.k + self.v:
            buf[:, :, self.pos:].zero_()
        if self.pos_t is None:  # first use; a reused cache keeps its tensors (a captured graph reads them)
            self.pos_t = torch.zeros(1, dtype=torch.long, device=device)
            self._offsets_t = torch.zeros(B, dtype=torch.long, device=device)
            self._slots = torch.arange(self.k[0].size(2), device=device)
            self.prev_buf = torch.empty_like(self.prev)
        self.pos_t.fill_(self.pos)
        if self.offsets is not None:
            self._offsets_t.copy_(self.offsets)
        else:
            self._offsets_t.zero_()
        self.prev_buf.copy_(self.prev)
        self.static = True

    def reset(self) -> None:
        """Empty again, for another batch of the same size (the buffers, static ones included, are kept)."""
        self.pos, self.prev, self.offsets, self.max_offset, self.static = 0, None, None, 0, False
        self._masks.clear()

    def static_positions(self) -> torch.Tensor:
        return self.pos_t - self._offsets_t  # (B,)

    def _static_attend(self, layer: int, q, k, v, left: int):
        self.k[layer].index_copy_(2, self.pos_t, k)
        self.v[layer].index_copy_(2, self.pos_t, v)
        key = ("static", left)
        if key not in self._masks:
            gap = self.pos_t - self._slots  # (L,)
            ok = (gap >= 0) & (gap <= left)
            self._masks[key] = (ok[None, :] & (self._slots[None, :] >= self._offsets_t[:, None]))[:, None, None, :]
        return F.scaled_dot_product_attention(q, self.k[layer], self.v[layer], attn_mask=self._masks[key],
                                              enable_gqa=q.size(1) != k.size(1))

    def set_padding(self, offsets: list[int]) -> None:
        """Declare row b's first offsets[b] slots as left padding (before the first forward)."""
        if self.pos:
            raise ValueError("set_padding must come before the first forward")
        if any(o < 0 for o in offsets) or len(offsets) != self.k[0].size(0):
            raise ValueError(f"need one offset >= 0 per row ({self.k[0].size(0)}), got {offsets}")
        self.max_offset = max(offsets, default=0)
        self.offsets = torch.tensor(offsets, dtype=torch.long, device=self.k[0].device) if self.max_offset else None

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) rotary positions of the next T slots (pads clamp to 0)."""
        slots = torch.arange(self.pos, self.pos + T, device=self.k[0].device)
        return (slots[None, :] - self.offsets[:, None]).clamp(min=0)

    def _mask(self, left: int, T: int, start: int):
        """Boolean (T, K) or (B, 1, T, K) over key slots start..pos+T-1, or None when every key may be seen:
        causal within the window, and no pad key (a pad query sees itself, so no row of softmax is empty)."""
        key = (left, T)
        if key in self._masks:
            return self._masks[key]
        padded = self.max_offset > start
        mask = None
        if T > 1 or padded:
            device = self.k[0].device
            qslot = torch.arange(self.pos, self.pos + T, device=device)[:, None]
            kslot = torch.arange(start, self.pos + T, device=device)[None, :]
            gap = qslot - kslot
            mask = (gap >= 0) & (gap <= left)
            if padded:
                mask = ((mask & (kslot >= self.offsets[:, None, None])) | (gap == 0))[:, None]
        self._masks[key] = mask
        return mask

    def attend(self, layer: int, q, k, v, left: int):
        """Store this step's k/v (B, Hkv, T, D) and attend q over the cached slots in its window. A decode step
        (T = 1) of unpadded rows reads just the window's slice, with no mask."""
        if self.static:
            return self._static_attend(layer, q, k, v, left)
        T0, T = self.pos, q.size(2)
        self.k[layer][:, :, T0:T0 + T] = k
        self.v[layer][:, :, T0:T0 + T] = v
        start = max(0, T0 - left)  # the earliest slot any query of this step sees
        keys, values = self.k[layer][:, :, start:T0 + T], self.v[layer][:, :, start:T0 + T]
        mask = self._mask(left, T, start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))

    def advance(self, T: int) -> None:
        if self.static:
            self.pos_t += T  # on the device: part of a captured step
        self.pos += T
        self._masks.clear()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        C = config.n_embd
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, C // config.n_head
        self.c_q = Linear(C, self.n_head * self.head_dim)
        self.c_k = Linear(C, self.n_kv_head * self.head_dim)
        self.c_v = Linear(C, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(C, C)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_value_embed(layer, config.n_layer) else None

    def forward(self, x, ve, rope_norm, left, doc_ids, mask, cache: tuple[KVCache, int] | None = None):
        """rope_norm: rotary then QK norm of a (B, T, H, D) tensor (GPT.forward picks the kernel)."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # ResFormer value residual, gated per kv head
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = rope_norm(q), rope_norm(k)
        if cache is not None:
            y = cache[0].attend(cache[1], q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), left)
        else:
            y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), left, doc_ids, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        if self.training and torch.is_grad_enabled() and mlp_kernel(x.device, x.dtype, x.size(-1)):
            return relu2_mlp.relu2_mlp(x, self.c_fc.weight.to(x.dtype), self.c_proj.weight.to(x.dtype))
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MoE(config) if config.num_experts > 0 else MLP(config)

    def forward(self, x, ve, rope_norm, left, doc_ids, mask, cache=None):
        x = x + self.attn(norm(x), ve, rope_norm, left, doc_ids, mask, cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C, L = config.n_embd, config.n_layer
        self.padded_vocab = math.ceil(config.vocab_size / 64) * 64
        self.windows = window_sizes(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(self.padded_vocab, C),
            h=nn.ModuleList(Block(config, i) for i in range(L)),
        ))
        self.lm_head = Linear(C, self.padded_vocab)
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(self.padded_vocab, kv_dim) for i in range(L) if has_value_embed(i, L)})
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        cos, sin = rotary_tables(ROTARY_OVERCOMPUTE * config.sequence_len, C // config.n_head)
        self.register_buffer("cos", cos, persistent=False)  # rebuilt by init_weights, never saved
        self.register_buffer("sin", sin, persistent=False)
        self.dtype = torch.float32  # activation dtype; set by init_weights from the parameters' device

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init, in its order (the RNG stream depends on it). Also rebuilds the rotary tables
        and casts the embeddings to the compute dtype: call it after to_empty(device), before loading."""
        C, L = self.config.n_embd, self.config.n_layer
        s = math.sqrt(3) / math.sqrt(C)  # uniform with the std of N(0, 1/C)
        nn.init.normal_(self.transformer.wte.weight, 0.0, 0.8)
        nn.init.normal_(self.lm_head.weight, 0.0, 0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            if isinstance(block.mlp, MoE):
                block.mlp.init_weights(s)
            else:
                nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
                nn.init.zeros_(block.mlp.c_proj.weight)
        frac = [i / max(L - 1, 1) for i in range(L)]
        self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * f for f in frac]))
        self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * f for f in frac]))
        self.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        device = self.transformer.wte.weight.device
        self.dtype = compute_dtype(device)
        self.cos, self.sin = rotary_tables(ROTARY_OVERCOMPUTE * self.config.sequence_len,
                                           C // self.config.n_head, device, self.dtype)
        if self.dtype != torch.float16:  # fp16 keeps fp32 embeddings (a GradScaler handles the rest)
            self.transformer.wte.to(self.dtype)
            self.value_embeds.to(self.dtype)

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for up to `max_len` slots (padding + prompt + generated tokens)."""
        if max_len > self.cos.size(1):
            raise ValueError(f"{max_len} positions exceed the rotary cache of {self.cos.size(1)}")
        c = self.config
        shape = (batch, c.n_kv_head, max_len, c.n_embd // c.n_head)
        device = self.transformer.wte.weight.device
        return KVCache(k=[torch.empty(shape, dtype=self.dtype, device=device) for _ in range(c.n_layer)],
                       v=[torch.empty(shape, dtype=self.dtype, device=device) for _ in range(c.n_layer)])

    def forward(self, idx, targets=None, loss_reduction: str = "mean", doc_ids=None, kv_cache: KVCache | None = None,
                last_only: bool = False, logits_at: torch.Tensor | None = None):
        """idx (B, T) -> logits (B, T, V) fp32, or the loss (ignore_index=-1): a scalar for mean/sum,
        per token (B*T,) for "none". doc_ids (B, T): tokens attend only within their own document.
        kv_cache (inference): idx continues the cached slots, and the cache is extended by T.
        last_only: logits of the last position only, (B, 1, V) (a prefill needs no more).
        logits_at (B,): logits of one position per row only, (B, 1, V) (a categorical eval reads each
        right-padded prompt's last token: the unembedding of every other position is wasted work)."""
        B, T = idx.shape
        T0 = kv_cache.pos if kv_cache is not None else 0
        if T0 + T > self.cos.size(1):
            raise ValueError(f"sequence of {T0 + T} tokens exceeds the rotary cache of {self.cos.size(1)}")
        if doc_ids is not None and (doc_ids.shape != idx.shape or kv_cache is not None):
            raise ValueError(f"doc_ids must match idx {tuple(idx.shape)} and cannot be used with a kv cache")
        dt, V = self.dtype, self.config.vocab_size
        padded = kv_cache is not None and kv_cache.offsets is not None
        static = kv_cache is not None and kv_cache.static
        if static:
            if T != 1:
                raise ValueError(f"a static kv cache decodes one token per row per step, got {T}")
            pos = kv_cache.static_positions()
            cos, sin = self.cos[0][pos][:, None], self.sin[0][pos][:, None]
        elif padded:  # per-row positions
            pos = kv_cache.positions(T)
            cos, sin = self.cos[0][pos], self.sin[0][pos]
        else:
            cos, sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        x = norm(self.transformer.wte(idx).to(dt))
        prev = kv_cache.prev if kv_cache is not None and T0 > 0 else None
        if static:
            prev = kv_cache.prev_buf.clone()  # read before this step overwrites it
            kv_cache.prev_buf.copy_(x[:, -1:])
        elif kv_cache is not None:
            kv_cache.prev = x[:, -1:]
        src = x if prev is None else torch.cat([prev, x], dim=1)  # the token before each one, pre-smear
        if src.size(1) > 1:  # smear: mix the previous token's embedding in, gated by the current one
            cur, before = src[:, 1:], src[:, :-1]
            gate = self.smear_lambda.to(dt) * torch.sigmoid(self.smear_gate(cur[..., :SMEAR_CHANNELS]))
            if doc_ids is not None:  # not across a document boundary
                gate = gate * (doc_ids[:, 1:] == doc_ids[:, :-1]).unsqueeze(-1).to(dt)
            first = T0 if prev is not None else T0 + 1  # slot of cur[:, 0]
            if padded and not static and first <= kv_cache.max_offset:  # a row's first real token has no token before it
                slots = torch.arange(first, T0 + T, device=idx.device)
                gate = gate * (slots[None, :] > kv_cache.offsets[:, None]).unsqueeze(-1).to(dt)
            mixed = cur + gate * before
            x = mixed if prev is not None else torch.cat([x[:, :1], mixed], dim=1)
        x0, x_mid = x, None
        masks = None
        training = self.training and kv_cache is None
        if training and idx.is_cuda:  # eval and generation vary T: SDPA avoids recompiling flex per length
            masks = block_masks(T, set(self.windows), doc_ids, idx.device,
                                gqa=self.config.n_head != self.config.n_kv_head, dtype=dt)
        if training and rotary_norm_kernel(idx.device, dt, self.config.n_embd // self.config.n_head):
            rope_norm = functools.partial(rotary_norm.rotary_norm, cos=cos[0, :, 0], sin=sin[0, :, 0],
                                          scale=QK_SCALE)
        else:
            def rope_norm(t):
                return norm(apply_rotary(t, cos, sin)) * QK_SCALE
        with sdpa_kernel(DECODE_BACKENDS) if idx.is_cuda and (kv_cache is not None or not self.training) \
                else nullcontext():
            for i, block in enumerate(self.transformer.h):
                x = self.resid_lambdas[i].to(dt) * x + self.x0_lambdas[i].to(dt) * x0
                ve = self.value_embeds[str(i)](idx).to(dt) if str(i) in self.value_embeds else None
                left = self.windows[i]
                x = block(x, ve, rope_norm, left, doc_ids, masks[left] if masks else None,
                          (kv_cache, i) if kv_cache is not None else None)
                if i == self.config.n_layer // 2:
                    x_mid = x
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only:
            x, x_mid = x[:, -1:], x_mid[:, -1:]
        elif logits_at is not None:
            rows = torch.arange(B, device=idx.device)
            x, x_mid = x[rows, logits_at][:, None], x_mid[rows, logits_at][:, None]
        x = norm(x - self.backout_lambda.to(dt) * x_mid)
        if targets is not None and loss_reduction in ("sum", "mean") and training and torch.is_grad_enabled() \
                and loss_kernel(idx.device, dt):
            loss = softcap_ce.softcap_ce(x, self.lm_head.weight.to(dt), targets, V, SOFTCAP)
            return loss if loss_reduction == "sum" else loss / (targets >= 0).sum()
        logits = self.lm_head(x)[..., :V].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.transformer.h if isinstance(b.mlp, MoE)]

    def update_moe_balancing(self, coeff: float = 1e-3) -> None:
        """Once per optimizer step, before optimizer.step(); a no-op for dense models."""
        update_expert_biases(self.moe_layers(), coeff)

    def num_scaling_params(self) -> dict[str, int]:
        def count(ps):
            return sum(p.numel() for p in ps)
        n = dict(wte=self.transformer.wte.weight.numel(), value_embeds=count(self.value_embeds.parameters()),
                 lm_head=self.lm_head.weight.numel(), transformer_matrices=count(self.transformer.h.parameters()),
                 scalars=count([self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                self.smear_lambda, self.backout_lambda]))
        E, K = self.config.num_experts, self.config.top_k
        n["moe_inactive"] = sum((m.experts.w_up.numel() + m.experts.w_down.numel()) * (E - K) // E
                                for m in self.moe_layers())
        n["active_transformer_matrices"] = n["transformer_matrices"] - n["moe_inactive"]
        n["total"] = n["wte"] + n["value_embeds"] + n["lm_head"] + n["transformer_matrices"] + n["scalars"]
        n["active_total"] = n["total"] - n["moe_inactive"]
        assert n["total"] == count(self.parameters()), "num_scaling_params misses a parameter"
        return n

    def estimate_flops(self) -> int:
        """Forward + backward FLOPs per token: 6 x active matmul params + the attention score/value term."""
        n = self.num_scaling_params()
        matmul = n["total"] - n["wte"] - n["value_embeds"] - n["scalars"] - n["moe_inactive"]
        D = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * D * min(left, self.config.sequence_len) for left in self.windows)
        return 6 * matmul + attn

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        scalar_lr=0.5, router_lr=0.005) -> list[dict]:
        """nanochat's parameter groups, in its order (the order fixes optimizer state indices)."""
        r = (self.config.n_embd / 768) ** -0.5  # AdamW LRs were tuned at C=768

        def adamw(params, lr, betas, wd):
            return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=wd)

        routers = [m.router.gate.weight for m in self.moe_layers()]
        groups = [
            adamw([self.lm_head.weight], unembedding_lr * r, (0.8, 0.96), 0.01),
            adamw([self.transformer.wte.weight], embedding_lr * r, (0.8, 0.995), 0.001),
            adamw(list(self.value_embeds.parameters()), embedding_lr * r * 0.5, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ]
        if routers:
            groups.append(adamw(routers, router_lr * r, (0.8, 0.96), 0.0))
        router_ids = {id(p) for p in routers}
        matrices = [p for p in self.transformer.h.parameters() if id(p) not in router_ids]
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        for g in groups:
            g["initial_lr"] = g["lr"]
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters())), "a parameter has no group"
        return groups
