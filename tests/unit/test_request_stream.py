"""RequestStream: a reader that fell behind gets the waiting outputs as one, deltas joined."""

from __future__ import annotations

import asyncio

import pytest

from pagoda.engine.async_engine import RequestStream
from pagoda.engine.outputs import CompletionOutput, RequestOutput
from pagoda.errors import PagodaError


def _out(text: str, ids: list[int], delta: str, delta_ids: list[int], finish: str | None = None) -> RequestOutput:
    choice = CompletionOutput(index=0, text=text, token_ids=ids, finish_reason=finish, delta_text=delta,
                              delta_token_ids=delta_ids)
    return RequestOutput("r", None, [1], [choice], finished=finish is not None)


def _read(stream: RequestStream, items: list) -> list:
    async def go() -> list:
        for item in items:
            stream._queue.put_nowait(item)
        got = []
        try:
            async for out in stream:
                got.append(out)
        except PagodaError as e:
            got.append(e)
        return got

    return asyncio.run(go())


def test_waiting_outputs_arrive_as_one_with_joined_deltas() -> None:
    got = _read(RequestStream("r"), [_out("a", [1], "a", [1]), _out("ab", [1, 2], "b", [2]),
                                     _out("abc", [1, 2, 3], "c", [3], finish="length")])
    assert len(got) == 1
    (choice,) = got[0].outputs
    assert (choice.text, choice.token_ids, choice.delta_text, choice.delta_token_ids) == ("abc", [1, 2, 3], "abc",
                                                                                         [1, 2, 3])
    assert got[0].finished and choice.finish_reason == "length"


def test_an_error_behind_outputs_comes_after_them() -> None:
    error = PagodaError("engine failed")
    got = _read(RequestStream("r"), [_out("a", [1], "a", [1]), _out("ab", [1, 2], "b", [2]), error])
    assert len(got) == 2 and got[1] is error
    assert got[0].outputs[0].delta_token_ids == [1, 2]


@pytest.mark.parametrize("n", [1, 2])
def test_a_reader_that_keeps_up_sees_every_output(n: int) -> None:
    async def go() -> list[list[int]]:
        stream = RequestStream("r")
        deltas = []
        for i in range(n):
            stream._queue.put_nowait(_out("x" * (i + 1), list(range(i + 1)), "x", [i], "stop" if i == n - 1 else None))
            deltas.append((await stream.__anext__()).outputs[0].delta_token_ids)
        return deltas

    assert asyncio.run(go()) == [[i] for i in range(n)]
