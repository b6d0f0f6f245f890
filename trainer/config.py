"""Model config: nanochat's GPTConfig (moe3 branch), field for field, so meta JSON round-trips."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over layers; S = short window, L = sequence_len; last layer is always L
    num_experts: int = 0  # 0 = dense MLP; > 0 = MoE with top_k routed experts + one shared expert
    top_k: int = 2

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            want = str if f.name == "window_pattern" else int
            if not isinstance(v, want) or isinstance(v, bool):
                raise ValueError(f"GPTConfig.{f.name} must be {want.__name__}, got {v!r}")
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.n_embd < 24:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is below 24 (the smear gate reads 24 channels)")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"GPTConfig.window_pattern={self.window_pattern!r} must be a non-empty string of S/L")
        if self.num_experts < 0 or (self.num_experts > 0 and not 1 <= self.top_k <= self.num_experts):
            raise ValueError(f"GPTConfig: need num_experts >= 0 and 1 <= top_k <= num_experts "
                             f"(got num_experts={self.num_experts}, top_k={self.top_k})")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """nanochat's loading rule: unknown keys are an error, missing keys take defaults,
        a missing window_pattern (checkpoints older than windows) means all-long "L"."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; known keys are {sorted(known)}")
        d = dict(d)
        d.setdefault("window_pattern", "L")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


from_dict = GPTConfig.from_dict
