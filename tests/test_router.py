"""The front end's router when a group replica is lost (control flow only, over scripted stand-ins for Serve's
deployment handles; tests/integration/test_scale_out.py kills real replicas and nodes): a request the client has
seen nothing of is sent once more, within its deadline; a stream that has delivered tokens ends UNAVAILABLE after
them; ListModels sums the load over the replicas that answer."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.exceptions import ActorDiedError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import DeploymentUnavailableError

from decoding.errors import InvalidArgument
from decoding.sampling import SamplingParams
from server.app import HandleRouter, Placement, RemoteError, _remote_error
from server.config import load_deploy_file
from server.engines.base import GenerationChunk, GenerationRequest
from server.errors import ChorusError, Unavailable
from server.service import Route
from server.strategies.rerank import RerankJob
from tests.strategy_cases import REPO

CONFIG = load_deploy_file(REPO / "deploy" / "local.yaml").chorus
MODEL = CONFIG.default_model
FIRST, SECOND = Placement("r1", "10.0.0.1"), Placement("r2", "10.0.0.2")
LOST = ActorDiedError()


def chunk(text: str) -> GenerationChunk:
    return GenerationChunk(text, [len(text)])


class ScriptedStream:
    """A stream reply: its items in order, an exception raised where it stands."""

    def __init__(self, items: list):
        self.items, self.cancelled = items, False

    async def _items(self):
        for item in self.items:
            await asyncio.sleep(0)
            if isinstance(item, BaseException):
                raise item
            yield item

    def __aiter__(self):
        return self._items()

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedReply:
    """A unary reply: a value, or an exception raised when awaited."""

    def __init__(self, value):
        self.value = value

    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value

    def cancel(self) -> None:
        pass


class ScriptedHandle:
    """Stands in for a group's DeploymentHandle: call k of a method gets the k-th scripted reply."""

    def __init__(self, replies: list, broadcast: list | None = None):
        self.replies, self.calls, self._broadcast = list(replies), [], broadcast or []

    def options(self, stream: bool):
        return self

    def __getattr__(self, method: str):
        handle = self

        class Method:
            @staticmethod
            def remote(*arguments):
                handle.calls.append((method, arguments))
                reply = handle.replies.pop(0)
                return ScriptedStream(reply) if isinstance(reply, list) else ScriptedReply(reply)
        return Method

    def broadcast(self, method: str):
        answers = self._broadcast

        class Broadcast:
            @staticmethod
            async def results_async(timeout_s, return_exceptions):
                if isinstance(answers, BaseException):
                    raise answers
                return answers
        return Broadcast


def request(deadline: float | None = None) -> GenerationRequest:
    return GenerationRequest(request_id="r", sampling=SamplingParams(), prompt="Hi", deadline=deadline)


def run_generate(handle, *, whole=False, deadline=None) -> tuple[list[str], Route, BaseException | None]:
    router = HandleRouter(CONFIG, {"smollm2": handle})
    route, texts = Route(), []

    async def consume():
        async for c in router.generate(MODEL, request(deadline), route, whole=whole):
            texts.append(c.text)
    try:
        asyncio.run(consume())
    except (ChorusError, InvalidArgument) as error:
        return texts, route, error
    return texts, route, None


def test_a_stream_lost_before_its_first_token_is_sent_once_more_to_a_live_replica():
    handle = ScriptedHandle([[FIRST, LOST], [SECOND, chunk("a"), chunk("b")]])
    texts, route, error = run_generate(handle)
    assert (texts, error, route.retries, route.replica) == (["a", "b"], None, 1, "r2@10.0.0.2")
    assert len(handle.calls) == 2


def test_a_request_is_sent_again_only_once():
    handle = ScriptedHandle([[FIRST, LOST], [SECOND, LOST]])
    texts, route, error = run_generate(handle)
    assert isinstance(error, Unavailable) and "before answering" in str(error) and "retry" in str(error)
    assert (texts, route.retries, len(handle.calls)) == ([], 1, 2)


