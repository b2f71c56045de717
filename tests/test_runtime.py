"""pretrain.runtime: the environment set up before DeepSpeed is imported."""


def test_deepspeed_arch_list_drops_architecture_suffixes_deepspeed_cannot_read():
    """DeepSpeed 0.19's op builder fails on TORCH_CUDA_ARCH_LIST="9.0a" (seen on an H100 image); the trainer rewrites
    it before DeepSpeed is imported and leaves plain lists alone."""
    from pretrain.runtime import deepspeed_arch_list

    assert deepspeed_arch_list("9.0a") == "9.0"
    assert deepspeed_arch_list("8.0;9.0a+PTX;10.0a") == "8.0;9.0+PTX;10.0"
    assert deepspeed_arch_list("7.0 8.6 9.0") == "7.0 8.6 9.0"
