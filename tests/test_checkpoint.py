"""trainer/checkpoint.py: nanochat's checkpoint layout and load path (nanochat-reference §5)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest
import torch

from trainer.checkpoint import (CheckpointError, base_dir, build_model, config_from_meta, find_last_step,
                                find_model_tag, load_meta, load_model_state, load_optim_state, save_checkpoint)
from trainer.config import GPTConfig
from trainer.model import GPT
from trainer.optim import MuonAdamW

CPU = torch.device("cpu")
DENSE = dict(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL")


def _trained(config: GPTConfig, steps: int = 2) -> tuple[GPT, MuonAdamW, torch.Tensor]:
    """A tiny model after a few optimizer steps, so weights, optimizer state and MoE buffers are all non-trivial."""
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    opt = MuonAdamW(model.setup_optimizer())
    idx = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(idx[:, :-1], idx[:, 1:]).backward()
        model.update_moe_balancing()
        opt.step()
        model.zero_grad(set_to_none=True)
    return model, opt, idx


def _meta(model: GPT, step: int) -> dict:
    return {"step": step, "val_bpb": None, "model_config": asdict(model.config), "user_config": {"matrix_lr": 0.02},
            "max_seq_len": model.config.sequence_len, "device_batch_size": 2, "total_batch_size": 64}


def _logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(idx)


def test_round_trip_in_nanochat_layout(tmp_path):
    model, opt, idx = _trained(GPTConfig(**DENSE))
    meta = _meta(model, 5)
    ckpt = tmp_path / "chatsft_checkpoints" / "d2"
    save_checkpoint(ckpt, 5, model.state_dict(), opt.state_dict(), meta, rank=0)
    # exactly nanochat's names, and no temp file left behind (hidden ones included)
    assert sorted(os.listdir(ckpt)) == ["meta_000005.json", "model_000005.pt", "optim_000005_rank0.pt"]
    assert (ckpt / "meta_000005.json").read_text(encoding="utf-8") == json.dumps(meta, indent=2)
    assert load_meta(ckpt, 5) == meta
    assert find_last_step(ckpt) == 5

    state = load_model_state(ckpt, 5, CPU)
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    assert not any(k in state for k in ("cos", "sin"))  # rotary tables are rebuilt, never saved
    loaded = build_model(load_meta(ckpt, 5), state, CPU)
    assert loaded.config == model.config
    assert torch.equal(_logits(loaded, idx), _logits(model, idx))

    # the optimizer shard restores the run exactly: one more step on both gives identical weights
    opt2 = MuonAdamW(loaded.setup_optimizer())
    opt2.load_state_dict(load_optim_state(ckpt, 5, 0, CPU))
    assert load_optim_state(ckpt, 5, 1, CPU) is None  # another rank's shard is absent, not an error
    for m, o in ((model, opt), (loaded, opt2)):
        m.train()
        m(idx[:, :-1], idx[:, 1:]).backward()
        o.step()
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n


def test_loads_are_weights_only(tmp_path):
    """A pickle that would run code (any non-tensor object) is refused, for model and optimizer files."""
    evil = {"x": torch.zeros(1), "y": GPTConfig()}
    torch.save(evil, tmp_path / "model_000001.pt")
    torch.save(evil, tmp_path / "optim_000001_rank0.pt")
    with pytest.raises(CheckpointError, match="model_000001.pt: it holds objects other than tensors"):
        load_model_state(tmp_path, 1, CPU)
    with pytest.raises(CheckpointError, match="optim_000001_rank0.pt: it holds objects other than tensors"):
        load_optim_state(tmp_path, 1, 0, CPU)


def test_load_strips_compile_prefix_and_upcasts_bf16(tmp_path):
    model, _, idx = _trained(GPTConfig(**DENSE), steps=1)
    sd = model.state_dict()
    torch.save({f"_orig_mod.{k}": (v.bfloat16() if k == "lm_head.weight" else v) for k, v in sd.items()},
               tmp_path / "model_000003.pt")
    state = load_model_state(tmp_path, 3, CPU)
    assert state.keys() == sd.keys()
    assert state["lm_head.weight"].dtype == torch.float32  # nanochat: bf16 -> fp32 off CUDA
    assert torch.equal(state["lm_head.weight"], sd["lm_head.weight"].bfloat16().float())
    build_model(_meta(model, 3), state, CPU)  # strict load accepts the stripped keys


def test_missing_lambdas_and_window_pattern_take_nanochat_defaults(tmp_path):
    model, _, idx = _trained(GPTConfig(**{**DENSE, "window_pattern": "L"}), steps=1)
    state = {k: v for k, v in model.state_dict().items() if k not in ("resid_lambdas", "x0_lambdas")}
    meta = _meta(model, 1)
    del meta["model_config"]["window_pattern"]  # checkpoints older than windows mean all-long
    assert config_from_meta(meta).window_pattern == "L"
    loaded = build_model(meta, dict(state), CPU)
    assert torch.equal(loaded.resid_lambdas, torch.ones(2)) and torch.equal(loaded.x0_lambdas, torch.zeros(2))
    # the filled lambdas live on the model's device like every other tensor
    on_meta = build_model(meta, {k: v.to("meta") for k, v in state.items()}, torch.device("meta"))
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    # with those lambdas the reloaded model computes what the original does with the same lambdas
    with torch.no_grad():
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.zero_()
    assert torch.equal(_logits(loaded, idx), _logits(model, idx))


def test_unknown_config_key_is_an_error():
    model, _, _ = _trained(GPTConfig(**DENSE), steps=0)
    meta = _meta(model, 0)
    meta["model_config"]["n_experts"] = 4
    with pytest.raises(ValueError, match="n_experts"):
        config_from_meta(meta)


def test_failed_write_leaves_no_partial_or_temp_file(tmp_path, monkeypatch):
    model, opt, _ = _trained(GPTConfig(**DENSE), steps=1)
    save_checkpoint(tmp_path, 2, model.state_dict(), opt.state_dict(), _meta(model, 2), rank=0)
    before = sorted(os.listdir(tmp_path))
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)  # the bytes hit the disk, then the process is "interrupted"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(CheckpointError, match="optim_000004_rank0.pt: No space left on device"):
        save_checkpoint(tmp_path, 4, model.state_dict(), opt.state_dict(), _meta(model, 4), rank=0)
    assert sorted(os.listdir(tmp_path)) == before
    assert find_last_step(tmp_path) == 2


def test_rank_files(tmp_path):
    """Every rank writes its optimizer shard; only rank 0 writes model and meta."""
    model, opt, _ = _trained(GPTConfig(**DENSE), steps=1)
    save_checkpoint(tmp_path, 7, None, opt.state_dict(), None, rank=1)
    assert os.listdir(tmp_path) == ["optim_000007_rank1.pt"]
    with pytest.raises(CheckpointError, match="meta_000007.json"):
        load_meta(tmp_path, 7)
    with pytest.raises(CheckpointError, match="model_000007.pt"):
        load_model_state(tmp_path, 7, CPU)


def test_find_last_step(tmp_path):
    with pytest.raises(CheckpointError):
        find_last_step(tmp_path)
    for name in ("model_000002.pt", "model_000010.pt", "model_final.pt", "model_000099.pt.bak",
                 ".model_000500.pt.tmp-12", "optim_000020_rank0.pt", "meta_000030.json"):
        (tmp_path / name).write_bytes(b"")
    assert find_last_step(tmp_path) == 10
    (tmp_path / "model_1000000.pt").write_bytes(b"")  # past six digits: numeric, not string, order
    assert find_last_step(tmp_path) == 1000000


def test_find_model_tag(tmp_path):
    with pytest.raises(CheckpointError):
        find_model_tag(tmp_path / "missing")
    with pytest.raises(CheckpointError):
        find_model_tag(tmp_path)
    for i, name in enumerate(("d9", "d12", "d4", "zzz")):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "d99").write_text("a file, not a checkpoint folder")
    assert find_model_tag(tmp_path) == "d12"  # the largest dN, not the newest and not the largest string

    other = tmp_path / "untagged"
    other.mkdir()
    for i, name in enumerate(("big", "newest", "old")):
        (other / name).mkdir()
        os.utime(other / name, (2000 + [5, 9, 1][i], 2000 + [5, 9, 1][i]))
    assert find_model_tag(other) == "newest"  # no dN folder: the most recently modified


def test_base_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    assert base_dir(tmp_path / "data") == tmp_path / "data"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nc"))
    assert base_dir(tmp_path / "data") == tmp_path / "nc"


def test_moe_config_survives_a_reload(tmp_path):
    """num_experts/top_k are saved in model_config (nanochat moe3 drops them); routing buffers round-trip."""
    config = GPTConfig(**{**DENSE, "num_experts": 4, "top_k": 2})
    model, opt, idx = _trained(config, steps=2)
    assert model.transformer.h[0].mlp.router.expert_bias.abs().sum() > 0  # balancing has moved the biases
    save_checkpoint(tmp_path, 2, model.state_dict(), opt.state_dict(), _meta(model, 2), rank=0)
    meta = json.loads((tmp_path / "meta_000002.json").read_text())
    assert meta["model_config"]["num_experts"] == 4 and meta["model_config"]["top_k"] == 2
    state = load_model_state(tmp_path, 2, CPU)
    assert state["transformer.h.0.mlp.experts.w_up"].shape[0] == 4
    loaded = build_model(meta, state, CPU)
    assert loaded.config == config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(_logits(loaded, idx), _logits(model, idx))
    opt2 = MuonAdamW(loaded.setup_optimizer())
    opt2.load_state_dict(load_optim_state(tmp_path, 2, 0, CPU))  # router group included
    # the moe3 pitfall: without the MoE keys the checkpoint reads as dense and the strict load fails
    dense_meta = json.loads(json.dumps(meta))
    del dense_meta["model_config"]["num_experts"], dense_meta["model_config"]["top_k"]
    with pytest.raises(RuntimeError, match="mlp"):
        build_model(dense_meta, load_model_state(tmp_path, 2, CPU), CPU)
