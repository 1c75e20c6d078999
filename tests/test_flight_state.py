"""Every transition of the flight state machine, directly: no event loop, no threads."""

from __future__ import annotations

import pytest

from chengeta_ai.layers.flight_state import (
    CANCEL,
    CLOSE_LOG,
    DRAIN,
    RELEASE,
    STORE,
    WAKE,
    FlightState,
    Phase,
)

ENDED = CLOSE_LOG | RELEASE | WAKE


def running(on_abandon: str = "cancel") -> FlightState:
    state = FlightState(on_abandon)  # type: ignore[arg-type]
    assert state.phase is Phase.RUNNING
    assert state.joinable and state.in_slot and not state.ended
    return state


def test_complete_end_stores_then_ends() -> None:
    state = running()
    assert state.upstream_ended(complete=True) == STORE
    assert state.phase is Phase.FINISHING
    assert state.joinable  # the log is whole: a caller arriving during the store joins
    assert state.stored() == ENDED
    assert state.phase is Phase.DONE
    assert not state.joinable and not state.in_slot and state.ended
    assert state.not_stored is None
    assert state.stored() == 0  # a second report changes nothing


def test_incomplete_end_is_not_stored() -> None:
    state = running()
    assert state.upstream_ended(complete=False) == ENDED
    assert state.phase is Phase.DONE
    assert state.not_stored == "incomplete"


def test_end_of_an_unstorable_stream_is_not_stored() -> None:
    state = running()
    assert state.keep_from_store("unserializable")
    assert not state.keep_from_store("oversized")  # the first reason is kept
    assert state.upstream_ended(complete=True) == ENDED
    assert state.not_stored == "unserializable"


def test_failure_ends_and_holds_the_error() -> None:
    state = running()
    error = RuntimeError("boom")
    assert state.upstream_failed(error) == ENDED
    assert state.phase is Phase.FAILED
    assert state.error is error
    assert state.not_stored == "error"
    assert state.upstream_failed(RuntimeError("again")) == 0
    assert state.error is error


def test_failure_while_finishing_fails_the_flight() -> None:
    state = running()
    state.upstream_ended(complete=True)
    assert state.upstream_failed(KeyboardInterrupt()) == ENDED
    assert state.phase is Phase.FAILED


def test_overflow_frees_the_slot_but_the_stream_goes_on() -> None:
    state = running()
    assert state.overflowed() == RELEASE
    assert state.phase is Phase.RUNNING
    assert not state.joinable and not state.in_slot
    assert state.not_stored == "oversized"
    assert state.overflowed() == 0
    # its end releases nothing more
    assert state.upstream_ended(complete=True) == CLOSE_LOG | WAKE


@pytest.mark.parametrize("remaining", [1, 5])
def test_a_consumer_leaving_others_changes_nothing(remaining: int) -> None:
    state = running()
    assert state.consumer_left(remaining) == 0
    assert state.phase is Phase.RUNNING and not state.abandoned


def test_abandon_under_cancel_holds_the_key_until_the_upstream_is_closed() -> None:
    state = running("cancel")
    assert state.consumer_left(0) == CANCEL
    assert state.phase is Phase.CANCELLING
    assert state.in_slot, "a key never has two upstreams: the slot is held while closing"
    assert not state.joinable, "nobody may join a flight that is being cancelled"
    assert state.consumer_left(0) == 0
    assert state.upstream_closed() == ENDED
    assert state.phase is Phase.DONE
    assert state.not_stored == "abandoned"


def test_a_cancelled_upstream_that_ends_normally_is_not_stored() -> None:
    # an upstream that swallows its cancellation and returns
    state = running("cancel")
    state.consumer_left(0)
    assert state.upstream_ended(complete=True) == ENDED
    assert state.not_stored == "abandoned"


def test_a_cancelled_upstream_that_raises_ends_when_closed() -> None:
    state = running("cancel")
    state.consumer_left(0)
    assert state.upstream_failed(RuntimeError("closed")) == 0
    assert state.phase is Phase.CANCELLING
    assert state.upstream_closed() == ENDED


def test_abandon_under_finish_drains_and_stays_joinable() -> None:
    state = running("finish")
    assert state.consumer_left(0) == DRAIN
    assert state.phase is Phase.RUNNING and state.joinable and state.abandoned
    assert state.consumer_left(0) == 0  # drained once
    assert state.upstream_ended(complete=True) == STORE


@pytest.mark.parametrize("why", ["no_store", "superseded", "oversized", "unserializable"])
def test_abandon_under_finish_cancels_a_stream_that_will_not_be_stored(why: str) -> None:
    state = running("finish")
    if why == "no_store":
        state.wants_store = False
    elif why == "superseded":
        state.supersede()
    elif why == "oversized":
        assert state.overflowed() == RELEASE
    else:
        assert state.keep_from_store(why)
    assert state.consumer_left(0) == CANCEL  # nothing to drain for
    assert state.phase is Phase.CANCELLING and not state.joinable
    state.upstream_closed()
    # the first reason is kept; a no_store stream cut short was abandoned (never ended)
    assert state.outcome == ("abandoned" if why == "no_store" else why)


