"""Secure aggregation round state machines (SecAgg, SecAgg+, CKKS): messages in, messages out, no I/O.

Front doors: :class:`ParticipantRound` (an enterprise), :class:`CoordinatorRound` (the untrusted
coordinator), :class:`RoundSpec` and :class:`ParticipantPolicy` (what a round is and what an
enterprise accepts), and :func:`simulate` (a whole round in-process).
"""

from secfed.protocol.coordinator import CoordinatorResult, CoordinatorRound
from secfed.protocol.messages import decode_message
from secfed.protocol.participant import ParticipantResult, ParticipantRound, decode_aggregate
from secfed.protocol.simulate import ADVERSARIES, SimulationResult, simulate
from secfed.protocol.spec import (
    ParticipantPolicy,
    RoundSpec,
    Stage,
    default_neighbours,
    default_threshold,
    neighbour_graph,
    session_id,
)

__all__ = [
    "ADVERSARIES",
    "CoordinatorResult",
    "CoordinatorRound",
    "ParticipantPolicy",
    "ParticipantResult",
    "ParticipantRound",
    "RoundSpec",
    "SimulationResult",
    "Stage",
    "decode_aggregate",
    "decode_message",
    "default_neighbours",
    "default_threshold",
    "neighbour_graph",
    "session_id",
    "simulate",
]
