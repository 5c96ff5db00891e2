"""The scheduler and the input builder on plain objects, without a model: token budget, chunking, preemption order,
pipeline shares; positions, slots and attention metadata from a step's tensors."""

from __future__ import annotations

import torch

from pagedllm.config import SchedulerConfig
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.sequence import Request, SequenceStatus
from pagedllm.sampling_params import SamplingParams
from pagedllm.step import StepInputs
from pagedllm.worker.input_builder import InputBuilder


def _scheduler(num_blocks: int = 64, block_size: int = 4, budget: int = 32, max_seqs: int = 8, chunked: bool = True,
               max_model_len: int = 256) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, max_model_len, chunked),
                     BlockManager(num_blocks, block_size, enable_prefix_caching=False))


def _add(s: Scheduler, n_tokens: int, first: int = 10):
    seq = Request(f"r{len(s.waiting) + len(s.running)}", None, list(range(first, first + n_tokens)),
                  SamplingParams()).seqs[0]
    s.add(seq)
    return seq


def _step(s: Scheduler, share: int = 1) -> list[tuple[object, int]]:
    """Schedule, pretend the model ran, and give every sequence whose prompt is done one new token."""
    out = s.schedule(share)
    s.update_after_step(out)
    for x in out.scheduled:
        if x.seq.num_computed_tokens == x.seq.num_tokens:
            x.seq.token_ids.append(1)
    return [(x.seq, x.num_new_tokens) for x in out.scheduled]


def test_budget_and_chunk_cap():
    s = _scheduler(budget=32)  # with chunked prefill one prompt takes at most half the budget
    a, b, c = _add(s, 40), _add(s, 10), _add(s, 10)
    assert _step(s) == [(a, 16), (b, 10), (c, 6)]  # c's 10 would pass the budget: it takes the remaining 6
    assert _step(s) == [(a, 16), (b, 1), (c, 4)]  # b decodes; the others go on


def test_a_long_prompt_is_prefilled_in_chunks_then_decodes():
    s = _scheduler(budget=16)
    a = _add(s, 40)
    chunks = [_step(s)[0][1] for _ in range(6)]
    assert chunks == [8, 8, 8, 8, 8, 1]  # five chunks of half the budget, then one token per step
    assert a.num_computed_tokens == 41 and a.num_output_tokens == 2


def test_without_chunked_prefill_a_prompt_waits_for_room():
    s = _scheduler(budget=32, chunked=False)
    a, b = _add(s, 20), _add(s, 20)
    assert _step(s) == [(a, 20)]  # b does not fit beside a and may not be split
    assert _step(s) == [(a, 1), (b, 20)]


def test_running_sequences_come_first():
    s = _scheduler(budget=32)
    a = _add(s, 8)
    _step(s)  # a's prompt
    b = _add(s, 8)
    assert _step(s) == [(a, 1), (b, 8)]


def test_preemption_takes_the_newest_running_sequence_and_frees_its_blocks():
    s = _scheduler(num_blocks=6, block_size=4, budget=64)
    a, b = _add(s, 12), _add(s, 12)  # 3 blocks each: the pool is full
    _step(s)
    assert s.block_manager.num_free_blocks == 0
    out = s.schedule()  # a's 13th token needs a 4th block
    assert [x.seq for x in out.scheduled] == [a] and out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and not b.block_table
    assert s.waiting[0] is b and s.num_preemptions == 1


def test_pipeline_share_splits_ready_sequences_and_skips_those_in_flight():
    s = _scheduler(budget=64)
    seqs = [_add(s, 4, first=10 * i) for i in range(4)]
    first = s.schedule(share=2)  # two micro-batches to fill: this one takes half
    assert [x.seq for x in first.scheduled] == seqs[:2]
    for x in first.scheduled:
        x.seq.in_flight = True
    second = s.schedule(share=1)
    assert [x.seq for x in second.scheduled] == seqs[2:]


def test_input_builder_positions_slots_and_native_batch():
    # one decode (context 6 -> 7) and one prompt chunk of 3 after 4 cached tokens; block size 4
    step = StepInputs.build([[9], [5, 6, 7]], [6, 4], [[3, 1], [0, 2]], sample_positions=[0, 3])
    ids, positions, meta = InputBuilder(4, kv_heads=2, num_blocks=8, device=torch.device("cpu"), native=True).build(step)
    assert ids.tolist() == [9, 5, 6, 7]
    assert positions.tolist() == [6, 4, 5, 6]
    assert meta.slot_mapping.tolist() == [1 * 4 + 2, 2 * 4 + 0, 2 * 4 + 1, 2 * 4 + 2]
    assert meta.native.query_start.tolist() == [0, 1, 4] and meta.native.context_lens.tolist() == [7, 7]
    assert not meta.decode and not meta.prefill


def test_input_builder_torch_buckets():
    # a decode (context 7), a fresh 2-token prompt and a 3-token chunk after 4 cached tokens; block size 4
    step = StepInputs.build([[9], [1, 2], [5, 6, 7]], [6, 0, 4], [[3, 1], [5], [0, 2]], sample_positions=[0, 2, 5])
    builder = InputBuilder(4, kv_heads=2, num_blocks=8, device=torch.device("cpu"), native=False)
    _, _, meta = builder.build(step)
    (decode,) = meta.decode
    assert decode.tokens == slice(0, 1)
    assert decode.gather_index.tolist() == [3, 1, 8 + 3, 8 + 1]  # both blocks of the decode, for each KV head
    assert torch.isinf(decode.attn_bias[0, 0, 0, 7]) and decode.attn_bias[0, 0, 0, :7].eq(0).all()
    (prefill,) = meta.prefill  # 2 and 3 tokens pad to 3 within the allowed padding: one bucket
    assert prefill.tokens == slice(1, 6) and prefill.query_index.tolist() == [[0, 1, 2], [2, 3, 4]]
    assert prefill.unpad_index.tolist() == [0, 1, 3, 4, 5]
    assert prefill.key_mask.shape == (2, 1, 3, 8)  # causal, offset by what each row has cached
    assert prefill.key_mask[1, 0].int().tolist() == [[1] * 5 + [0] * 3, [1] * 6 + [0] * 2, [1] * 7 + [0]]
    assert prefill.key_mask[0, 0, :2].int().tolist() == [[1] + [0] * 7, [1, 1] + [0] * 6]
    fresh = builder.build(StepInputs.build([[1, 2], [3, 4, 5]], [0, 0], [[5], [6]]))[2].prefill[0]
    assert fresh.gather_index is None and fresh.key_mask is None  # nothing cached: attention within each chunk


def test_step_inputs_travel_as_one_tensor():
    step = StepInputs.build([[9], [5, 6, 7]], [6, 4], [[3, 1], [0]], copies=[(1, 2)], sample_positions=[0, 3, 3])
    back = StepInputs.unpack(step.pack())
    for name in ("token_ids", "starts", "lens", "tables", "copies", "sample_positions"):
        assert torch.equal(getattr(back, name), getattr(step, name))
