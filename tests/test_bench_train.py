"""bench/bench_train.py's CPU-side logic: micro-steps from the total batch, the settings it switches between
variants, and the synthetic snapshot it trains on (the timing itself needs a GPU)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import trainer.model as model_module
import trainer.moe as moe_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Args:
    def __init__(self, batch: int, total_batch: int):
        self.batch, self.total_batch = batch, total_batch


def test_micro_steps_follow_the_total_batch(bench):
    assert bench.micro_steps(Args(32, 0), 2048, 1) == 1
    assert bench.micro_steps(Args(32, 524288), 2048, 1) == 8  # nanochat's SFT batch on one GPU
    assert bench.micro_steps(Args(32, 524288), 2048, 2) == 4
    with pytest.raises(SystemExit, match="not a multiple of batch 32 x seq 2048 x world 3"):
        bench.micro_steps(Args(32, 524288), 2048, 3)


def test_settings_switch_and_reset(bench, monkeypatch):
    monkeypatch.setattr(model_module, "CAUSAL_SDPA_BACKEND", model_module.CAUSAL_SDPA_BACKEND)
    monkeypatch.setattr(moe_module, "MOE_PERMUTE", moe_module.MOE_PERMUTE)
    assert bench.parse_settings('causal_sdpa="cudnn",moe_permute="scatter",flex=null') == \
        {"causal_sdpa": "cudnn", "moe_permute": "scatter", "flex": None}
    assert bench.parse_settings('flex={"USE_TMA":true,"BLOCK_M":64},causal_sdpa=null') == \
        {"flex": {"USE_TMA": True, "BLOCK_M": 64}, "causal_sdpa": None}  # a value's own commas
    with pytest.raises(SystemExit, match="flex: not a JSON value"):
        bench.parse_settings("flex=tma")
    bench.apply_settings({"causal_sdpa": None, "moe_permute": "scatter"})
    assert model_module.CAUSAL_SDPA_BACKEND is None and moe_module.MOE_PERMUTE == "scatter"
    bench.apply_settings({})  # a variant without a key gets the module's default back
    assert bench.current_settings() == bench.DEFAULTS
    assert bench.DEFAULTS["causal_sdpa"] == "auto" and bench.DEFAULTS["moe_permute"] == "gather"
    with pytest.raises(SystemExit, match="unknown setting.*fused"):
        bench.apply_settings({"fused": True})


def test_synthetic_snapshot_is_a_readable_split(bench, tmp_path):
    reader = bench.synthetic_snapshot(tmp_path, rows=1100, seq_len=64, vocab=512)
    assert reader.num_rows == 1100 and len(list(tmp_path.glob("train-*.arrow"))) == 2
    tokens, mask = np.zeros((2, 65), dtype=np.int64), np.zeros((2, 65), dtype=np.uint8)
    reader.gather(np.array([0, 1099]), tokens, mask)
    assert reader.meta.max_seq_len == 64 and 0 < int(tokens.max()) < 512 - 9
    assert mask[:, 0].sum() == 0 and 0 < mask.mean() < 1


def test_rank_ops_names_the_op_and_shapes_behind_the_time(bench):
    """--profile's op table: the launching op with its input shapes, heaviest first, per step (here on CPU
    time: the GPU's is ranked the same way)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    a, b = torch.randn(512, 1024), torch.randn(1024, 512).t()  # a strided operand, as a fallback kernel gets
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):
            with record_function("a_span"):  # a user annotation, as the graphs' and Optimizer.step's are: no op
                for _ in range(20):
                    a * b
            torch.add(a[:4], 1.0)
    ops = bench.rank_ops(prof, steps=2, top=50, device=False)
    names = [op for op, _, _ in ops]
    assert "aten::mul" in names and "aten::add" in names and "a_span" not in names
    assert [ms for _, _, ms in ops] == sorted((ms for _, _, ms in ops), reverse=True)
    mul = next(r for r in ops if r[0] == "aten::mul")
    add = next(r for r in ops if r[0] == "aten::add")
    assert mul[1] == "[[512, 1024], [512, 1024]]" and mul[2] > add[2] > 0
    assert bench.rank_ops(prof, steps=2, top=50, device=True) == []  # a CPU-only profile has no GPU time


def test_profile_split_counts_the_compiled_graphs_run(bench):
    """--profile's graph count: a graph break is one more compiled graph per step (step 7's breaks in the layer
    loop showed as 24 graphs against 13); the graphs' own spans are not counted as kernel time."""
    import torch

    def whole(x):
        return (x * 2).sin() + 1

    def broken(x):
        x = (x * 2).sin()
        torch._dynamo.graph_break()
        return x + 1

    x = torch.randn(64)
    for fn, graphs in ((whole, 1), (broken, 2)):
        torch._dynamo.reset()
        compiled = torch.compile(fn)
        compiled(x)
        split, n, ranked, ops = bench.profile_split(lambda: compiled(x), steps=2, top=3)
        assert n == graphs, fn.__name__
        assert split == {"matmul": 0.0, "attention": 0.0, "other": 0.0} and ranked == []  # no GPU here
        assert ops == []  # ranked by GPU time, of which a CPU run has none


def test_kernel_times_leave_out_the_gpu_spans(bench):
    """Step 7's d20-moe profile filed the optimizer's GPU-side annotation (79 ms) as a kernel beside the kernels
    it covers; the graphs' spans likewise. Only real kernels are timed, per step."""
    from types import SimpleNamespace as Ev
    import torch
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [Ev(name="## Call CompiledFxGraph fabc", device_type=cuda, device_time=9000.0, is_user_annotation=True),
              Ev(name="## Call CompiledFxGraph fabc", device_type=cuda, device_time=9000.0, is_user_annotation=True),
              Ev(name="## Call CompiledFxGraph fdef", device_type=cpu, device_time=0.0, is_user_annotation=False),
              Ev(name="Optimizer.step#MuonAdamW.step", device_type=cuda, device_time=8000.0, is_user_annotation=True),
              Ev(name="nvjet_sm90_tst", device_type=cuda, device_time=3000.0, is_user_annotation=False),
              Ev(name="nvjet_sm90_tst", device_type=cuda, device_time=1000.0, is_user_annotation=False),
              Ev(name="triton_poi_fused_add", device_type=cuda, device_time=500.0, is_user_annotation=False),
              Ev(name="aten::mm", device_type=cpu, device_time=0.0, is_user_annotation=False)]
    per_kernel, graphs = bench.kernel_times(events, steps=2)
    assert per_kernel == {"nvjet_sm90_tst": 2.0, "triton_poi_fused_add": 0.25} and graphs == 2


def test_kernel_category_of_the_step_kernels(bench):
    """The split's buckets for kernels of a measured d12 step (bench/RESULTS.md, step 7): the fused MLP GEMM is
    a matmul, cuDNN's attention-backward helpers are attention, the fused elementwise kernels are other."""
    cases = {"relu2_matmul_kernel": "matmul", "nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_splitK_NTN": "matmul",
             "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128": "attention",
             "void cudnn::fusion::compute_dot_do_o_specialized<true, 128>(void const*, void const*)": "attention",
             "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)": "attention",
             "rotary_norm_bwd_kernel": "other", "softcap_ce_kernel": "other",
             "triton_poi_fused__unsafe_view_add_embedding_mul_sigmoid_unsqueeze_view_6": "other"}
    assert {name: bench.kernel_category(name) for name in cases} == cases
