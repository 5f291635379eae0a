"""The FlashInfer backend: its page layout and plan reuse on any machine (against a stand-in for
FlashInfer that follows its documented contract), and FlashInfer itself against the reference
kernels and the Triton engine on CUDA where it is installed."""

import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from kernel_testing import DEVICE, close, pack_prefill, paged_pool  # noqa: E402

from kairos.kernels import get_backend  # noqa: E402
from kairos.kernels import reference as ref  # noqa: E402
from kairos.kernels.flashinfer_attention import FlashInferAttention, paged_kv_layout  # noqa: E402

HAS_FLASHINFER = torch.cuda.is_available() and importlib.util.find_spec("flashinfer") is not None
needs_flashinfer = pytest.mark.skipif(not HAS_FLASHINFER, reason="FlashInfer on CUDA")


@pytest.mark.parametrize("page", [1, 4, 16])
def test_page_layout_lists_every_token_slot_of_each_sequence(page):
    lengths = [1, page - 1 or 1, page, page + 1, 3 * page, 7 * page + 5]
    _, _, tables = paged_pool(lengths, 1, 8, page, torch.float32)
    tables = tables.cpu()
    indptr, indices, last = paged_kv_layout(tables, torch.tensor(lengths, dtype=torch.int32), page)
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    assert indptr[0] == 0 and indptr[-1] == len(indices)
    for s, n in enumerate(lengths):
        pages = indices[indptr[s] : indptr[s + 1]].tolist()
        assert 1 <= last[s] <= page and (len(pages) - 1) * page + last[s] == n
        from_layout = [p * page + i for p in pages for i in range(page)][:n]
        from_table = [tables[s, pos // page].item() * page + pos % page for pos in range(n)]
        assert from_layout == from_table


def test_backend_refuses_cpu_and_a_missing_flashinfer(monkeypatch):
    with pytest.raises(ValueError, match="runs on CUDA"):
        get_backend("flashinfer", "cpu")
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import fails as when not installed
    with pytest.raises(ValueError, match="needs FlashInfer installed"):
        get_backend("flashinfer", "cuda")


def attend(q, keys, values, scale, causal):
    """q [n, Hq, D] over keys/values [m, Hkv, D]; causal aligns the last query with the last key."""
    group = q.shape[1] // keys.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys.float().repeat_interleave(group, 1)) * scale
    if causal:
        n, m = q.shape[0], keys.shape[0]
        visible = torch.arange(m, device=q.device) <= torch.arange(n, device=q.device).unsqueeze(1) + (m - n)
        scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values.float().repeat_interleave(group, 1))
    return out.to(q.dtype)


class StandInWrapper:
    """FlashInfer's wrappers as documented: plan() records the batch's layout (page indices in
    indptr/indices/last_page_len form, or ragged offsets), run() attends over it."""

    plans = 0

    def __init__(self, workspace, layout, use_tensor_cores=False):
        assert layout == "NHD"

    def plan(self, qo_indptr, *args, causal=False, sm_scale=None, q_data_type=None, kv_data_type=None):
        StandInWrapper.plans += 1
        self.causal, self.scale = causal, sm_scale
        args = [a.clone() if torch.is_tensor(a) else a for a in args]  # what plan read, not later writes
        if len(args) == 6:  # decode: indptr (as qo_indptr), indices, last_page_len, heads, head dim, page size
            self.qo_indptr = torch.arange(len(qo_indptr), device=qo_indptr.device)
            self.pages = (qo_indptr.clone(), args[0], args[1], args[-1])
        elif len(args) == 7:  # paged prefill: qo_indptr, then the decode arguments
            self.qo_indptr, self.pages = qo_indptr.clone(), (*args[:3], args[-1])
        else:  # ragged prefill: qo_indptr, kv_indptr, heads, head dim
            self.qo_indptr, self.kv_indptr = qo_indptr.clone(), args[0]

    def run(self, q, *kv):
        out = torch.empty_like(q)
        for s in range(len(self.qo_indptr) - 1):
            q0, q1 = self.qo_indptr[s], self.qo_indptr[s + 1]
            if len(kv) == 2:  # ragged: k, v
                k0, k1 = self.kv_indptr[s], self.kv_indptr[s + 1]
                keys, values = kv[0][k0:k1], kv[1][k0:k1]
            else:
                indptr, indices, last, page = self.pages
                pages = indices[indptr[s] : indptr[s + 1]].long()
                length = (len(pages) - 1) * page + last[s]
                keys, values = (cache[pages].flatten(0, 1)[:length] for cache in kv[0])
            out[q0:q1] = attend(q[q0:q1], keys, values, self.scale, self.causal)
        return out


@pytest.fixture
def stand_in(monkeypatch):
    module = SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=StandInWrapper,
                             BatchPrefillWithPagedKVCacheWrapper=StandInWrapper,
                             BatchPrefillWithRaggedKVCacheWrapper=StandInWrapper)
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    StandInWrapper.plans = 0
    return FlashInferAttention()


def test_one_plan_serves_every_layer_until_the_metadata_change(stand_in):
    lengths = [1, 15, 16, 17, 40]
    k_cache, v_cache, tables = paged_pool(lengths, 2, 16, 16, torch.float16)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lengths), 8, 16, dtype=torch.float16, device=DEVICE)
    for _ in range(3):  # three layers of one forward pass
        out = stand_in.decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
        close(out, ref.decode_attention(q, k_cache, v_cache, tables, lens, 0.25), torch.float16)
    assert StandInWrapper.plans == 1
    lens[1] += 1  # written in place: the same tensor, other contents
    close(stand_in.decode_attention(q, k_cache, v_cache, tables, lens, 0.25),
          ref.decode_attention(q, k_cache, v_cache, tables, lens, 0.25), torch.float16)
    assert StandInWrapper.plans == 2
    stand_in.decode_attention(q, k_cache, v_cache, tables, lens.clone(), 0.25)  # a new tensor
    stand_in.decode_attention(q, k_cache, v_cache, tables, lens, 0.5)  # another scale
    assert StandInWrapper.plans == 4


