"""A streamed response's events, without Ray: whatever happens to the request after its first event,
the stream ends in OpenAI's form — deltas, then a usage chunk if asked, or an error event if the
request broke — and always `data: [DONE]`."""

import asyncio
import functools
import json
import random
import types

from rayft.serving import server

SERVER = server.AdapterServer.func_or_class


def _fake_server():
    fake = types.SimpleNamespace(abandoned=[])
    fake._stream = functools.partial(SERVER._stream, fake)
    fake._abandon = fake.abandoned.append
    return fake


def _events(items, include_usage: bool, opening: bool):
    """The events for a request whose queue delivers `items` (first one awaited before the stream)."""
    fake = _fake_server()

    async def run():
        out = asyncio.Queue()
        for item in items[1:]:
            out.put_nowait(item)
        gen = SERVER._events(fake, out, items[0], lambda text, finish: {"text": text, "finish": finish},
                             lambda n: {"usage": n} if include_usage else None,
                             opening={"role": "assistant"} if opening else None)
        return [e async for e in gen]
    return asyncio.run(run()), fake


def test_streams_end_with_done_and_a_broken_request_ends_with_an_error_event():
    rng = random.Random(0)
    for case in range(60):
        n = rng.randint(1, 8)
        deltas = [(f"t{k}", None, k + 1) for k in range(n)]
        breaks = rng.random() < 0.5
        error = rng.choice([RuntimeError("logits of this row are not finite"),
                            server.AdapterLoadError("adapter 'x' at /s/x: cannot read weights")])
        items = deltas[:rng.randint(1, n)] + [error] if breaks else deltas + [("", "length", n)]
        include_usage, opening = rng.random() < 0.5, rng.random() < 0.5
        events, fake = _events(items, include_usage, opening)
        assert events[-1] == "data: [DONE]\n\n", case
        bodies = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
        if opening:
            assert bodies.pop(0) == {"role": "assistant"}
        texts = [b for b in bodies if "text" in b]
        if breaks:
            sent = [i for i in items if isinstance(i, tuple)]
            assert [b["text"] for b in texts] == [t for t, _, _ in sent], case
            err = bodies[-1]["error"]
            assert str(error) in err["message"] and err["type"] in {"server_error", "adapter_load_error"}, err
            assert not any("usage" in b for b in bodies), "no usage for a request that broke"
        else:
            assert [b["text"] for b in texts] == [t for t, _, _ in deltas] + [""]
            assert texts[-1]["finish"] == "length"
            assert (bodies[-1] == {"usage": n}) == include_usage
            assert not any("error" in b for b in bodies)
        assert fake.abandoned == [], "a request that ended (or broke) is not cancelled again"


def test_a_request_refused_for_want_of_a_free_adapter_slot_is_told_to_retry():
    busy = server._api_error_of(server.NoFreeSlot("adapter 'x': all 2 adapter slots are in use by this batch"))
    broken = server._api_error_of(server.AdapterLoadError("adapter 'x' at /s/x: cannot read weights"))
    assert (busy.status, busy.body["error"]["type"]) == (503, "server_busy_error")
    assert (broken.status, broken.body["error"]["type"]) == (500, "adapter_load_error")
