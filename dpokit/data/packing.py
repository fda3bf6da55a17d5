"""Padding-free batch layouts: sequence packing and prompt (prefix) sharing.

The padded layout of `dpokit.data.collate` pads every one of the 2B rows to the longest one and runs the
prompt twice per pair. Two opt-in layouts remove that waste; both produce the SAME per-sequence
log-probs as the padded layout (tested in tests/integration/test_packing_equivalence.py):

* packing (``data.packing``): the 2B sequences (prompt+chosen, prompt+rejected) are laid back to
  back in a few rows (how many: "Rows" below); positions restart at 0 for every sequence and
  attention is block-diagonal causal, so sequences never see each other.
* prefix sharing (``data.prefix_sharing``, Wang & Hegde 2024, arXiv 2410.20305): each pair is ONE
  unit ``[prompt, chosen, rejected]``; chosen positions continue the prompt (P..P+C-1) and so do
  the rejected ones (P..P+R-1, not P+C..), and rejected tokens attend to the prompt and earlier
  rejected tokens but not to chosen. The model thus sees exactly what the two padded rows show it,
  with the prompt computed once. Without packing every pair gets its own row; with packing, pairs
  are packed like sequences.

Layout (R rows of T tokens; B pairs; a "unit" is a sequence (packing) or a pair (prefix sharing))::

    input_ids      (R, T) long   units back to back, then pad_token_id to the end of the row
    attention_mask (R, T) long   1 on real tokens, 0 on row padding. Only for counting tokens:
                                 the model never receives it (see position_ids / block_causal_mask)
    position_ids   (R, T) long   per-unit positions (restart at 0; row padding restarts at 0 too)
    segment_ids    (R, T) long   unit id: sequence s in [0, 2B) (packing) or pair i in [0, B)
                                 (prefix sharing); -1 on row padding
    branch_ids     (R, T) long   prefix sharing only: 0 prompt, 1 chosen, 2 rejected
    score_index    (4, M) long   rows (row, col, target, seq): the logits at (row, col) predict token
                                 `target`, summed into sequence `seq` (0..B-1 chosen, B..2B-1 rejected)
    pair_index     (B,)   long   TokenizedPair.index, as in the padded layout
    cu_seq_q, cu_seq_k, key_index, varlen_max
                                 only for ``model.attn_implementation: varlen``: the query / key
                                 segments of the flattened rows (see dpokit/models/varlen.py)

Example, prefix sharing, one pair: prompt [5, 6], chosen [7, 8], rejected [9]::

    input_ids    [[5, 6, 7, 8, 9]]      score_index  row    [0, 0, 0]
    position_ids [[0, 1, 2, 3, 2]]                   col    [1, 2, 1]   <- chosen[0] AND rejected[0]
    branch_ids   [[0, 0, 1, 1, 2]]                   target [7, 8, 9]      are predicted at col 1
    segment_ids  [[0, 0, 0, 0, 0]]                   seq    [0, 0, 1]

How the model is told about sequence boundaries (`dpokit.models.forward.concatenated_logps` does this):

* packing only: ``position_ids``, NO attention mask and ``use_cache=False``. transformers (read
  in 5.24, run on 5.24 CPU and 5.17 CUDA) then detects packed sequences from positions that do not
  grow by 1 and builds the block-diagonal causal mask itself (sdpa, eager, flex); flash_attention_2
  turns the same positions into varlen ``cu_seqlens`` (for one row only, so rows are flattened for
  it). With a KV cache (``use_cache=True``, a loaded model's default) detection is silently skipped.
* ``attn_implementation: varlen`` (dpokit/models/varlen.py, for CUDA): no mask at all; the segments above
  go to flash attention's varlen kernel, which does no work outside each sequence.
* prefix sharing: positions alone cannot say "see the prompt but not chosen", so
  `block_causal_mask` builds a 4D mask, which transformers passes to the kernel unchanged.
  Only sdpa (boolean mask) and eager (additive mask) accept that; config validation refuses others.

Rows: with a dense mask (sdpa / eager) attention over a row of T tokens costs O(T^2) per row
whatever the mask hides (measured: torch's CPU SDPA takes 6x longer for one masked row of 2304
tokens than for 8 rows of 328; 3x with is_causal and no mask), so one giant row would turn the
padding saved into attention spent across sequences. Hence, with ``packing_max_tokens: 0`` (auto),
`balanced_rows` picks the number of rows r minimising ``r * T * (1 + T / K)`` (linear-layer cost
+ dense attention cost of r rows padded to T), with units spread longest-first onto the currently
shortest row; K = `attention_cost_tokens` of the model (the context length at which a token's
attention FLOPs equal its linear-layer FLOPs: ~3k for SmolLM2-135M, ~27k for Llama-3-8B; infinite
for flash attention, whose varlen kernel does no cross-sequence work, so everything goes in one row).
``packing_max_tokens: N`` instead fills rows of at most N tokens first-fit-decreasing.

Imports only torch (and dpokit.data.collate). Which layout a model gets is `dpokit.models.layout`'s choice.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dpokit.data.collate import TokenizedPair

if TYPE_CHECKING:
    pass

__all__ = [
    "PackedCollator",
    "balanced_rows",
    "block_causal_mask",
    "first_fit_decreasing",
]

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # branch ids


@dataclass
class _Unit:
    """One packable unit: a whole sequence (packing) or a whole pair (prefix sharing)."""

    segment: int
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branches: list[int] = field(default_factory=list)
    # (offset of the predicting token inside the unit, target token, sequence id)
    scores: list[tuple[int, int, int]] = field(default_factory=list)


def _sequence_unit(prompt: list[int], response: list[int], seq: int) -> _Unit:
    """prompt + response as one unit; response token j is predicted at offset len(prompt) - 1 + j."""
    n = len(prompt) + len(response)
    scores = [(len(prompt) - 1 + j, tok, seq) for j, tok in enumerate(response)]
    return _Unit(seq, [*prompt, *response], list(range(n)), [PROMPT] * n, scores)


def _shared_prefix_unit(pair: TokenizedPair, i: int, n_pairs: int) -> _Unit:
    """[prompt, chosen, rejected] with rejected positions continuing the PROMPT, not chosen."""
    p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    tokens = [*pair.prompt_ids, *pair.chosen_ids, *pair.rejected_ids]
    positions = [*range(p), *range(p, p + c), *range(p, p + r)]
    branches = [PROMPT] * p + [CHOSEN] * c + [REJECTED] * r
    chosen = [(p - 1 + j, tok, i) for j, tok in enumerate(pair.chosen_ids)]
    # rejected token 0 follows the prompt's last token (offset p - 1, shared with chosen token 0);
    # rejected token j >= 1 follows rejected token j - 1, which sits at offset p + c + j - 1
    rejected = [(p - 1 if j == 0 else p + c + j - 1, tok, n_pairs + i) for j, tok in enumerate(pair.rejected_ids)]
    return _Unit(i, tokens, positions, branches, chosen + rejected)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Assign items to rows of at most `capacity` tokens: longest first, each into the first row
    with room (an item longer than `capacity` gets a row of its own). Deterministic (ties by index).

    Returns the item indices of each row, in placement order.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, room in enumerate(free):
            if lengths[item] <= room:
                rows[r].append(item)
                free[r] -= lengths[item]
                break
        else:
            rows.append([item])
            free.append(capacity - lengths[item])
    return rows


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _spread(lengths: list[int], n_rows: int) -> list[list[int]]:
    """Longest-processing-time: each unit, longest first, onto the currently shortest row."""
    heap = [(0, r) for r in range(n_rows)]  # (tokens so far, row); ties go to the lower row
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    for item in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        fill, r = heapq.heappop(heap)
        rows[r].append(item)
        heapq.heappush(heap, (fill + lengths[item], r))
    return rows


def balanced_rows(lengths: list[int], attention_tokens: float, multiple: int = 1) -> list[list[int]]:
    """Rows for `lengths` that minimise the modelled cost ``r * T * (1 + T / attention_tokens)``.

    Every row is padded to T (the fullest row, rounded up to `multiple`), so the model charges the
    padding too: the linear layers cost ~T per row and dense-mask attention ~T^2 / attention_tokens.
    Tries every row count r (units are spread with `_spread`); ties go to fewer rows.

    Returns the item indices of each row (no empty rows).
    """
    best: tuple[float, list[list[int]]] | None = None
    for n_rows in range(1, len(lengths) + 1):
        rows = _spread(lengths, n_rows)
        t = _round_up(max(sum(lengths[k] for k in row) for row in rows), multiple)
        cost = n_rows * t * (1.0 + t / attention_tokens)
        if best is None or cost < best[0]:
            best = (cost, rows)
    assert best is not None, "no units"
    return [row for row in best[1] if row]


class PackedCollator:
    """Collates `TokenizedPair`s into the packed / prefix-shared layout of this module's docstring."""

    def __init__(
        self,
        pad_token_id: int,
        *,
        packing: bool = True,
        prefix_sharing: bool = False,
        max_tokens: int = 0,
        pad_to_multiple_of: int | None = None,
        attention_tokens: float = 4096.0,
        varlen: bool = False,
    ):
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (set a pad token on the tokenizer)")
        if not (packing or prefix_sharing):
            raise ValueError("neither packing nor prefix_sharing: use collate.PreferenceCollator")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 (0 = rows chosen by the cost model), got {max_tokens}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.packing, self.prefix_sharing = packing, prefix_sharing
        self.max_tokens = max_tokens
        self.multiple = pad_to_multiple_of or 1
        self.attention_tokens = attention_tokens  # K of `balanced_rows` (math.inf: one row)
        self.varlen = varlen  # also emit the segments of dpokit/models/varlen.py

    def describe(self) -> str:
        """One line for the run log: the batch layout."""
        parts = [name for name, on in (("prefix sharing", self.prefix_sharing), ("packing", self.packing)) if on]
        return " + ".join(parts) + (" (varlen attention segments)" if self.varlen else " (4D attention mask)")

    def _units(self, pairs: list[TokenizedPair]) -> list[_Unit]:
        b = len(pairs)
        if self.prefix_sharing:
            return [_shared_prefix_unit(p, i, b) for i, p in enumerate(pairs)]
        # same sequence order as the padded layout: chosen 0..B-1, then rejected B..2B-1
        return [_sequence_unit(p.prompt_ids, p.chosen_ids, i) for i, p in enumerate(pairs)] + [
            _sequence_unit(p.prompt_ids, p.rejected_ids, b + i) for i, p in enumerate(pairs)
        ]

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, Tensor]:
        """Build the packed batch for `pairs`; see the module docstring for the layout."""
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        for p in pairs:
            if not p.prompt_ids or not p.chosen_ids or not p.rejected_ids:
                raise ValueError("a TokenizedPair has an empty prompt or response; data.py should have dropped it")
        units = self._units(pairs)
        lengths = [len(u.tokens) for u in units]
        if not self.packing:
            layout = [[k] for k in range(len(units))]
        elif self.max_tokens:
            # ceil to the multiple: the row is padded to it anyway, so the extra room is free
            layout = first_fit_decreasing(lengths, _round_up(self.max_tokens, self.multiple))
        else:
            layout = balanced_rows(lengths, self.attention_tokens, self.multiple)
        seq_len = _round_up(max(sum(lengths[k] for k in row) for row in layout), self.multiple)  # (T)

        ids, real, pos, seg, branch = [], [], [], [], []
        score_rows: list[int] = []
        score_cols: list[int] = []
        score_targets: list[int] = []
        score_seqs: list[int] = []
        for r, row in enumerate(layout):
            row_ids: list[int] = []
            row_pos: list[int] = []
            row_seg: list[int] = []
            row_branch: list[int] = []
            for k in row:
                u, start = units[k], len(row_ids)
                for offset, target, seq in u.scores:
                    score_rows.append(r)
                    score_cols.append(start + offset)
                    score_targets.append(target)
                    score_seqs.append(seq)
                row_ids += u.tokens
                row_pos += u.positions
                row_seg += [u.segment] * len(u.tokens)
                row_branch += u.branches
            n_pad = seq_len - len(row_ids)
            real.append([1] * len(row_ids) + [0] * n_pad)
            # padding is a sequence of its own (positions from 0, segment -1): it attends only to
            # itself, so no attention row is empty (an all-masked row would make SDPA return NaN)
            ids.append(row_ids + [self.pad_token_id] * n_pad)
            pos.append(row_pos + list(range(n_pad)))
            seg.append(row_seg + [-1] * n_pad)
            branch.append(row_branch + [PROMPT] * n_pad)

        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long),  # (R, T)
            "attention_mask": torch.tensor(real, dtype=torch.long),  # (R, T) real tokens (not for the model)
            "position_ids": torch.tensor(pos, dtype=torch.long),  # (R, T)
            "segment_ids": torch.tensor(seg, dtype=torch.long),  # (R, T)
            "score_index": torch.tensor([score_rows, score_cols, score_targets, score_seqs], dtype=torch.long),  # (4, M)
            "pair_index": torch.tensor([p.index for p in pairs], dtype=torch.long),  # (B,)
        }
        if self.prefix_sharing:  # its presence is what tells the model call to build a 4D mask
            batch["branch_ids"] = torch.tensor(branch, dtype=torch.long)  # (R, T)
        if self.varlen:
            batch.update(self._segments(units, layout, seq_len))
        return batch

    def _segments(self, units: list[_Unit], layout: list[list[int]], seq_len: int) -> dict[str, Tensor]:
        """The varlen segments (dpokit/models/varlen.py) of the rows `__call__` laid out.

        Token positions are flattened row-major (row r, column c -> r * seq_len + c). A sequence unit
        is one segment; a pair [P, C, R] is two: queries [P, C] over keys [P, C], and queries [R] over
        keys [P, R]; row padding is a segment of its own.
        """
        q_lens: list[int] = []
        k_lens: list[int] = []
        keys: list[range] = []
        for r, row in enumerate(layout):
            base = r * seq_len
            for k in row:
                u = units[k]
                n = len(u.tokens)
                if self.prefix_sharing:
                    p = u.branches.count(PROMPT)
                    pc = p + u.branches.count(CHOSEN)
                    q_lens += [pc, n - pc]
                    k_lens += [pc, p + n - pc]
                    keys += [range(base, base + pc), range(base, base + p), range(base + pc, base + n)]
                else:
                    q_lens.append(n)
                    k_lens.append(n)
                base += n
            if base < (r + 1) * seq_len:  # row padding
                q_lens.append((r + 1) * seq_len - base)
                k_lens.append(q_lens[-1])
                keys.append(range(base, (r + 1) * seq_len))
        out = {
            "cu_seq_q": torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32),  # (S + 1,)
            "cu_seq_k": torch.tensor([0, *k_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32),  # (S + 1,)
            "varlen_max": torch.empty(0, max(q_lens), max(k_lens)),  # the maxima, in the shape: no sync
        }
        if self.prefix_sharing:  # packing alone: the keys are the tokens themselves
            out["key_index"] = torch.tensor([i for seg in keys for i in seg], dtype=torch.long)  # (N_k,)
        return out


def block_causal_mask(segment_ids: Tensor, branch_ids: Tensor | None = None) -> Tensor:
    """(R, 1, T, T) boolean attention mask, True = query (dim 2) may attend to key (dim 3).

    Key k is visible from query q iff k <= q, both are in the same unit (segment), and k is a
    prompt token or on the same branch as q (so rejected never sees chosen). Without `branch_ids`
    this is the plain block-diagonal causal mask of packed sequences.
    """
    t = segment_ids.shape[-1]
    same_unit = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, T, T) [q, k]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril_()  # (T, T) k <= q
    mask = same_unit & causal
    if branch_ids is not None:
        shared = (branch_ids == PROMPT)[:, None, :]  # (R, 1, T) key is a prompt token
        same_branch = branch_ids[:, :, None] == branch_ids[:, None, :]  # (R, T, T)
        mask &= shared | same_branch
    return mask.unsqueeze(1)  # (R, 1, T, T): one mask for all heads