@pytest.mark.parametrize("with_prefix", [False, True])
def test_prefill_reads_new_tokens_or_the_cached_context(stand_in, with_prefix):
    q_lens = [1, 17, 16, 5]
    prefixes = [0, 16, 32, 3] if with_prefix else [0] * len(q_lens)
    q, k, v, k_cache, v_cache, cu_q, cu_k, tables = pack_prefill(q_lens, prefixes, 2, 4, 16, 16, torch.float16)
    args = (q, k, v, k_cache, v_cache, cu_q, cu_k, tables if with_prefix else None, 0.25, max(q_lens))
    close(stand_in.prefill_attention(*args), ref.prefill_attention(*args), torch.float16)


def test_engine_plans_once_per_forward_pass(stand_in, monkeypatch):
    """Plan reuse rests on the engine handing each forward pass metadata tensors of its own (or
    written in place since): every pass must plan exactly once, at its first layer."""
    from kairos.engine import LLM, SamplingParams
    from kairos.engine.model import CausalLM

    prompts = [[5, 9, 4] * n for n in (1, 6, 11)]  # 3 to 33 tokens: a prefix of two blocks
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    # On the CPU everywhere: a GPU would replay decode from CUDA graphs captured before the swap.
    llm = LLM("tiny", device="cpu", dtype="float16", num_kv_blocks=64, max_model_len=256, max_num_batched_tokens=32)
    expected = llm.generate(prompts, params)  # the reference kernels
    for op in ("decode_attention", "prefill_attention"):
        monkeypatch.setattr(llm.runner.backend, op, getattr(stand_in, op))
    passes = []
    forward = CausalLM.forward
    monkeypatch.setattr(CausalLM, "forward", lambda self, *a: passes.append(1) or forward(self, *a))
    outputs = llm.generate(prompts, params)  # prompts over cached prefixes, chunked, then decode
    assert StandInWrapper.plans == len(passes) >= params.max_tokens
    for out, ref_out in zip(outputs, expected):
        assert out.token_ids == ref_out.token_ids
    assert llm.num_free_blocks == llm.num_total_blocks


def test_float32_is_refused_with_the_way_out(stand_in):
    k_cache, v_cache, tables = paged_pool([5], 1, 16, 16, torch.float32)
    q = torch.randn(1, 1, 16, device=DEVICE)
    lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        stand_in.decode_attention(q, k_cache, v_cache, tables, lens, 0.25)


# FlashInfer itself, on CUDA: the same comparisons as the Triton kernels' (head dims it builds).
GPU_DTYPES = [torch.float16, torch.bfloat16]


@needs_flashinfer
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim, page", [(64, 16), (128, 16), (128, 32)])
def test_flashinfer_decode_matches_the_reference(dtype, group, head_dim, page):
    lengths = [1, 15, 16, 17, 100, 300]
    k_cache, v_cache, tables = paged_pool(lengths, 2, head_dim, page, dtype)
    q = torch.randn(len(lengths), 2 * group, head_dim, device="cuda", dtype=dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    backend = get_backend("flashinfer", "cuda")
    out = backend.decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    close(out, ref.decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5), dtype)


@needs_flashinfer
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_flashinfer_prefill_matches_the_reference(dtype, group, with_prefix):
    q_lens = [1, 17, 16, 5, 40]
    prefixes = [0, 0, 32, 16, 3] if with_prefix else [0] * len(q_lens)
    q, k, v, k_cache, v_cache, cu_q, cu_k, tables = pack_prefill(q_lens, prefixes, 2, group, 128, 16, dtype)
    args = (q, k, v, k_cache, v_cache, cu_q, cu_k, tables if with_prefix else None, 128**-0.5, max(q_lens))
    close(get_backend("flashinfer", "cuda").prefill_attention(*args), ref.prefill_attention(*args), dtype)


@needs_flashinfer
def test_flashinfer_engine_matches_the_triton_engine(tmp_path):
    import transformers as tf

    from kairos.engine import LLM, SamplingParams

    config = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=512)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 17, 40, 33)]
    engines = {b: LLM(str(tmp_path), dtype="float16", backend=b, num_kv_blocks=64) for b in ("triton", "flashinfer")}
    assert engines["flashinfer"].runner.graphs is None  # planned on the host each step: eager decode
    # Prompts on their own (ragged), then again over their cached prefixes (paged).
    for _ in range(2):
        ours, theirs = (engines[b].prompt_logits(prompts) for b in ("flashinfer", "triton"))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    # Greedy decode: every token FlashInfer picks is the best, or within rounding of the best,
    # by the Triton engine's logits over the same text.
    outputs = engines["flashinfer"].generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        (logits,) = engines["triton"].prompt_logits([prompt + out.token_ids])
        steps = logits[len(prompt) - 1 : -1]
        chosen = steps.gather(1, torch.tensor(out.token_ids, device=steps.device).unsqueeze(1)).squeeze(1)
        assert (chosen >= steps.max(-1).values - 2e-2).all()
    for llm in engines.values():
        assert llm.num_free_blocks == llm.num_total_blocks
