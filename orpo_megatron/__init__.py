"""orpo-megatron: ORPO alignment training for Mixtral-class mixture-of-experts models on Megatron-Core."""
import warnings

# Warnings from inside Megatron-Core 0.16.1 that ask nothing of our users: missing Apex / Transformer Engine is
# the expected state on CPU (our local spec does not use them); the rest are deprecations of torch APIs that
# Megatron calls, and its distributed optimizer reading `.grad` of its fp32 shard views when zeroing them.
for _message in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "`load_state_dict` is deprecated",
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
):
    warnings.filterwarnings("ignore", message=f".*{_message}.*")
