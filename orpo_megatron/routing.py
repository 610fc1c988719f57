"""MoE routing statistics of training steps: how each layer's router spreads the real tokens over its experts.

Forward hooks on the routers of this rank's model chunks count, per MoE layer, the real tokens (padding excluded)
each expert receives and sum the entropy of the router's softmax over experts. They record only while
`RoutingStats.recording` is on (the trainer turns it on for log steps) and only in the pass that builds the
autograd graph: under recomputation the router runs twice, and the recomputed pass is the one counted, as for
Megatron's load-balancing loss. The sums stay on the device; `RoutingStats.metrics` reduces them over all ranks in
one collective and reads back once.

Layers are numbered as in the HF checkpoint (`model.layers.<i>`, from 0). Loads are relative to the layer's mean
expert load (1.0 = balanced): `max_load` is the busiest expert's, `min_load` the idlest's.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

LOAD_BALANCING = "load_balancing_loss"  # Megatron's name in its aux-loss tracker


class RoutingStats:
    """Per-layer expert counts and router entropy of the steps run while `recording` is on."""

    def __init__(self, model_chunks: list[torch.nn.Module], num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.is_recording = False
        self._sums: torch.Tensor | None = None  # [layers, experts + 2]: counts, entropy sum, real tokens
        routers = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
        self._handles = [router.register_forward_hook(self._record, with_kwargs=True) for router in routers]
        config = routers[0].config if routers else None
        # Without sequence parallelism every TP rank routes the same tokens: one of them counts them.
        self._counts_here = bool(config is None or config.sequence_parallel
                                 or parallel_state.get_tensor_model_parallel_rank() == 0)

    @contextlib.contextmanager
    def recording(self):
        """Count the routing of the passes run inside (a training step's forward and backward)."""
        self._sums = None
        self.is_recording = True
        try:
            yield
        finally:
            self.is_recording = False

    def _record(self, router: TopKRouter, args: tuple, kwargs: dict, output: tuple) -> None:
        if not (self.is_recording and self._counts_here and router.training and torch.is_grad_enabled()):
            return
        hidden = args[0] if args else kwargs["input"]
        padding = args[1] if len(args) > 1 else kwargs.get("padding_mask")  # [S, B], True at padding
        _, routing_map = output
        with torch.no_grad():
            logits = router.gating(hidden).reshape(-1, self.num_experts)
            real = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device) if padding is None \
                else ~padding.reshape(-1)
            if self._sums is None:
                self._sums = torch.zeros(self.num_layers, self.num_experts + 2, dtype=torch.float64,
                                         device=logits.device)
            row = self._sums[router.layer_number - 1]
            row[: self.num_experts] += (routing_map & real[:, None]).sum(0)
            entropy = torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)
            row[self.num_experts] += (entropy * real).sum()
            row[self.num_experts + 1] += real.sum()

    def metrics(self, num_micro_batches: int) -> dict[str, float]:
        """`moe/...` metrics of the recorded steps, over every rank; Megatron's per-layer load-balancing loss
        (without its coefficient, averaged over micro-batches and DP ranks) where the router computes one. A
        collective: call on every rank."""
        sums = self._sums
        if sums is None:  # no router on this rank, or one that did not run: contribute zeros
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            sums = torch.zeros(self.num_layers, self.num_experts + 2, dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        load_balancing = moe_load_balancing_losses(num_micro_batches)
        return routing_metrics(sums.cpu(), load_balancing)


def moe_load_balancing_losses(num_micro_batches: int) -> torch.Tensor | None:
    """Megatron's load-balancing loss of the last training pass per layer, without its coefficient, averaged over
    micro-batches and data-parallel ranks (None when the router computes none). A collective."""
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if LOAD_BALANCING not in tracker:
        return None
    moe_utils.reduce_aux_losses_tracker_across_ranks([LOAD_BALANCING])
    return tracker[LOAD_BALANCING]["values"].double().cpu() / num_micro_batches


def routing_metrics(sums: torch.Tensor, load_balancing: torch.Tensor | None) -> dict:
    """Metrics from the summed [layers, experts + 2] table (expert counts, entropy sum, real tokens); layers that
    routed no token (dense layers) are left out."""
    num_experts = sums.shape[1] - 2
    per_layer = {}  # layer -> (expert loads, that layer's metrics)
    for layer, row in enumerate(sums):
        counts, tokens = row[:num_experts], row[num_experts + 1]
        if tokens == 0:
            continue
        loads = counts / counts.mean()
        values = {"max_load": loads.max().item(), "min_load": loads.min().item(),
                  "dead_experts": int((counts == 0).sum()), "router_entropy": (row[num_experts] / tokens).item()}
        if load_balancing is not None:
            values["load_balancing_loss"] = load_balancing[layer].item()
        per_layer[layer] = (loads, values)
    if not per_layer:
        return {}
    metrics = {f"moe/layer_{layer}/{name}": value for layer, (_, values) in per_layer.items()
               for name, value in values.items()}
    layers = [values for _, values in per_layer.values()]
    metrics["moe/max_load"] = max(values["max_load"] for values in layers)
    metrics["moe/min_load"] = min(values["min_load"] for values in layers)
    metrics["moe/dead_experts"] = sum(values["dead_experts"] for values in layers)
    metrics["moe/router_entropy"] = sum(values["router_entropy"] for values in layers) / len(layers)
    if load_balancing is not None:
        metrics["moe_load_balancing_loss"] = load_balancing.sum().item()
    # The heat map's data (tools/plot_metrics.py): metrics.jsonl only, as one list per layer.
    metrics["moe/expert_load"] = {str(layer): loads.tolist() for layer, (loads, _) in per_layer.items()}
    return metrics
