"""Run a stage module sharded over CPU processes, and say how it was sharded (a test instrument).

    accelerate launch --config_file infra/accelerate/fsdp.yaml --num_processes 2 \
        tests/sharded_cpu.py steps.rft --params ... --out ...

FSDP: accelerate chooses FSDP only when the machine has an accelerator; on CPU its state says
MULTI_CPU and the trainers would quietly train as plain DDP (which is why `launcher.config:
fsdp.yaml` is refused on a CPU-only machine, steps.core.launch.check_config). Everything FSDP does
after that choice is device-agnostic: FSDP2's `fully_shard` over the wrap policy's units, gloo's
all-gather and reduce-scatter, the gathered FULL_STATE_DICT on save. So for an FSDP config this
instrument lets accelerate build its state for CPU processes as usual (gloo, the CPU device), then
makes the one decision a GPU would have made — the distributed type FSDP, with the plugin the
launcher's environment describes — and runs the stage. From there the stage, TRL's trainer and
accelerate take their GPU code path.

DeepSpeed (zero2.yaml, zero3.yaml) needs no such help: accelerate and DeepSpeed's CPU accelerator
run it over gloo as they are. The instrument only probes it.

With `SHARD_PROBE_DIR` set, each process writes `rank<N>.json` once its model is sharded — FSDP:
the prepared model's class and, per parameter, whether it is a DTensor and its local and full
shapes; DeepSpeed: the ZeRO stage, the parameters' and the optimiser's elements in all and held by
this process — so that a test sees that the model was sharded, and how.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path


def _write(probe: dict) -> None:
    directory = os.environ.get("SHARD_PROBE_DIR")
    if directory:
        Path(directory, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(probe))


def _fsdp_probe(model) -> dict:
    from torch.distributed.tensor import DTensor

    return {"kind": "fsdp", "class": type(model).__name__,
            "params": {name: {"sharded": isinstance(p, DTensor),
                              "local_shape": list((p.to_local() if isinstance(p, DTensor) else p).shape),
                              "full_shape": list(p.shape)}
                       for name, p in model.named_parameters()}}


def _deepspeed_probe(engine, optimizer) -> dict:
    stage = engine.zero_optimization_stage()
    params = list(engine.module.parameters())
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    if stage == 3:  # the fp32 master partitions of ZeRO-3's optimiser
        opt_held = sum(t.numel() for t in optimizer.fp32_partitioned_groups_flat)
    else:  # ZeRO-1/2
        opt_held = sum(t.numel() for t in optimizer.single_partition_of_fp32_groups)
    return {"kind": "deepspeed", "stage": stage, "param_numel": full, "param_numel_held": held,
            "optimizer_numel_held": opt_held}


def fsdp_as_on_a_gpu() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    build_state = AcceleratorState.__init__

    def build(self, *args, **kwargs):
        # The trainer builds (and TrainingArguments resets) accelerate's state itself: the decision
        # is taken after each build, once accelerate has set up gloo and the CPU device.
        build_state(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            # the trainer's own plugin if it passed one, else the launcher's FSDP_* environment
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()

    AcceleratorState.__init__ = build

    import accelerate.accelerator as acc

    shard = acc.fsdp2_prepare_model  # what Accelerator.prepare calls for FSDP2

    def shard_and_probe(accelerator, model):
        model = shard(accelerator, model)
        _write(_fsdp_probe(model))
        return model

    acc.fsdp2_prepare_model = shard_and_probe


def probe_deepspeed() -> None:
    import deepspeed

    initialize = deepspeed.initialize  # accelerate reads it from the module when it prepares

    def initialize_and_probe(*args, **kwargs):
        engine, optimizer, *rest = initialize(*args, **kwargs)
        _write(_deepspeed_probe(engine, optimizer))
        return (engine, optimizer, *rest)

    deepspeed.initialize = initialize_and_probe


def main() -> None:
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp_as_on_a_gpu()
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        probe_deepspeed()
    else:
        raise SystemExit("tests/sharded_cpu.py: run me with `accelerate launch --config_file "
                         "infra/accelerate/{fsdp,zero2,zero3}.yaml`")
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
