"""The accelerate configs in configs/accelerate/ load with accelerate's own loader and hold what
docs/scaling.md relies on; nothing is launched."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, prepare_multi_gpu_env
from accelerate.utils.dataclasses import get_module_class_from_name

from gateskip import add_gates
from gateskip.core.model import decoder_layers

from conftest import tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def load(name: str) -> ClusterConfig:
    return load_config_from_file(str(CONFIGS / name))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_as_a_local_cluster_config(path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)  # not a SageMaker config
    assert config.num_processes >= config.num_machines >= 1
    assert config.num_processes % config.num_machines == 0  # the same number of processes on every machine
    assert config.machine_rank == 0


def test_one_machine_configs_say_what_the_guide_says():
    gpu, fsdp = load("ddp_gpu.yaml"), load("fsdp.yaml")
    assert (gpu.distributed_type, gpu.gpu_ids, gpu.use_cpu) == (DistributedType.MULTI_GPU, "all", False)
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert all(c.num_machines == 1 for c in (gpu, fsdp))


def test_fsdp_wraps_the_gated_decoder_layers_of_the_configs_family_by_their_hf_class_name():
    model = add_gates(tiny_model("llama"))
    name = load("fsdp.yaml").fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    # accelerate's name-based wrapping looks the class up exactly like this
    assert get_module_class_from_name(model, name) is type(decoder_layers(model)[0])


@pytest.mark.parametrize("family, name", [("qwen2", "Qwen2DecoderLayer"), ("gemma3", "Gemma3DecoderLayer")])
def test_other_families_are_wrapped_by_the_name_the_guide_gives(family, name):
    model = add_gates(tiny_model(family))
    assert get_module_class_from_name(model, name) is type(decoder_layers(model)[0])


def test_multinode_config_marks_its_placeholders():
    config = load("multinode.yaml")
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_machines == 2
    assert config.main_process_ip == "MAIN_MACHINE_IP"  # never a real address: a forgotten edit cannot reach some machine
    assert isinstance(config.main_process_port, int)
    assert config.rdzv_backend == "static"  # machine ranks come from --machine_rank


def test_multinode_launch_on_the_second_machine_runs_its_share_of_the_processes():
    """What `accelerate launch --config_file multinode.yaml --machine_rank 1 -m gateskip.training ...` hands
    torchrun: num_processes is the total, split evenly over the machines; the command line's
    --machine_rank overrides the file's 0."""
    argv = ["--config_file", str(CONFIGS / "multinode.yaml"), "--machine_rank", "1",
            "-m", "gateskip.training", "smollm2-135m", "--out", "/shared/runs/x"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    prepare_multi_gpu_env(args)
    total = load("multinode.yaml").num_processes
    assert (int(args.nproc_per_node), int(args.nnodes), args.node_rank) == (total // 2, 2, 1)
    assert args.rdzv_endpoint == "MAIN_MACHINE_IP:29500"
    assert (args.training_script, args.training_script_args) == ("gateskip.training", argv[-3:])
