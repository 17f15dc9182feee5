"""The storage layout's names: what item_name makes, ITEM_NAME accepts, and nothing else."""

import pytest

from explainctl.spec.contracts import ITEM_NAME, item_name


@pytest.mark.parametrize(
    "uri",
    ["/photos/café.jpg", "s3://b/東京/夜景.png", "/x/Ünïcödé name (2).webp", "/x/.hidden",
     "https://h/p/a.jpg?sig=1/2", "/x/" + "long" * 30 + ".png", "/x/.."],
)  # fmt: skip
def test_every_name_item_name_makes_is_one_a_reader_accepts(uri):
    name = item_name(7, uri)
    assert ITEM_NAME.fullmatch(name), name
    assert "/" not in name and ".." not in name


@pytest.mark.parametrize("name", ["000001-../../etc", "000001-a/b", "1-cat", "000001-", ""])
def test_names_that_could_escape_or_were_never_made_are_refused(name):
    assert not ITEM_NAME.fullmatch(name)


def test_a_chunk_never_handed_back_is_the_message_the_previous_version_reads():
    from explainctl.spec.contracts import ChunkItem, ChunkPayload, ModelSpec
    from explainctl.spec.methods import ExplainParams

    first = ChunkPayload(job_id="0" * 18, chunk=0, model=ModelSpec(), params=ExplainParams(),
                         output="/out", items=[ChunkItem(index=0, uri="/a.png")])  # fmt: skip
    assert "handed_back" not in first.wire()
    assert ChunkPayload.model_validate(first.wire()) == first
    again = first.model_copy(update={"handed_back": 2})
    assert again.wire()["handed_back"] == 2
    assert ChunkPayload.model_validate(again.wire()) == again


def test_each_item_state_has_its_own_one_byte_code():
    from explainctl.spec.contracts import ITEM_STATES, STATE_CODES

    assert set(STATE_CODES) == set(ITEM_STATES)
    assert len(set(STATE_CODES.values())) == len(ITEM_STATES)
    assert all(len(code.encode()) == 1 and code != "\0" for code in STATE_CODES.values())


def test_a_part_is_named_by_the_indices_it_holds():
    from explainctl.spec.contracts import part_key, part_span

    key = part_key("01m9675xa1q0cp03k7", 32, 1_000_047, 3, "ab12")
    assert key == "01m9675xa1q0cp03k7/parts/000000032-001000047-0000003-ab12.jsonl"
    assert part_span(key) == (32, 1_000_047)
    # names sort as their lowest index does, up to a billion items
    assert sorted([part_key("j", 100, 100, 0, "a"), part_key("j", 99, 120, 1, "b")])[0].endswith(
        "000000099-000000120-0000001-b.jsonl"
    )


def test_a_reader_ignores_fields_it_does_not_know_and_reads_the_protocol():
    from explainctl.spec.contracts import PROTOCOL, ChunkPayload, sent_protocol

    message = {"job_id": "01m9675xa1q0cp03k7", "chunk": 0, "model": {}, "params": {},
               "output": "/o", "items": [{"index": 0, "uri": "/a.png"}], "later": [1]}  # fmt: skip
    chunk = ChunkPayload.model_validate(message)
    assert chunk.protocol == PROTOCOL and "later" not in chunk.wire()
    assert chunk.wire()["protocol"] == PROTOCOL  # every message says which it speaks
    assert sent_protocol(message) == 1  # sent before messages said
    assert sent_protocol({**message, "protocol": PROTOCOL + 1}) == PROTOCOL + 1
    assert sent_protocol({**message, "protocol": "x"}) == sent_protocol([]) == 1
