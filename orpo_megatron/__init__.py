"""orpo-megatron: ORPO alignment training for Mixtral-class mixture-of-experts models on Megatron-Core."""
import warnings

# Megatron-Core warns at import when Apex / Transformer Engine are absent; that is the expected state on CPU
# machines (and our local spec does not use them), so keep the console for messages that need action.
warnings.filterwarnings("ignore", message=".*(Transformer Engine and Apex are not installed|Apex is not installed).*")
