"""minillm.plan and `minillm plan`: the formulas, the parsing, the report, and the figures against
memory measured on the CPU (saved activations in-process; weights, gradients and optimizer state
under torch's DDP, ZeroRedundancyOptimizer and FSDP2 on 2 gloo ranks, in subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minillm import cli
from minillm.model import LLM, ModelConfig
from minillm.plan import (
    GB, LAYOUTS, PlanError, activation_memory, communication, compute_optimal_tokens, engine_state, format_plan,
    parse_count, parse_gpus, plan, plan_from_config, resolve_model, shape_for, state_bytes, training_seconds, usable_bytes,
)

SMALL = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- the formulas ---------------------------------------------------------------------------------


def test_the_zero_papers_example():
    # Rajbhandari et al. (2020), Figure 1: Ψ = 7.5B, N = 64, mixed precision with Adam (K = 12).
    got = {s: round(state_bytes(7_500_000_000, 64, s, "mixed").total / GB, 1) for s in ("ddp", "zero1", "zero2", "zero3")}
    assert got == {"ddp": 120.0, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}


@pytest.mark.parametrize("layout, per_gpu", [
    # bytes per parameter on each of N GPUs: (replicated, sharded) for DDP, ZeRO-1, ZeRO-2, ZeRO-3
    ("minillm", {"ddp": (16, 0), "zero1": (8, 8), "zero2": (4, 12), "zero3": (0, 16)}),
    ("mixed", {"ddp": (16, 0), "zero1": (4, 12), "zero2": (2, 14), "zero3": (0, 16)}),
])
def test_per_gpu_formulas(layout, per_gpu):
    psi, n = 1_000_000_000, 8
    for strategy, (replicated, sharded) in per_gpu.items():
        assert state_bytes(psi, n, strategy, layout).total == replicated * psi + sharded * psi // n
        assert state_bytes(psi, 1, strategy, layout).total == 16 * psi  # one GPU shards nothing
    lay = LAYOUTS[layout]
    s = state_bytes(psi, n, "zero2", layout)
    assert (s.weights, s.grads, s.optimizer) == (lay.weight_bytes * psi, lay.grad_bytes * psi // n, lay.optimizer_bytes * psi // n)
    assert state_bytes(10, 4, "zero3", layout).weights == 3 * lay.weight_bytes  # an uneven shard rounds up, as FSDP pads


def test_engine_state_counts_what_minillm_zero2_holds():
    # FSDP2 with reshard_after_forward=False and a bf16 policy: the fp32 weights stay sharded, and a
    # bf16 copy of every unit is held from its forward to its backward.
    psi, n = 1_000_000_000, 8
    s = engine_state(psi, n, "zero2", "minillm", "bfloat16")
    assert (s.weights, s.grads, s.optimizer) == (2 * psi + 4 * psi // n, 4 * psi // n, 8 * psi // n)
    for strategy, layout, dtype in [("zero2", "minillm", "float32"), ("zero2", "mixed", "bfloat16"),
                                    ("zero1", "minillm", "bfloat16"), ("zero3", "minillm", "bfloat16")]:
        assert engine_state(psi, n, strategy, layout, dtype) == state_bytes(psi, n, strategy, layout)
    assert engine_state(psi, 1, "zero2", "minillm") == state_bytes(psi, 1, "zero2", "minillm")  # one GPU shards nothing
    with pytest.raises(PlanError, match="unknown activation dtype"):
        engine_state(psi, n, "zero2", dtype="int8")


def test_communication_and_compute():
    assert [communication(s, 100, 8) for s in ("ddp", "zero1", "zero2", "zero3")] == [200, 200, 200, 300]
    assert communication("zero3", 100, 1) == 0
    assert compute_optimal_tokens(7_000_000_000) == 140_000_000_000
    assert training_seconds(1e12, 6e9, 8, 1e15, 0.5) == pytest.approx(1.5e6)
    p = plan("llama-7b", "8xH100", seq_len=4096)
    assert p.tokens == 20 * p.num_params
    assert p.seconds == pytest.approx(p.tokens * p.flops_per_token / (8 * 989e12 * 0.4))
    with torch.device("meta"):
        model = LLM(ModelConfig.preset("llama-7b"))
    assert (p.num_params, p.flops_per_token) == (model.num_parameters(), model.flops_per_token(4096))


def test_usable_memory_keeps_headroom():
    assert usable_bytes(80) == pytest.approx(71e9)
    assert usable_bytes(0.5) == 0


# -- activations against the tensors autograd saves ------------------------------------------------


def saved_bytes(model: LLM, batch: int, seq_len: int, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward, the parameters and buffers left out."""
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    g = torch.Generator().manual_seed(0)
    ids, targets = (torch.randint(0, model.cfg.vocab_size, (batch, seq_len), generator=g) for _ in range(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(ids, targets)[1]
    loss.backward()  # frees the graph: the hook's references to saved outputs would otherwise keep it alive
    return sum(n for ptr, n in seen.items() if ptr not in skip)


@pytest.mark.parametrize("shape", [
    SMALL,  # Llama: RMSNorm, SwiGLU, RoPE
    {**SMALL, "n_layers": 3, "n_kv_heads": 2, "d_ff": 96},  # grouped-query attention
    {**SMALL, "norm": "layernorm", "mlp": "gelu", "position": "learned", "bias": True, "tie_embeddings": True},  # GPT-2
])
@pytest.mark.parametrize("mode", ["float32", "autocast", "bf16 weights"])
def test_activations_equal_the_saved_tensors(shape, mode):
    cfg = ModelConfig(**shape)
    torch.manual_seed(0)
    model = LLM(cfg)
    if mode == "bf16 weights":
        model = model.to(torch.bfloat16)
    autocast = mode == "autocast"
    T = 32
    one, three = saved_bytes(model, 1, T, autocast), saved_bytes(model, 3, T, autocast)
    per_sequence = (three - one) // 2
    est = activation_memory(cfg, 1, T, dtype="float32" if mode == "float32" else "bfloat16",
                            weight_bytes=2 if mode == "bf16 weights" else 4, device="cpu")
    assert per_sequence == est.full  # to the byte
    # What does not grow with the batch: autocast's bf16 copy of each matrix (the planner's buffers),
    # and a few bytes (the loss's weight total; learned positions' indices).
    matrices = sum({id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}.values())
    assert 0 <= one - per_sequence - (2 * matrices if autocast else 0) <= 8 * T + 4


def test_checkpointing_keeps_block_inputs():
    cfg = ModelConfig.preset("llama-7b")
    a = activation_memory(cfg, 2, 4096)
    assert a.tokens == 8192 and a.layer_input == 4 * cfg.d_model  # the fp32 residual stream
    assert a.checkpointed == 8192 * (32 * a.layer_input + a.per_layer - a.layer_input + a.outside)
    assert a.checkpointed < a.full / 5
    # Llama 7B under bf16 autocast: about 7.7 MB per token without checkpointing, 0.9 MB with.
    assert round(a.full / a.tokens / 1e6, 1) == 7.7 and round(a.checkpointed / a.tokens / 1e6, 1) == 0.9


# -- parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, memory, peak, expected", [
    ("8xH100", None, None, (8, "H100", 80, 989e12)),
    ("h200", None, None, (1, "H200", 141, 989e12)),
    ("4 x a100", None, None, (4, "A100", 80, 312e12)),
    ("2*H100", None, None, (2, "H100", 80, 989e12)),
    ("8xH100", 94, None, (8, "H100", 94, 989e12)),  # H100 NVL
    ("4xL40S", 48, None, (4, "L40S", 48, 362e12)),  # in minillm.train's FLOP/s table, memory given
    ("16", 24, 1.65e14, (16, "GPU", 24, 1.65e14)),
])
def test_parse_gpus(text, memory, peak, expected):
    n, gpu = parse_gpus(text, memory, peak)
    assert (n, gpu.name, gpu.memory_gb, gpu.peak_flops) == expected


