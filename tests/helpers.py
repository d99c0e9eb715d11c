"""Comparisons shared by the tests: results that are exact only up to floating-point summation order, and host reads."""
import torch


def assert_same_topk(experts, ref_experts, ref_scores, atol):
    """`experts [..., k]` equal `ref_experts`, the top-k of `ref_scores [..., E]`, except where the reference itself
    is a near-tie: two computations of the same scores that agree within `atol` can only order two experts
    differently when their reference scores lie within 2 * atol of each other. Any other difference is a bug."""
    experts, ref_experts = experts.reshape(-1, experts.shape[-1]), ref_experts.reshape(-1, ref_experts.shape[-1])
    assert experts.shape == ref_experts.shape, (experts.shape, ref_experts.shape)
    rows = (experts != ref_experts).any(-1).nonzero().flatten()
    if not len(rows): return
    k = experts.shape[-1]
    top = ref_scores.reshape(-1, ref_scores.shape[-1])[rows].float().topk(min(k + 1, ref_scores.shape[-1]), -1).values
    min_gap = (top[:, :-1] - top[:, 1:]).min(-1).values
    bad = rows[min_gap > 2 * atol]
    assert not len(bad), (f"{len(bad)} tokens choose other experts than the reference although its scores are not "
                          f"tied within 2*atol={2 * atol:g} (first token {bad[0].item()}: {experts[bad[0]].tolist()} "
                          f"vs {ref_experts[bad[0]].tolist()})")


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    "Counts the ops that copy a tensor value to the host (`.item()`, `int(t)`, `bool(t)`): on CUDA each one is a sync."
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default: self.reads += 1
        return func(*args, **(kwargs or {}))


def tiny_mixtral_model(num_layers: int = 4, E: int = 6):
    "A tiny random Mixtral (hidden 64, vocabulary 128, top-2), seeded: what the conversion tests stream from a hub layout."
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=128, num_local_experts=E, num_experts_per_tok=2)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()
