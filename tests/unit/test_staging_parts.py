"""How the gateway cuts a run's files into parts that each fit a bus message (staging.py)."""

import orjson

from services.gateway.staging import parts


def test_parts_keep_every_file_in_order_within_the_size():
    files = [{"name": f"f{i}", "url": "u" * (i % 97)} for i in range(1000)]
    cut = list(parts(files, 4096))
    assert [f for part in cut for f in part] == files
    assert len(cut) > 1 and all(len(orjson.dumps(part)) <= 4096 for part in cut)


def test_a_file_larger_than_a_part_goes_alone():
    files = [{"name": "a"}, {"name": "b", "content_b64": "QUFB" * 2000}, {"name": "c"}]
    assert list(parts(files, 1024)) == [[files[0]], [files[1]], [files[2]]]