def test_a_stream_lost_after_delivering_tokens_ends_unavailable_after_them():
    handle = ScriptedHandle([[FIRST, chunk("a"), LOST], [SECOND, chunk("never")]])
    texts, route, error = run_generate(handle)
    assert isinstance(error, Unavailable) and "after streaming part of the answer" in str(error)
    assert (texts, route.retries, len(handle.calls)) == (["a"], 0, 1)


def test_a_unary_call_redoes_the_lost_replicas_partial_work_and_returns_only_the_new_answer():
    handle = ScriptedHandle([[FIRST, chunk("a"), LOST], [SECOND, chunk("x"), chunk("y")]])
    texts, route, error = run_generate(handle, whole=True)
    assert (texts, error, route.retries) == (["x", "y"], None, 1)


def test_no_retry_once_the_deadline_has_passed():
    handle = ScriptedHandle([[FIRST, LOST], [SECOND, chunk("a")]])
    texts, route, error = run_generate(handle, deadline=time.time() - 1)
    assert isinstance(error, Unavailable) and (route.retries, len(handle.calls)) == (0, 1)


def test_an_error_the_replica_reports_keeps_its_code_and_is_not_retried():
    handle = ScriptedHandle([[FIRST, RemoteError("RESOURCE_EXHAUSTED", "queue full")]])
    texts, route, error = run_generate(handle)
    assert (error.code, str(error), len(handle.calls)) == ("RESOURCE_EXHAUSTED", "queue full", 1)


def test_an_invalid_argument_from_the_replica_keeps_the_field_it_names():
    remote = _remote_error(InvalidArgument("logit_fusion.experts[0]", "unknown expert 'x'"), "r")
    texts, route, error = run_generate(ScriptedHandle([[FIRST, remote]]))
    assert isinstance(error, InvalidArgument) and error.field == "logit_fusion.experts[0]"
    assert str(error) == "logit_fusion.experts[0]: unknown expert 'x'"


def test_rerank_is_sent_once_more_when_its_replica_is_lost_and_only_once():
    router = HandleRouter(CONFIG, {"smollm2": ScriptedHandle([LOST, (SECOND, "outcome")])})
    job = RerankJob("j", params=None)
    route = Route()
    assert asyncio.run(router.rerank(MODEL, job, route)) == "outcome"
    assert (route.retries, route.replica) == (1, "r2@10.0.0.2")
    router = HandleRouter(CONFIG, {"smollm2": ScriptedHandle([LOST, LOST])})
    with pytest.raises(Unavailable):
        asyncio.run(router.rerank(MODEL, job, Route()))


def test_list_models_sums_the_load_over_the_replicas_that_answer():
    answers = [{"model": MODEL, "replica": "r2@b", "running": 3, "waiting": 1},
               ActorDiedError(),  # a replica being replaced
               {"model": MODEL, "replica": "r1@a", "running": 2, "waiting": 0}]
    router = HandleRouter(CONFIG, {"smollm2": ScriptedHandle([], broadcast=answers)})
    [group] = asyncio.run(router.describe())
    assert (group["running"], group["waiting"], group["replicas"]) == (5, 1, ["r1@a", "r2@b"])


@pytest.mark.parametrize("broadcast", [
    [ActorDiedError()],  # the only replica is being replaced
    DeploymentUnavailableError(DeploymentID("group-smollm2", "chorus")),  # no replica started yet
])
def test_list_models_waits_for_a_replica_when_none_answers_the_broadcast(broadcast):
    lone = {"model": MODEL, "replica": "r3@c", "running": 1, "waiting": 0}
    router = HandleRouter(CONFIG, {"smollm2": ScriptedHandle([lone], broadcast=broadcast)})
    [group] = asyncio.run(router.describe())
    assert (group["running"], group["replicas"]) == (1, ["r3@c"])
