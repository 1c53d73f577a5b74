"""torch.compile over whole GPU schedules, on CPU: phase_pt's warm-up must build every graph the h100x8 and gpu1
schedules need, so none is compiled inside the timed loop. A counting backend stands in for inductor: it records
each graph dynamo hands it and returns zeros shaped like the graph's outputs, so walking all ~1,300 steps (or ~10,000
micro-batches) costs only dynamo's guard checks. The model is narrow and shallow (the schedule, micro-batch sizes,
windows, MTP horizons, YaRN scale growth, untying and FP8 head are the presets'); on a GPU the Triton kernels and
FlashAttention are in the graphs as well, which bench/gpu_check.py counts there."""
import json
import socket

import pytest
import torch
import torch.distributed as dist

SMALL = ["--n-layers", "4", "--model-dim", "32", "--n-heads", "1", "--head-dim", "32", "--long-window-layers", "3",
         "--value-embed-layers", "1,3", "--val-every", "1000000", "--val-tokens", "4096", "--log-every", "200",
         "--checkpoint-every", "0", "--wandb", "disabled"]


def counting_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        metas = [o.meta["example_value"] if isinstance(o, torch.fx.Node) else o for o in outputs]
        if any(torch.is_tensor(m) and not all(isinstance(d, int) for d in m.shape) for m in metas):
            return gm.forward  # a symbolic output shape: run the graph itself

        def zeros(*args):
            return [torch.zeros(m.shape, dtype=m.dtype, requires_grad=m.requires_grad) if torch.is_tensor(m) else m
                    for m in metas]
        return zeros
    return backend


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("preset,world_size", [("h100x8", 8), ("gpu1", 1)])
def test_warm_up_compiles_every_graph_of_the_schedule(stack, tiny_data, tmp_path, monkeypatch, preset, world_size):
    graphs, at_warm_up_end = [], []
    real_compile, real_warm_up = torch.compile, stack.warm_up_compiled
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=counting_backend(graphs)))
    monkeypatch.setattr(stack, "fp8_supported", lambda device: True)  # as on an H100 (torch's CPU _scaled_mm runs it)

    def warm_up(*args):
        out = real_warm_up(*args)
        at_warm_up_end.append(len(graphs))
        return out

    monkeypatch.setattr(stack, "warm_up_compiled", warm_up)
    cfg = stack.parse_config(["--preset", preset, *SMALL, "--data-dir", tiny_data, "--run-dir", str(tmp_path)])
    assert cfg.compile and sum(s.steps for s in cfg.stages) == 1285
    # rank 0 of `world_size`: its micro-batches are the 8-GPU run's; collectives go to a one-process gloo group
    rt = stack.Runtime(torch.device("cpu"), torch.float32, 0, world_size, "sdpa")
    torch._dynamo.reset()
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        stack.phase_pt(cfg, rt, stack.Logger(cfg, rt))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch._dynamo.reset()
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert at_warm_up_end == [len(graphs)]  # the timed loop compiled nothing
    assert metrics["pt_compile_graphs"] == len(graphs) and 4 <= len(graphs) <= 12
    assert metrics["pt_compile_time_s"] > 0 and metrics["train_tokens"] == sum(s.steps * s.batch_tokens for s in cfg.stages)
    log = open(tmp_path / "log.txt").read()
    assert f"compiled {len(graphs)} graphs for steps 0-1285" in log and "step 1285/1285 val bpb" in log