def test_a_publishing_no_store_producer_still_drains_for_other_processes() -> None:
    state = running("finish")
    state.wants_store = False
    state.publishing = True
    assert state.consumer_left(0) == DRAIN


def test_a_drain_that_becomes_unstorable_is_cancelled() -> None:
    state = running("finish")
    assert state.consumer_left(0) == DRAIN
    assert state.unstorable_now(0) == 0  # still storable: drains on
    state.overflowed()
    assert state.unstorable_now(1) == 0  # somebody rejoined: reads on for them
    assert state.unstorable_now(0) == CANCEL
    assert state.phase is Phase.CANCELLING
    assert state.upstream_closed() == CLOSE_LOG | WAKE  # the slot went at the overflow
    assert state.outcome == "oversized"


def test_unstorable_while_attended_or_publishing_changes_nothing() -> None:
    attended = running("finish")
    attended.keep_from_store("unserializable")
    assert attended.unstorable_now(0) == 0  # never abandoned
    publishing = running("finish")
    publishing.publishing = True
    assert publishing.consumer_left(0) == DRAIN
    publishing.keep_from_store("oversized")
    assert publishing.unstorable_now(0) == 0  # other processes may read it


def test_no_abandon_once_the_stream_ended() -> None:
    state = running()
    state.upstream_ended(complete=True)
    assert state.consumer_left(0) == 0
    assert state.phase is Phase.FINISHING


@pytest.mark.parametrize("phase_setup", ["running", "finishing"])
def test_an_interrupted_store_ends_unstored(phase_setup: str) -> None:
    state = running()
    if phase_setup == "finishing":
        state.upstream_ended(complete=True)
    assert state.store_aborted("interrupted") == ENDED
    assert state.phase is Phase.DONE
    assert state.not_stored == "interrupted"
    assert state.store_aborted("interrupted") == 0


def test_upstream_closed_outside_cancelling_is_a_no_op() -> None:
    state = running()
    assert state.upstream_closed() == 0
    assert state.phase is Phase.RUNNING


# -- across processes (RedisFlights) -----------------------------------------------------------


def test_a_follower_ends_without_storing_and_it_is_not_a_failure() -> None:
    state = running()
    state.follow()
    assert state.upstream_ended(complete=True) == ENDED
    assert state.phase is Phase.DONE
    assert state.not_stored is None  # a policy, not a reason counted as a failure


def test_a_follower_elected_producer_stores_again() -> None:
    state = running()
    state.follow()
    state.follow(False)
    assert state.upstream_ended(complete=True) == STORE


def test_a_publishing_producer_drains_and_lets_redis_decide_the_cancel() -> None:
    state = running("cancel")
    state.publishing = True
    assert state.consumer_left(0) == DRAIN  # not CANCEL: other processes may still read it
    assert state.phase is Phase.RUNNING and state.not_stored is None
    # the writer found no follower reader (and wrote the cancel record): cancel now
    assert state.abandoned_everywhere(0) == CANCEL
    assert state.phase is Phase.CANCELLING and state.not_stored == "abandoned"
    assert state.upstream_closed() == ENDED


def test_a_publishing_producer_still_read_by_others_stores() -> None:
    state = running("cancel")
    state.publishing = True
    assert state.consumer_left(0) == DRAIN
    assert state.upstream_ended(complete=True) == STORE
    assert state.abandoned_everywhere(0) == 0  # too late: the stream ended


def test_a_local_consumer_that_rejoined_keeps_a_cancelled_everywhere_flight() -> None:
    state = running("cancel")
    state.publishing = True
    state.consumer_left(0)
    assert state.abandoned_everywhere(1) == 0
    assert state.phase is Phase.RUNNING


def test_finish_policy_is_never_cancelled_everywhere() -> None:
    state = running("finish")
    state.publishing = True
    assert state.consumer_left(0) == DRAIN
    assert state.abandoned_everywhere(0) == 0


def test_not_abandoned_is_never_cancelled_everywhere() -> None:
    state = running("cancel")
    state.publishing = True
    assert state.abandoned_everywhere(0) == 0


def test_without_publishing_the_cancel_policy_applies() -> None:
    state = running("cancel")
    state.publishing = False
    assert state.consumer_left(0) == CANCEL


@pytest.mark.parametrize("policy", ["cancel", "finish"])
def test_an_abandoned_follower_stops_reading_whatever_its_policy(policy: str) -> None:
    state = running(policy)
    state.follow()
    assert state.consumer_left(0) == CANCEL  # it never stores: nothing to drain for
    assert state.phase is Phase.CANCELLING
