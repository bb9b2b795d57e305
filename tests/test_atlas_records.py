"""lens_attn.atlases.accumulators.Records against a brute force: keep every offered value, sort."""

import pytest
import torch

from lens_attn.atlases.accumulators import Records


@pytest.mark.parametrize("chunks", [(40,), (3, 5, 1, 30, 2), (1,) * 25, (12, 0, 7, 19)],
                         ids=["one", "uneven", "ones", "with-empty"])  # fmt: skip
def test_records_keep_the_top_of_everything_offered(chunks):
    torch.manual_seed(0)
    n_heads, size = 3, 6
    total = sum(chunks)
    values = torch.randn(n_heads, total)  # distinct with probability 1: no ties to break
    ids = torch.arange(total).expand(n_heads, total)
    records = Records(size)
    begin = 0
    for n in chunks:
        rank = values[:, begin : begin + n]
        fields = {"id": ids[:, begin : begin + n], "pair": torch.stack([rank, -rank], -1)}
        records.offer(rank.clone(), {k: v.clone() for k, v in fields.items()})
        begin += n
    expected, order = values.topk(min(size, total), dim=1)  # brute force: sort everything
    kept = records.sorted()
    assert torch.equal(kept.rank, expected)
    assert torch.equal(kept.fields["id"], order)  # each field moved with its rank
    assert torch.equal(kept.fields["pair"], torch.stack([expected, -expected], -1))
    threshold = records.threshold()
    if total >= size:
        assert torch.equal(threshold, expected[:, -1])
    else:
        assert threshold is None
