"""What every scenario does with a normal reply: judge its SOAP framing and its schema validity."""

from __future__ import annotations

from conformance.checks.soap import body_name, reply_checks
from conformance.checks.xsd import schema_check
from conformance.context import ScenarioContext
from conformance.session import Sent


def judge(ctx: ScenarioContext, sent: Sent, *, label: str = "", mtom_expected: bool | None = None) -> bool:
    """Add the ``soap`` and ``xsd`` checks of a reply that should be a normal answer; True when it is one
    (a non-fault SOAP reply) whose body the scenario can go on to read."""
    ctx.add(reply_checks(sent, mtom_expected=mtom_expected), label=label)
    if not sent.answered or sent.reply is None:
        return False
    ctx.add([schema_check(sent.transaction, sent.reply.body)], label=label)
    return True


def unexpected_body(sent: Sent, expected: str) -> str:
    return f"the answer is a {body_name(sent.reply)}, not a {expected}" if sent.reply is not None else "no answer"


__all__ = ["judge", "unexpected_body"]
