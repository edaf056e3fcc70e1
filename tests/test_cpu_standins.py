"""The pure-torch stand-ins of vLLM 0.34's CPU ops (`tests/vllm_next/cpu_ops.py`), each on
hand-made inputs whose answers follow from the GPU runner's Triton kernel that it mirrors.

They run under `make test-vllm-next VLLM_NEXT=0.34.0` inside vLLM's engine; here they are
checked alone, in milliseconds, with no engine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "vllm_next_cpu_ops", Path(__file__).parent / "vllm_next" / "cpu_ops.py"
)
ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ops)

I32, I64 = torch.int32, torch.int64


def t(values, dtype=I32):
    return torch.tensor(values, dtype=dtype)


def test_every_op_of_vllm_cpu_ops_has_a_stand_in_and_a_schema():
    assert set(ops.SCHEMAS) == {
        "gather_block_table_cpu", "compute_slot_mapping_cpu", "prepare_prefill_inputs_cpu",
        "get_prompt_logprobs_token_ids_cpu", "prepare_pos_seq_lens_cpu",
        "prepare_mrope_positions_cpu", "combine_sampled_and_draft_tokens_cpu", "post_update_cpu",
        "gumbel_sample_cpu", "apply_logit_bias_cpu",
    }  # fmt: skip
    for name, schema in ops.SCHEMAS.items():
        assert schema.startswith(name + "(") and callable(getattr(ops, name))


def test_gather_block_table_copies_each_requests_blocks_and_zeroes_padding():
    table = t([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    out = torch.full((4, 3), -1, dtype=I32)
    ops.gather_block_table_cpu(table, out, t([2, 0]), t([1, 0, 2]), 3)
    assert out.tolist() == [[7, 8, -1], [1, -1, -1], [0, 0, 0], [-1, -1, -1]]


def test_slot_mapping_is_block_times_size_plus_offset_and_pads_the_rest():
    table = t([[5, 9], [2, 0]])
    slots = torch.full((8,), 7, dtype=I64)
    positions = t([0, 3, 4, 1, 0], I64)  # request 0 at 0, 3, 4; request 1 at 1; a dummy
    ops.compute_slot_mapping_cpu(table, slots, t([0, 1, -1]), t([0, 3, 4, 5]), positions, 4, True, -1)
    assert slots.tolist() == [20, 23, 36, 9, -1, -1, -1, -1]
    ops.compute_slot_mapping_cpu(table, slots, t([0]), t([0, 2]), positions, 4, False, -1)
    assert slots[:2].tolist() == [-1, -1]


def test_prefill_inputs_read_the_prompt_from_num_computed_and_the_next_tokens():
    all_ids = t([[10, 11, 12, 13, 14, 0], [20, 21, 22, 0, 0, 0]])
    input_ids = torch.zeros(5, dtype=I32)
    lookahead = torch.full((1, 2), -1, dtype=I32)
    # Request 0: 2 computed, 2 scheduled of 5; request 1: decoding (3 computed of 3).
    ops.prepare_prefill_inputs_cpu(input_ids, lookahead, t([0, 1]), t([0, 2, 3]), all_ids,
                                   t([5, 3]), t([2, 3]))  # fmt: skip
    assert input_ids.tolist()[:2] == [12, 13] and lookahead.tolist() == [[14, -1]]


def test_prompt_logprob_token_ids_are_the_next_prompt_tokens():
    all_ids = t([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    # Batch row 0 is request 1 (2 computed, 3 scheduled), row 1 request 0 (none computed).
    got = ops.get_prompt_logprobs_token_ids_cpu(5, t([0, 3, 5]), t([1, 0]), t([2, 0]), all_ids)
    assert got.tolist() == [21, 22, 23, 13, 14]


def test_positions_and_seq_lens():
    pos = torch.zeros(5, dtype=I64)
    seq_lens = torch.full((4,), 9, dtype=I32)
    ops.prepare_pos_seq_lens_cpu(t([1, 0]), t([0, 3, 5]), t([4, 7]), pos, seq_lens)
    assert pos.tolist() == [7, 8, 9, 4, 5] and seq_lens.tolist() == [10, 6, 0, 0]


def test_mrope_positions_read_prefill_rows_or_add_the_delta():
    dims = 3
    prefill = torch.arange(2 * dims * 6, dtype=I32).reshape(2 * dims, 6)
    positions = torch.zeros(dims, 4, dtype=I64)
    # Request 0 prefilling from 1 (2 tokens); request 1 decoding at 5 with delta 100.
    ops.prepare_mrope_positions_cpu(positions, prefill, t([0, 100]), t([0, 1]), t([0, 2, 3]),
                                    t([4, 5]), t([1, 5]))  # fmt: skip
    for j in range(dims):
        assert positions[j, :2].tolist() == prefill[j, 1:3].tolist()
        assert positions[j, 2].item() == 105


def test_combine_gives_logits_indices_and_writes_the_last_sampled_token_of_decodes():
    input_ids = t([1, 2, 3, 4, 5], I64)
    last = t([[70], [80]], I64)
    # Request 0 prefills 3 tokens of 3 (seq_len 3 = prefill_len); request 1 decodes 2 (1 draft).
    got = ops.combine_sampled_and_draft_tokens_cpu(
        input_ids, t([0, 1]), last, t([0, 3, 5]), t([3, 9]), t([3, 4]), t([[0], [99]], I64),
        t([0, 1, 3]), 3, 1,
    )  # fmt: skip
    assert got.tolist() == [2, 3, 4]
    assert input_ids.tolist() == [1, 2, 3, 80, 99]


def test_post_update_appends_the_sampled_tokens_and_advances():
    computed = t([3, 0])
    last = torch.zeros(2, 1, dtype=I64)
    counts = torch.zeros(2, 50, dtype=I32)
    all_ids = torch.zeros(2, 8, dtype=I32)
    total = t([3, 0])
    ops.post_update_cpu(t([0]), computed, last, counts, t([[42, 0]], I64), t([1]), t([0]),
                        t([0, 3]), all_ids, total)  # fmt: skip
    assert all_ids[0, 3].item() == 42 and total.tolist() == [4, 0] and last[0, 0].item() == 42
    assert counts[0, 42].item() == 1 and computed.tolist() == [6, 0]


def test_gumbel_sample_is_the_argmax_at_temperature_zero_and_seeded_otherwise():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    greedy = ops.gumbel_sample_cpu(logits, t([0, 1]), torch.tensor([0.0, 0.0]), t([1, 2], I64),
                                   t([0, 0], I64), True, False, False)  # fmt: skip
    assert greedy.tolist() == [1, 0]
    flat = torch.zeros(1, 1000)
    draws = [ops.gumbel_sample_cpu(flat, t([0]), torch.tensor([1.0]), t([s], I64), t([7], I64),
                                   True, False, False).item() for s in range(40)]  # fmt: skip
    again = [ops.gumbel_sample_cpu(flat, t([0]), torch.tensor([1.0]), t([s], I64), t([7], I64),
                                   True, False, False).item() for s in range(40)]  # fmt: skip
    assert draws == again and len(set(draws)) > 30  # reproducible, and spread over the vocabulary


def test_logit_bias_allowed_tokens_and_min_tokens():
    logits = torch.zeros(2, 5)
    z = t([[0, 0]])
    ops.apply_logit_bias_cpu(
        logits, t([0, 0]), t([0, 9], I64), t([2]), t([[1, 3]]), t([1]), t([[3, 0]]),
        torch.tensor([[2.5, 0.0]]), t([5]), t([1]), t([0]), t([[1, 0]]), False,
    )  # fmt: skip
    inf = float("-inf")
    # Row 0 (position 0 < min_tokens 5): only 1 and 3 allowed, 3 biased, stop token 1 masked.
    assert logits[0].tolist() == [inf, inf, inf, 2.5, inf]
    assert logits[1].tolist() == [inf, 0.0, inf, 2.5, inf]  # past min_tokens: 1 stays
    assert z.tolist() == [[0, 0]]


@pytest.mark.parametrize("name", sorted(ops.SCHEMAS))
def test_each_schema_parses(name):
    from torch._C import parse_schema

    assert parse_schema(ops.SCHEMAS[name]).name == name