@pytest.mark.parametrize("text, memory, peak, message", [
    ("8xV100", None, None, "unknown GPU 'V100'; known: A100, H100, H200"),
    ("0xH100", None, None, "at least one GPU"),
    ("8", None, None, "names no GPU"),
    ("8", 80, None, "names no GPU"),
    ("", None, None, "COUNTxNAME"),
    ("eight H100s", None, None, "COUNTxNAME"),
    ("-1xH100", None, None, "COUNTxNAME"),
    ("8xL40S", None, None, "--gpu-memory"),
    ("8xH100", -80, None, "--gpu-memory (GB per GPU) must be a positive number"),
    ("8xH100", None, float("nan"), "--peak-flops"),
])
def test_parse_gpus_errors(text, memory, peak, message):
    with pytest.raises(PlanError) as e:
        parse_gpus(text, memory, peak)
    assert message in str(e.value)


@pytest.mark.parametrize("text, expected", [
    ("125M", 125_000_000), ("3B", 3_000_000_000), ("1.5b", 1_500_000_000), ("7e9", 7_000_000_000),
    ("350_000_000", 350_000_000), ("1,000,000", 1_000_000), ("2T", 2_000_000_000_000), (" 70 B ", 70_000_000_000),
])
def test_parse_count(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize("text, message", [
    ("abc", "not a parameter count"), ("-5", "not a parameter count"), ("nan", "not a parameter count"),
    ("inf", "not a parameter count"), ("", "not a parameter count"), ("7x", "not a parameter count"),
    ("0", "a model needs some"), ("3", "did you leave out the unit (e.g. 3B)"), ("1e99", "stops at 10T"),
])
def test_parse_count_errors(text, message):
    with pytest.raises(PlanError) as e:
        parse_count(text)
    assert message in str(e.value)


def test_a_count_becomes_a_preset_or_a_derived_shape():
    assert resolve_model("125M")[:2] == ("gpt2-small", ModelConfig.preset("gpt2-small"))
    assert resolve_model("7B")[0] == "llama-7b"
    name, cfg, note = resolve_model("13B")
    assert "derived" in name and "Llama-style shape" in note
    with torch.device("meta"):
        n = LLM(cfg).num_parameters()
    assert abs(n - 13e9) <= 0.03 * 13e9
    assert (cfg.d_model, cfg.n_layers, cfg.head_dim) == (5120, 40, 128)  # Llama 2 13B's shape, found from the count
    for count in (20e6, 500e6, 2e9, 70e9, 1e12):
        cfg = shape_for(int(count))
        assert cfg.d_model % 128 == 0 and cfg.head_dim in (64, 128) and cfg.n_layers >= 1
    with pytest.raises(PlanError, match="unknown model 'gpt5'"):
        resolve_model("gpt5")


def test_bad_plan_inputs():
    for kwargs, message in [
        (dict(batch_size=0), "micro-batch"), (dict(seq_len=-1), "--seq-len"), (dict(mfu=0), "--mfu"),
        (dict(mfu=1.5), "--mfu"), (dict(tokens_per_param=0), "--tokens-per-param"), (dict(layout="fp8"), "unknown layout"),
        (dict(dtype="int8"), "activation dtype"), (dict(layout="mixed", dtype="float32"), "--dtype bfloat16"),
    ]:
        with pytest.raises(PlanError) as e:
            plan("gpt2-small", "1xH100", **kwargs)
        assert message in str(e.value), kwargs


# -- recommendations ---------------------------------------------------------------------------------


def test_recommendations():
    p = plan("gpt2-small", "1xH100")
    assert p.recommendation.strategy == "single" and not p.recommendation.checkpointing
    assert p.recommendation.command == "minillm train --set model=gpt2-small --set seq_len=1024 --set batch_size=1"
    assert [r.strategy for r in p.rows] == ["single", "single"]

    p = plan("llama-7b", "8xH100", seq_len=4096, batch_size=1)
    assert not p.row("ddp").fits and not p.row("zero1").fits and p.row("zero2").fits and p.row("zero3").fits
    assert p.recommendation.strategy == "zero2"  # the least traffic that fits
    assert p.recommendation.command == ("torchrun --standalone --nproc_per_node 8 -m minillm train --set model=llama-7b "
                                        "--set seq_len=4096 --set batch_size=1 --set strategy=zero2")

    p = plan("13B", "8xH100", seq_len=2048, batch_size=1)  # its bf16 weights, gathered whole, leave too little room
    assert not p.row("zero2").fits and p.row("zero3").fits
    assert (p.recommendation.strategy, p.recommendation.checkpointing) == ("zero3", False)
    assert p.recommendation.command.endswith("--set strategy=fsdp")

    p = plan("llama-7b", "8xH100", seq_len=4096, batch_size=2)  # activations outgrow FSDP alone
    assert (p.recommendation.strategy, p.recommendation.checkpointing) == ("zero2", True)
    assert p.recommendation.command.endswith("--set strategy=zero2 --set activation_checkpointing=true")

    for model, gpus in (("70B", "8xH100"), ("llama-7b", "1xH100")):
        p = plan(model, gpus, seq_len=4096)
        assert p.recommendation.strategy is None and p.recommendation.command is None
        assert "does not fit" in p.recommendation.reason and "tensor or pipeline parallelism" in p.recommendation.reason
        needed = p.recommendation.gpus_needed
        assert f"FSDP with checkpointing fits on {needed} of these GPUs" in p.recommendation.reason
        assert plan(model, f"{needed}xH100", seq_len=4096).recommendation.strategy is not None
        assert plan(model, f"{needed - 1}xH100", seq_len=4096).recommendation.strategy is None

    p = plan("llama-7b", "8xH100", seq_len=4096, batch_size=32)  # too large a micro-batch: a smaller one fits
    assert p.recommendation.strategy is None
    assert "FSDP/ZeRO-3 + checkpointing fits --batch 11 (accumulate gradients" in p.recommendation.reason
    p = plan("llama-7b", "8xH100", seq_len=262144)  # one sequence is too long for any number of these GPUs
    assert p.recommendation.gpus_needed is None and "context parallelism" in p.recommendation.reason

    p = plan("llama-1b", "16xH100", batch_size=4)
    assert p.recommendation.command.startswith("torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d ")

    p = plan("3B", "1xH100")  # a derived shape: the command rebuilds it from a preset and overrides
    assert "--set model.d_model=3072 --set model.n_layers=25" in p.recommendation.command


def test_max_batch_is_the_largest_that_fits():
    for strategy in ("ddp", "zero3"):
        row = plan("llama-1b", "8xH100", batch_size=1).row(strategy)
        assert plan("llama-1b", "8xH100", batch_size=row.max_batch).row(strategy).fits
        assert not plan("llama-1b", "8xH100", batch_size=row.max_batch + 1).row(strategy).fits


def test_plan_from_a_training_config():
    p = plan_from_config("configs/gpt2-124m.toml", "8xH100")
    assert (p.model_name, p.seq_len, p.batch_size) == ("gpt2-small", 1024, 64)
    assert "-m minillm train --config configs/gpt2-124m.toml --set strategy=" in p.recommendation.command
    p = plan_from_config("configs/gpt2-124m.toml", "8xH100", batch_size=8)
    assert "--config configs/gpt2-124m.toml --set batch_size=8 --set strategy=ddp" in p.recommendation.command
    with pytest.raises(PlanError, match="no such config file"):
        plan_from_config("configs/missing.toml")


def test_the_report_fits_88_columns_and_its_command_still_pastes():
    for p in (plan("llama-7b", "8xH100", seq_len=2048), plan("llama-1b", "16xH100", batch_size=4),
              plan("llama-7b", "8xH100", seq_len=2048, batch_size=16),
              plan("3B", "1xH100"), plan("125M", "1xH100", batch_size=16), plan("llama-7b", "8xH100", seq_len=262144)):
        text = format_plan(p)
        assert max(len(line) for line in text.splitlines()) <= 88, text
        if p.recommendation.command:  # the printed lines, joined at their backslashes, are the command
            printed = text[text.index("\n  " + p.recommendation.command.split()[0] + " ") + 3:]
            assert " ".join(part.strip() for part in printed.split("\\\n")) == p.recommendation.command


# -- the command -------------------------------------------------------------------------------------


def test_cli_prints_the_table_and_the_recommendation(capsys):
    code, out, err = run(capsys, "--model", "gpt2-small", "--gpus", "1xH100")
    assert code == 0 and err == ""
    assert "single GPU + checkpointing" in out and "recommended  single GPU" in out
    assert "  minillm train --set model=gpt2-small --set seq_len=1024 --set batch_size=1\n" in out

    code, out, _ = run(capsys, "--model", "124M", "--gpus", "h100")
    assert code == 0 and "124M parameters -> the gpt2-small preset" in out and "recommended  single GPU" in out

    code, out, _ = run(capsys, "--model", "llama-7b", "--gpus", "8xH100", "--seq-len", "4096", "--batch", "1")
    assert code == 0 and out == format_plan(plan("llama-7b", "8xH100", seq_len=4096, batch_size=1)) + "\n"
    for line in ("DDP ", "ZeRO-1 ", "ZeRO-2 ", "FSDP/ZeRO-3 ", "FSDP/ZeRO-3 + checkpointing", "2Ψ", "3Ψ", "days on 8 x H100"):
        assert line in out
    assert "recommended  ZeRO-2" in out and "--nproc_per_node 8" in out and "--set strategy=zero2" in out

    code, out, _ = run(capsys, "--model", "7B", "--gpus", "8", "--gpu-memory", "141", "--peak-flops", "989e12",
                       "--layout", "mixed", "--mfu", "0.5", "--tokens-per-param", "100")
    assert code == 0 and "mixed, 2 + 2 + 12 bytes" in out and "674B tokens" in out and "50% MFU" in out

    code, out, _ = run(capsys, "--model", "70B", "--gpus", "8xH100")
    assert code == 0 and "does not fit on these GPUs" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-7b", "--gpus", "8xV100"], "unknown GPU 'V100'"),
    (["--model", "llama-7b", "--gpus", "0xH100"], "at least one GPU"),
    (["--model", "llama-7b", "--gpus", "8"], "--gpu-memory"),
    (["--model", "banana"], "unknown model 'banana'"),
    (["--model", "3"], "did you leave out the unit"),
    (["--model", "gpt2-small", "--batch", "0"], "positive integer"),
    (["--model", "gpt2-small", "--mfu", "0"], "--mfu"),
    (["--config", "no/such.toml"], "no such config file"),
    (["--gpus", "1xH100"], "one of the arguments --model --config is required"),
    (["--model", "tiny", "--config", "configs/tiny.toml"], "not allowed with argument"),
    (["--model", "tiny", "--seq-len", "long"], "invalid int value"),
    (["--model", "tiny", "--layout", "fp8"], "invalid choice"),
])
def test_cli_user_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("minillm plan: error: ") and message in err


