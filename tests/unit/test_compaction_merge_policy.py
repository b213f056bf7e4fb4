"""Which settled files one compaction pass merges: the new small ones, a larger file only when due."""

from __future__ import annotations

from types import SimpleNamespace

from k2_resources.operations.settled_compaction import LiveFile, merge_group

KEEP = 3  # min_files - 1 with the default min_files of 4
BUDGET = 512 * 1024 * 1024


def files(*sizes: int, first_sequence: int = 0) -> list[LiveFile]:
    return [
        LiveFile(SimpleNamespace(file_size_in_bytes=size), first_sequence + index, 0, ("2026-12-07", "BINANCE"))  # type: ignore[arg-type]
        for index, size in enumerate(sizes)
    ]


def sizes(group: list[LiveFile]) -> list[int]:
    return sorted(live.size for live in group)


def test_new_small_files_merge_without_rewriting_larger_settled_files():
    group = files(*[10] * 10, 1_000, 2_000, 4_000)
    assert sizes(merge_group(group, KEEP, BUDGET)) == [10] * 10


def test_a_larger_file_joins_once_the_small_ones_add_up_to_it():
    group = files(*[10] * 10, 90, 2_000, 4_000)
    assert sizes(merge_group(group, KEEP, BUDGET)) == [10] * 10 + [90]


def test_no_more_than_keep_files_stay_unmerged():
    group = files(*[10] * 10, 1_000, 2_000, 4_000, 8_000)
    assert sizes(merge_group(group, KEEP, BUDGET)) == [10] * 10 + [1_000]


def test_a_day_of_passes_keeps_the_partition_small_and_rewrites_far_less_than_merging_everything():
    settled: list[LiveFile] = []
    rewritten = naive = 0
    for index in range(2_000):  # a pass every 7.5 s for about four hours, 10 new files of 10 KB each
        settled += files(*[10_000] * 10, first_sequence=index * 100)
        naive += sum(live.size for live in settled)  # what merging every settled file costs
        merged = merge_group(settled, KEEP, BUDGET)
        rewritten += sum(live.size for live in merged)
        kept = [live for live in settled if live not in merged]
        output = files(sum(live.size for live in merged), first_sequence=index * 100 + 50)
        settled = kept + output
        assert len(settled) <= KEEP + 1
    assert sum(live.size for live in settled) == 2_000 * 10 * 10_000  # no byte lost or doubled
    assert rewritten < naive / 20, (rewritten, naive)