# -- weights, gradients and optimizer state, measured on 2 ranks -------------------------------------

# One launch of 2 gloo ranks runs every strategy with torch's own engines, and each rank writes the
# bytes it holds: the local parameters (an FSDP2 DTensor counts its local shard), the local
# gradients after backward, the optimizer state after the step.
WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.distributed.tensor import DTensor
    from minillm.model import LLM, ModelConfig

    def nbytes(tensors):
        local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors)
        return sum(t.numel() * t.element_size() for t in local)

    def optimizer_bytes(opt):
        return nbytes(v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))

    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cfg = ModelConfig(**json.loads(sys.argv[4]))
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    result = {}
    for strategy in ("single", "ddp", "zero1", "zero2", "zero3"):
        torch.manual_seed(0)
        model = LLM(cfg)
        if strategy in ("ddp", "zero1"):
            model = torch.nn.parallel.DistributedDataParallel(model)
        if strategy in ("zero2", "zero3"):
            # FSDP2 per block and at the root. reshard_after_forward=True is ZeRO-3: the weights are
            # gathered for forward, freed, and gathered again for backward. With False the gathered
            # weights stay from forward through backward, gradients and optimizer state stay sharded:
            # ZeRO-2 for the duration of the step, so its weights are counted after forward. (Unlike
            # the ZeRO paper's ZeRO-2 it keeps its fp32 shard besides and frees the full weights after
            # backward; the formula counts the full weights once.)
            for block in model.blocks:
                fully_shard(block, reshard_after_forward=strategy == "zero3")
            fully_shard(model, reshard_after_forward=strategy == "zero3")
        if strategy == "zero1":
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt.zero_grad(set_to_none=True)
        loss = model(ids, ids)[1]
        weights_in_step = nbytes(model.parameters())
        loss.backward()
        grads = nbytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        weights = weights_in_step if strategy == "zero2" else nbytes(model.parameters())
        result[strategy] = dict(weights=weights, grads=grads,
                                optimizer=optimizer_bytes(opt.optim if strategy == "zero1" else opt))
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    os._exit(0)  # gloo can abort at interpreter exit after all work is done; the results are written
''')


@pytest.mark.slow
def test_planned_state_equals_memory_measured_on_2_ranks(tmp_path):
    # GQA and tied embeddings: a tied matrix is one parameter, counted, sharded and updated once.
    shape = {**SMALL, "n_kv_heads": 2, "tie_embeddings": True}
    (tmp_path / "worker.py").write_text(WORKER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(rank), str(tmp_path / "store"),
                               str(tmp_path / f"rank{rank}.json"), json.dumps(shape)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for rank in range(2)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=120)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the 2-rank run did not finish in 120 s")
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)

    with torch.device("meta"):
        num_params = LLM(ModelConfig(**shape)).num_parameters()
    rows = [f"{'strategy':<8}{'rank':>5}{'part':>11}{'measured':>11}{'planned':>11}{'diff':>8}"]
    for rank in range(2):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for strategy, got in measured.items():
            planned = state_bytes(num_params, 1 if strategy == "single" else 2, strategy, "minillm")
            got["total"] = sum(got.values())
            for part in ("weights", "grads", "optimizer", "total"):
                want = planned.total if part == "total" else getattr(planned, part)
                rows.append(f"{strategy:<8}{rank:>5}{part:>11}{got[part]:>11,}{want:>11,}{got[part] / want - 1:>+8.2%}")
                assert abs(got[part] - want) <= 0.05 * want, "\n".join(rows)
    print("\n".join(rows))
